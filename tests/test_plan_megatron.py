"""The planner's exact part against what megatron-core really allocates (CPU, gloo, 4 ranks).

One launch measures six tiny-Llama cases (TP=2/PP=2, TP=2 x DP=2, PP=2 x DP=2 with tied
embeddings, DP=4 with several DDP buckets, fp32 variants), each rank reporting its live
parameters, DDP grad buffers, distributed-optimizer shard and (where megatron builds it on CPU)
the optimizer's fp32 master copies and Adam moments after one step. Every number is compared
with `plan.params` for that rank. The hidden size (48) and FFN (100) are not multiples of 64, so
the 64-element alignment and bucket padding of the distributed optimizer are exercised.
"""
import pytest

from agro_megatron.models.llama import LlamaArch
from agro_megatron.plan.params import ddp_buffers, rank_params, rank_state

ARCH = dict(vocab_size=1000, hidden_size=48, intermediate_size=100, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=12)
WORLD = 4


def case(name, tp, pp, dtype="bf16", dist=True, fp32_grads=True, tied=False, bucket=None):
    return dict(name=name, tp=tp, pp=pp, dtype=dtype, distributed_optimizer=dist,
                grad_reduce_in_fp32=fp32_grads, arch=dict(ARCH, tie_word_embeddings=tied), bucket_size=bucket)


CASES = [
    case("tp2_pp2_bf16", 2, 2, dist=False),
    case("tp2_dp2_bf16_distopt", 2, 1),
    case("pp2_dp2_tied_bf16grads_distopt", 1, 2, tied=True, fp32_grads=False),
    case("dp4_buckets_distopt", 1, 1, bucket=3000),
    case("tp2_pp2_fp32", 2, 2, dtype="fp32", dist=False),
    case("tp2_dp2_fp32_distopt", 2, 1, dtype="fp32"),
]
# megatron-core 0.16's mixed-precision optimizers check `param.type()` against torch.cuda.* names
# (optimizer/optimizer.py:671-695, optimizer/distrib_optimizer.py:361-436) and refuse CPU tensors.
CPU_OPTIMIZER_GAP = "Wrapped parameters must be one of"


@pytest.fixture(scope="module")
def measured():
    from agro_megatron.testing.distributed import run_distributed
    from agro_megatron.testing.plan_checks import measure_allocations

    per_rank = run_distributed(measure_allocations, WORLD, tp=1, pp=1, args=(CASES,))
    return [(c, [r[i] for r in per_rank]) for i, c in enumerate(CASES)]


def predicted(c, m):
    arch = LlamaArch(**c["arch"])
    nbytes = 2 if c["dtype"] == "bf16" else 4
    params = rank_params(arch, c["tp"], c["pp"], m["pp_rank"], dtype_bytes=nbytes, spec="local")
    kw = dict(distributed_optimizer=c["distributed_optimizer"], grad_reduce_in_fp32=c["grad_reduce_in_fp32"],
              bucket_size=c["bucket_size"] if m["pp_rank"] == 0 else None)
    return params, rank_state(params, m["dp"], m["dp_rank"], **kw), ddp_buffers(params, m["dp"], **kw)


pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_every_rank_reports_the_expected_layout(measured):
    for c, ranks in measured:
        assert len(ranks) == WORLD
        dp = WORLD // (c["tp"] * c["pp"])
        assert {m["dp"] for m in ranks} == {dp}, c["name"]
        assert sorted((m["tp_rank"], m["pp_rank"], m["dp_rank"]) for m in ranks) == sorted(
            (t, p, d) for t in range(c["tp"]) for p in range(c["pp"]) for d in range(dp)), c["name"]


def test_parameter_inventory_matches_the_live_model(measured):
    for c, ranks in measured:
        for m in ranks:
            params, _, _ = predicted(c, m)
            assert [(p.name, p.numel, p.nbytes_per) for p in params] == [tuple(x) for x in m["params"]], (
                c["name"], m["pp_rank"])


def test_param_and_grad_bytes_match_megatron_buffers(measured):
    for c, ranks in measured:
        for m in ranks:
            _, st, bufs = predicted(c, m)
            where = (c["name"], m["pp_rank"], m["dp_rank"])
            assert [(b.numel, c["distributed_optimizer"]) for b in bufs] == [tuple(x) for x in m["buffers"]], where
            assert st.param_bytes == m["param_bytes"], where
            assert st.grad_bytes == m["grad_bytes"], where


def test_distributed_optimizer_shards_match_megatron_range_map(measured):
    checked = 0
    for c, ranks in measured:
        if not c["distributed_optimizer"]:
            continue
        for m in ranks:
            _, _, bufs = predicted(c, m)
            assert [b.owned_numel(m["dp_rank"], m["dp"]) for b in bufs] == m["owned"], (
                c["name"], m["pp_rank"], m["dp_rank"])
            checked += 1
    assert checked == 16  # 4 distributed-optimizer cases x 4 ranks


def test_optimizer_bytes_match_live_optimizer_state(measured):
    compared, refused = 0, []
    for c, ranks in measured:
        for m in ranks:
            if "optimizer_error" in m:
                assert CPU_OPTIMIZER_GAP in m["optimizer_error"], m["optimizer_error"]
                refused.append(c["name"])
                continue
            _, st, _ = predicted(c, m)
            where = (c["name"], m["pp_rank"], m["dp_rank"], m["optimizer_types"])
            assert st.optimizer_bytes == m["optimizer_bytes"], where
            assert st.optimizer_numel == m["optimizer_numel"], where
            compared += 1
    assert compared >= 4  # the fp32 / FP32Optimizer case always builds on CPU
    # The platform layer makes megatron's bf16 and distributed optimizers build on CPU tensors.
    assert not refused, f"megatron refused to build optimizers for {sorted(set(refused))}"
