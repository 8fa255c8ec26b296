"""Weight streaming out of a TP x PP sharded Megatron model (rollout/weight_sync.py), CPU, no vLLM.

References: transformers' own state dict (names and shapes of a meta-device LlamaForCausalLM);
the safetensors transformers wrote (bit-exact after import -> load at TP=2 x PP=2 -> stream);
transformers' logits from the streamed tensors vs megatron's logits after the weights changed.
"""
import pytest
import torch

from agro_megatron.checkpoint import mapping
from agro_megatron.models.llama import LLAMA3_PRESETS, LlamaArch
from agro_megatron.rollout.weight_sync import DEFAULT_BUCKET_BYTES, plan_buckets, weight_nbytes


def _hf_meta_state(arch: LlamaArch) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    sd = {n: t for n, t in model.state_dict().items()}
    if arch.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("tie", [False, True])
def test_bucket_plan_llama3_8b(tie):
    """Every HF tensor of Llama-3-8B exactly once, fused groups whole, buckets within bounds."""
    import dataclasses

    arch = dataclasses.replace(LLAMA3_PRESETS["llama3-8b"], tie_word_embeddings=tie)
    ref = _hf_meta_state(arch)
    for bucket_bytes in (None, 1_100_000_000, 3 << 30):
        plan = plan_buckets(arch, torch.bfloat16, bucket_bytes)
        names = [n for b in plan for w in b for n in w.hf_names]
        assert sorted(names) == sorted(ref) and len(names) == len(set(names))
        limit = bucket_bytes or DEFAULT_BUCKET_BYTES
        for b in plan:
            nbytes = sum(ref[n].numel() * 2 for w in b for n in w.hf_names)
            assert nbytes == sum(weight_nbytes(arch, w, torch.bfloat16) for w in b)
            assert nbytes <= limit
        # greedy packing: a bucket is closed only when the next weight would not fit
        for a, b in zip(plan, plan[1:]):
            used = sum(weight_nbytes(arch, w, torch.bfloat16) for w in a)
            assert used + weight_nbytes(arch, b[0], torch.bfloat16) > limit
    # q/k/v of one layer and gate/up of one layer never in different buckets
    plan = plan_buckets(arch, torch.bfloat16, 1_100_000_000)
    where = {n: i for i, b in enumerate(plan) for w in b for n in w.hf_names}
    for i in range(arch.num_layers):
        assert len({where[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"}) == 1
        assert where[f"model.layers.{i}.mlp.gate_proj.weight"] == where[f"model.layers.{i}.mlp.up_proj.weight"]


def test_bucket_too_small_is_a_clear_error():
    arch = LLAMA3_PRESETS["llama3-8b"]
    emb = 128256 * 4096 * 2
    with pytest.raises(ValueError, match=f"bucket_bytes >= {emb}"):
        plan_buckets(arch, torch.bfloat16, emb - 1)
    assert len(plan_buckets(arch, torch.bfloat16, emb)[0]) == 1  # exactly the embedding fits
    # fp32 70B embedding (4.2 GB) is above the 1 GiB default: the default grows to it
    big = LLAMA3_PRESETS["llama3-70b"]
    assert plan_buckets(big, torch.float32)[0] == [mapping.Weight("embedding")]


@pytest.mark.slow
@pytest.mark.distributed
def test_stream_tp2_pp2_matches_hf(tmp_path):
    from agro_megatron.checkpoint.convert import import_hf
    from agro_megatron.testing.distributed import run_distributed
    from agro_megatron.testing.tiny_llama import write_tiny_llama
    from agro_megatron.testing.weight_sync_checks import check_stream

    cases = {}
    for tie in (False, True):
        hf = write_tiny_llama(tmp_path / f"hf{tie}", layers=4, tie=tie, seed=3 + tie)
        cases[f"tie={tie}"] = (str(import_hf(hf, tmp_path / f"mg{tie}", tp=2, pp=2)), str(hf))
    # largest weight: gate+up 2 x 192 x 64 fp32 = 98304 B; buckets of 100 kB force several
    bucket_bytes = 100_000
    ids = torch.tensor([[0, 5, 77, 120, 299, 3, 9, 200], [0, 42, 42, 7, 1, 250, 17, 64]])
    results = run_distributed(check_stream, 4, tp=2, pp=2, args=(cases, bucket_bytes, ids))
    for label in cases:
        per_rank = [r[label] for r in results]
        first = per_rank[0]
        for r in per_rank:
            assert sorted(r["names"]) == sorted(r["ref_names"]), label
            assert r["names"] == first["names"] and r["buckets"] == first["buckets"]  # same stream everywhere
            assert r["mismatch"] == [] and r["shapes_ok"] and r["bf16_ok"], (label, r["mismatch"])
            assert r["changed"] == len(r["names"])
        sizes = [b for _, b in first["buckets"]]
        assert len(sizes) > 3 and max(sizes) <= bucket_bytes, sizes
        errs = [r for r in per_rank if "logit_error" in r]
        print(label, "buckets:", sizes, "logit errors after the change:", [r["logit_error"] for r in errs],
              "logit change vs unchanged weights:", [r["logit_change"] for r in errs])
        assert errs and all(r["pp_rank"] == 1 for r in errs)
        for r in errs:
            assert r["logit_error"] < 1e-5, (label, r["logit_error"])
            assert r["logit_change"] > 1e-3, (label, r["logit_change"])  # the change was real
