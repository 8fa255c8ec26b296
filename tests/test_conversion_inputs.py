"""agro-convert on damaged inputs and hostile outputs (issue 17): every case is a named error that
says what to do, exits non-zero without a traceback, leaves no partial output and never touches
the source. Full disks are real: a file-size limit in a child process (EFBIG) and writes that
reach /dev/full (ENOSPC from the kernel)."""
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agro_megatron.checkpoint import (BadArgumentError, CheckpointContentError, CorruptFileError, OutputWriteError,
                                      convert, dist_format, hf_io)
from agro_megatron.checkpoint.convert import export_hf, import_hf
from agro_megatron.cli.convert import main as cli_main
from agro_megatron.testing.tiny_llama import write_tiny_llama

SHAPE = dict(vocab_size=300, hidden=64, layers=4, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("inputs") / "hf", **SHAPE, max_shard_size="40KB", seed=3)


@pytest.fixture(scope="module")
def mega(src, tmp_path_factory):
    return import_hf(src, tmp_path_factory.mktemp("inputs_mega") / "m", tp=2, pp=2)


def _digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _cli_fails(argv, capsys, *needles) -> str:
    assert cli_main(argv + ["--quiet"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


# --- damaged source files ---------------------------------------------------------------------
def _damage(data: bytes, how: str) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return {"cut_in_data": data[: 8 + n + (len(data) - 8 - n) // 2],
            "cut_in_header": data[: 8 + n // 2],
            "cut_in_length": data[:5],
            "huge_header_length": b"\xff" * 7 + b"\x7f" + data[8:],  # used to be a MemoryError / OverflowError
            "header_not_json": data[:8] + b"\x00" * n + data[8 + n:]}[how]


@pytest.mark.parametrize("how", ["cut_in_data", "cut_in_header", "cut_in_length", "huge_header_length",
                                 "header_not_json"])
def test_truncated_or_damaged_safetensors_is_named(src, tmp_path, capsys, how):
    bad = tmp_path / "hf"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[2]
    shard.write_bytes(_damage(shard.read_bytes(), how))
    before = _digest(bad)
    with pytest.raises(CorruptFileError, match=rf"{shard.name} is truncated or damaged.*Re-download this shard"):
        import_hf(bad, tmp_path / "m")
    _cli_fails(["import", "--hf", str(bad), "--out", str(tmp_path / "m")], capsys, "CorruptFileError", shard.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and _digest(bad) == before


@pytest.mark.parametrize("text,error,needle", [
    ('{"model_type": "llama", "hidden_size": 6', CorruptFileError, "is not valid JSON"),
    ("[1, 2]", CorruptFileError, "not an object"),
    (b"\xff\xfe\x00garbage", CorruptFileError, "is not valid JSON"),
    (None, CheckpointContentError, "num_attention_heads is .four., not a positive integer"),
])
def test_broken_config_json_is_named(src, tmp_path, capsys, text, error, needle):
    bad = tmp_path / "hf"
    shutil.copytree(src, bad)
    if text is None:
        cfg = json.loads((bad / "config.json").read_text())
        text = json.dumps({**cfg, "num_attention_heads": "four"})
    (bad / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(error, match=needle):
        import_hf(bad, tmp_path / "m")
    _cli_fails(["import", "--hf", str(bad), "--out", str(tmp_path / "m")], capsys, error.__name__, "config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_truncated_megatron_checkpoint_is_named_on_export(mega, tmp_path, capsys):
    bad = tmp_path / "m"
    shutil.copytree(mega, bad)
    distcp = sorted(bad.glob("*.distcp"))[1]
    distcp.write_bytes(distcp.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match=rf"{distcp.name} is truncated"):
        export_hf(bad, tmp_path / "hf")
    (bad / ".metadata").write_bytes((bad / ".metadata").read_bytes()[:100])
    _cli_fails(["export", "--megatron", str(bad), "--out", str(tmp_path / "hf")], capsys, "CorruptFileError",
               ".metadata")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- bad options ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["abc", "0", "-5", "0MB", "-1GB", "nan", "GB", ""])
def test_bad_max_shard_size_is_named_before_any_work(mega, tmp_path, capsys, size):
    with pytest.raises(BadArgumentError, match="--max-shard-size .* is not a positive size"):
        export_hf(mega, tmp_path / "hf", max_shard_size=size)
    _cli_fails(["export", "--megatron", str(mega), "--out", str(tmp_path / "hf"), f"--max-shard-size={size}"],
               capsys, "BadArgumentError", "--max-shard-size")
    assert list(tmp_path.iterdir()) == []


def test_valid_shard_sizes_parse_as_documented():
    assert hf_io.parse_size("5GB") == 5 * 10**9 and hf_io.parse_size("500MB") == 500 * 10**6
    assert hf_io.parse_size("2GiB") == 2 << 30 and hf_io.parse_size(" 1.5 kb ") == 1500
    assert hf_io.parse_size("123") == 123 and hf_io.parse_size(7) == 7


def test_bad_parallel_sizes_are_named(src, tmp_path, capsys):
    for tp, pp in ((0, 1), (1, -2)):
        with pytest.raises(BadArgumentError, match="is not a parallel size"):
            import_hf(src, tmp_path / "m", tp=tp, pp=pp)
    _cli_fails(["import", "--hf", str(src), "--out", str(tmp_path / "m"), "--tp", "0"], capsys, "--tp 0")
    assert list(tmp_path.iterdir()) == []


# --- outputs that cannot be written -------------------------------------------------------------
def test_unwritable_out_is_named_before_any_work(src, mega, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file / "m", a_file / "deeper" / "m"):
        with pytest.raises(OutputWriteError, match="is not a directory"):
            import_hf(src, out)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputWriteError, match="cannot be written.*writable --out"):
            import_hf(src, locked / "m")
        _cli_fails(["export", "--megatron", str(mega), "--out", str(locked / "hf")], capsys, "OutputWriteError")
    # a filesystem without room for the output is refused before anything is written
    real = shutil.disk_usage
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = _cli_fails(["import", "--hf", str(src), "--out", str(tmp_path / "m")], capsys, "OutputWriteError",
                     "No space left on device", "MiB free")
    assert "0.0 MiB free" in err
    _cli_fails(["export", "--megatron", str(mega), "--out", str(tmp_path / "hf")], capsys, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"] + (["locked"] if os.geteuid() else [])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("command", ["import", "export"])
def test_file_size_limit_mid_write_is_named_and_cleaned_up(src, mega, tmp_path, command):
    """A real kernel write failure (RLIMIT_FSIZE: EFBIG, as a quota or a full disk would fail it)
    halfway through the output: named error, no partial output, source untouched."""
    source = src if command == "import" else mega
    before = _digest(source)
    flag = "--hf" if command == "import" else "--megatron"
    argv = [sys.executable, "-m", "agro_megatron.cli.convert", command, flag, str(source), "--out",
            str(tmp_path / "out"), "--quiet"] + (["--max-shard-size", "100KB"] if command == "export" else [])
    limit = 60_000  # below the output's largest file, above every small file written before it
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr
    assert "OutputWriteError" in proc.stderr and "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert "partial output was removed" in proc.stderr
    assert list(tmp_path.iterdir()) == [] and _digest(source) == before


def _dev_full_after(module, monkeypatch, suffix: str, skip: int):
    """Make the module's `open` send the (skip+1)-th file ending in `suffix` it writes to /dev/full:
    the kernel then fails the write with ENOSPC, as a disk that fills up mid-conversion does."""
    real_open, seen = open, {"n": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(suffix):
            seen["n"] += 1
            if seen["n"] > skip:
                return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    return seen


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_mid_write_says_no_space_left(src, mega, tmp_path, capsys, monkeypatch):
    before_src, before_mega = _digest(src), _digest(mega)
    seen = _dev_full_after(dist_format, monkeypatch, ".distcp", skip=1)  # stage 0 written, stage 1 fails
    _cli_fails(["import", "--hf", str(src), "--out", str(tmp_path / "m"), "--tp", "2", "--pp", "2"], capsys,
               "OutputWriteError", "No space left on device", "partial output was removed")
    assert seen["n"] == 2 and list(tmp_path.iterdir()) == []
    seen = _dev_full_after(hf_io, monkeypatch, ".safetensors", skip=1)
    _cli_fails(["export", "--megatron", str(mega), "--out", str(tmp_path / "hf"), "--max-shard-size", "100KB"],
               capsys, "OutputWriteError", "No space left on device")
    assert seen["n"] == 2 and list(tmp_path.iterdir()) == []
    assert _digest(src) == before_src and _digest(mega) == before_mega


def test_conversion_still_exact_after_the_checks(src, mega, tmp_path):
    """The checks reject nothing valid: the round trip stays bit-identical."""
    out = export_hf(mega, tmp_path / "hf", max_shard_size="100KB")
    from safetensors.torch import load_file

    a = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
