"""HF <-> Megatron conversion in one process: round trips, files, bad inputs, atomicity, memory.

The HF side is written by transformers (testing/tiny_llama.py); tensors are compared with
safetensors' own reader and logits with transformers' LlamaForCausalLM.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.metadata import MetadataIndex

from agro_megatron.checkpoint import (CheckpointContentError, DtypeMismatchError, IncompatibleCheckpointError,
                                      MissingShardError, NotLlamaError, OutputExistsError, ParallelLayoutError)
from agro_megatron.checkpoint import convert, dist_format
from agro_megatron.checkpoint.convert import export_hf, import_hf
from agro_megatron.checkpoint.hf_io import HFCheckpoint
from agro_megatron.cli.convert import main as cli_main
from agro_megatron.models.llama import LlamaArch
from agro_megatron.testing.tiny_llama import hf_logits, write_random_llama, write_tiny_llama

SHAPE = dict(vocab_size=300, hidden=64, layers=4, heads=4, kv_heads=2)


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return {
        "fp32_untied": write_tiny_llama(root / "fp32_untied", **SHAPE, max_shard_size="40KB", seed=1),
        "bf16_tied": write_tiny_llama(root / "bf16_tied", **SHAPE, tie=True, dtype="bf16", seed=2,
                                      config_layout="v4"),
    }


@pytest.mark.parametrize("name,tp,pp", [("fp32_untied", 2, 2), ("fp32_untied", 1, 1), ("bf16_tied", 2, 1),
                                        ("bf16_tied", 1, 2)])
def test_round_trip_is_bit_identical(ckpts, tmp_path, name, tp, pp):
    src = ckpts[name]
    import_hf(src, tmp_path / "m", tp=tp, pp=pp)
    export_hf(tmp_path / "m", tmp_path / "hf", max_shard_size="60KB")
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    for f in files:  # bounded shards: at most 60 KB of data, unless one tensor alone is larger
        names = [n for n, g in index["weight_map"].items() if g == f]
        data = sum(b[n].nbytes for n in names)
        assert data <= 60_000 or len(names) == 1, (f, data, names)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / f).read_bytes() == (src / f).read_bytes()
    meta = json.loads((tmp_path / "m" / "agro_checkpoint.json").read_text())
    assert (meta["tp"], meta["pp"], meta["dtype"]) == (tp, pp, "bf16" if "bf16" in name else "fp32")
    assert meta["writer"]["megatron_core"] and meta["hf_config"] == json.loads((src / "config.json").read_text())
    assert json.loads((tmp_path / "m" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_exported_checkpoint_loads_in_transformers_with_same_logits(ckpts, tmp_path):
    src = ckpts["fp32_untied"]
    assert cli_main(["import", "--hf", str(src), "--out", str(tmp_path / "m"), "--tp", "2", "--pp", "2",
                     "--quiet"]) == 0
    assert cli_main(["export", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "hf", ids))


def test_dtype_cast_on_import(ckpts, tmp_path):
    src = ckpts["fp32_untied"]
    import_hf(src, tmp_path / "m", dtype="bf16")
    export_hf(tmp_path / "m", tmp_path / "hf")
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_hf_reader_views_and_reads(ckpts):
    src = ckpts["fp32_untied"]
    ref = _tensors(src)
    hf = HFCheckpoint(src)
    assert sorted(hf.names()) == sorted(ref)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(hf.view(name, 5, 7), ref[name][5:12])
    out = torch.empty(3, ref[name].shape[1], dtype=torch.float64)
    hf.read_rows_into(name, 60, out)
    assert torch.equal(out, ref[name][60:63].double())
    assert torch.equal(hf.read("model.norm.weight"), ref["model.norm.weight"])


def test_stored_chunks_are_read_zero_copy_and_fallback_agrees(ckpts, tmp_path, monkeypatch):
    """Export maps each stored chunk's raw bytes; they equal torch.load of the record, and the
    torch.load fallback (used for any record it cannot map) exports the same bytes."""
    ck = import_hf(ckpts["fp32_untied"], tmp_path / "m", tp=2, pp=2)
    reader = dist_format.DistCheckpointReader(ck)
    n = 0
    for key, md in reader.metadata.state_dict_metadata.items():
        for c in getattr(md, "chunks", []):
            info = reader.metadata.storage_data[MetadataIndex(key, torch.Size(c.offsets))]
            with open(ck / info.relative_path, "rb") as f:
                at = dist_format._raw_tensor_location(f, info.offset, info.length, md.properties.dtype,
                                                      tuple(c.sizes))
                f.seek(info.offset)
                loaded = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
            assert at is not None and torch.equal(reader.chunk(key, c), loaded)
            n += 1
    assert n > 4 * 6
    monkeypatch.setattr(dist_format, "_raw_tensor_location", lambda *a: None)
    export_hf(ck, tmp_path / "hf")
    a, b = _tensors(ckpts["fp32_untied"]), _tensors(tmp_path / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad inputs: each a named error whose message says what to do -----------------------------
def test_bad_parallel_layouts(ckpts, tmp_path):
    with pytest.raises(ParallelLayoutError, match=r"does not divide the 2 KV heads.*choose TP from \[1, 2\]"):
        import_hf(ckpts["fp32_untied"], tmp_path / "m", tp=4)
    with pytest.raises(ParallelLayoutError, match="larger than the 4 layers: use PP <= 4"):
        import_hf(ckpts["fp32_untied"], tmp_path / "m", pp=8)
    assert not (tmp_path / "m").exists()


def test_missing_shard_and_missing_tensor(ckpts, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ckpts["fp32_untied"], src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingShardError, match=rf"{shard.name}.*re-download"):
        import_hf(src, tmp_path / "m")
    single = tmp_path / "single"
    shutil.copytree(ckpts["bf16_tied"], single)
    (single / "model.safetensors").unlink()
    with pytest.raises(MissingShardError, match="no model.safetensors.index.json or model.safetensors"):
        import_hf(single, tmp_path / "m")
    cfg = json.loads((single / "config.json").read_text())
    shutil.copy(ckpts["bf16_tied"] / "model.safetensors", single)
    (single / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointContentError, match="model.layers.4.*missing"):
        import_hf(single, tmp_path / "m")


def test_not_llama(ckpts, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ckpts["bf16_tied"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral",
                                                 "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(NotLlamaError, match="'mistral'.*Llama-3.x"):
        import_hf(src, tmp_path / "m")


def test_dtype_mismatch(ckpts, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ckpts["fp32_untied"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    with pytest.raises(DtypeMismatchError, match="declares torch.bfloat16 but the weights are torch.float32.*--dtype fp32"):
        import_hf(src, tmp_path / "m")
    import_hf(src, tmp_path / "m", dtype="fp32")  # the fix the message names works


def test_existing_output_and_overwrite(ckpts, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        import_hf(ckpts["bf16_tied"], out)
    assert cli_main(["import", "--hf", str(ckpts["bf16_tied"]), "--out", str(out), "--quiet"]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    # --overwrite replaces only an earlier agro-convert output: a user's directory stays as it is
    with pytest.raises(OutputExistsError, match="nothing was deleted"):
        import_hf(ckpts["bf16_tied"], out, overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    ours = tmp_path / "ours"
    import_hf(ckpts["bf16_tied"], ours)
    (ours / "stale.txt").write_text("from the earlier output")
    import_hf(ckpts["bf16_tied"], ours, overwrite=True)
    assert not (ours / "stale.txt").exists() and (ours / "agro_checkpoint.json").exists()
    hf = tmp_path / "hf"
    export_hf(ours, hf)
    export_hf(ours, hf, overwrite=True)  # an earlier export is ours too
    with pytest.raises(OutputExistsError):
        export_hf(ours, ckpts["bf16_tied"].parent / "fp32_untied")
    with pytest.raises(convert.ConversionError, match="separate directory"):
        import_hf(ckpts["bf16_tied"], ckpts["bf16_tied"] / "sub", overwrite=True)


def test_overwrite_never_deletes_the_source(ckpts, tmp_path):
    """--out equal to, inside, or containing the source is refused before anything is touched,
    with or without --overwrite: `import --hf models/llama --out models --overwrite` used to delete
    models/ and the source in it."""
    import shutil

    models = tmp_path / "models"
    src = models / "llama"
    shutil.copytree(ckpts["bf16_tied"], src)
    (models / "other.txt").write_text("another model's notes")
    before = sorted(p.relative_to(models) for p in models.rglob("*"))
    for out in (models, src, src / "sub", tmp_path):
        with pytest.raises(convert.ConversionError, match="contains, equals or lies inside"):
            import_hf(src, out, overwrite=True)
    mega = tmp_path / "mega"
    import_hf(src, mega)
    for out in (tmp_path, mega, mega / "hf"):
        with pytest.raises(convert.ConversionError, match="contains, equals or lies inside"):
            export_hf(mega, out, overwrite=True)
    assert sorted(p.relative_to(models) for p in models.rglob("*")) == before
    assert (models / "other.txt").exists() and (mega / "agro_checkpoint.json").exists()


def test_interrupted_import_leaves_nothing(ckpts, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert._ChunkReader.chunk

    def failing(self, w, p):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, w, p)

    monkeypatch.setattr(convert._ChunkReader, "chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        import_hf(ckpts["fp32_untied"], tmp_path / "m", tp=2)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old").write_text("previous")
    (tmp_path / "m" / convert.OUTPUT_MARKER).touch()  # an earlier output of ours: --overwrite may replace it
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        import_hf(ckpts["fp32_untied"], tmp_path / "m", tp=2, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (tmp_path / "m" / "old").exists()


def test_incompatible_writer_version(ckpts, tmp_path):
    ck = import_hf(ckpts["bf16_tied"], tmp_path / "m")
    meta_path = ck / "agro_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["writer"]["megatron_core"] = "0.19.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IncompatibleCheckpointError, match="megatron-core 0.19.0.*re-import"):
        export_hf(ck, tmp_path / "hf")
    meta["writer"]["megatron_core"] = convert.writer_info()["megatron_core"]
    meta_path.write_text(json.dumps(meta))
    (ck / "common.pt").unlink()
    with pytest.raises(IncompatibleCheckpointError, match="no common.pt.*0.19"):
        export_hf(ck, tmp_path / "hf")
    with pytest.raises(CheckpointContentError, match="agro-convert import"):
        export_hf(ckpts["bf16_tied"], tmp_path / "hf2")


# --- memory ---------------------------------------------------------------------------------
_MEASURE = textwrap.dedent("""
    import json, sys
    from agro_megatron.checkpoint.convert import export_hf, import_hf

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    src, work, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    out = {}
    reset_peak(); base = status("VmRSS:")
    import_hf(src, work + "/m", tp=tp, pp=pp)
    out["import"] = status("VmHWM:") - base
    reset_peak(); base = status("VmRSS:")
    export_hf(work + "/m", work + "/out")
    out["export"] = status("VmHWM:") - base
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_peak_memory_is_bounded_by_largest_tensor(tmp_path):
    """Peak RSS growth of a fresh process converting a checkpoint ~100x its largest tensor stays
    within 2 x largest tensor + a fixed 16 MB (VmHWM, reset between phases, counts mapped file
    pages too - so no memory-map of the model can hide)."""
    arch = LlamaArch(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=96, num_heads=4,
                     num_kv_heads=2, head_dim=32)
    src = write_random_llama(tmp_path / "hf", arch, dtype="fp32", max_shard_bytes=8 << 20)
    hf = HFCheckpoint(src)
    sizes = [hf.nbytes(n) for n in hf.names()]
    total, largest = sum(sizes), max(sizes)
    assert total > 90 * largest
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path), "2", "2"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = 2 * largest + (16 << 20)
    assert peaks["import"] <= bound and peaks["export"] <= bound, (peaks, largest, total)
    assert bound < total / 2, peaks  # the bound is far below holding the model
