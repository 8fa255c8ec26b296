"""Scaling planner: parameter accounting against the real models, and the estimates' structure.

The exact per-rank bytes are checked against live megatron-core objects in test_plan_megatron.py.
Here: parameter counts against transformers' own Llama (meta device) and the published totals,
per-rank sums over TP x PP with the padding written out independently, the distributed
optimizer's partition, and the formulas' documented behaviour (1F1B in-flight counts, recompute,
sleep levels, bubble, roofline), plus the CLI end to end.
"""
import dataclasses
import json
import math

import pytest
import torch

from agro_megatron.models.llama import LLAMA3_PRESETS, LlamaArch, padded_vocab_size
from agro_megatron.plan import Layout, PlanInput, RolloutOptions, TrainOptions, Workload, get_gpu, make_plan
from agro_megatron.plan.memory import layer_activation_bytes, layer_input_bytes, stage_activation_bytes
from agro_megatron.plan.params import ddp_buffers, rank_params, rank_state, total_params_over_ranks

PUBLISHED = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "llama3-405b": 405_853_388_800}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_the_real_models(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = LLAMA3_PRESETS[name]
    cfg = {k: v for k, v in arch.to_hf_config().items() if k != "architectures"}
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert hf_count == PUBLISHED[name]
    assert arch.num_parameters() == hf_count
    # one rank holding everything: megatron's layout has exactly the HF elements (128256 % 128 == 0)
    assert sum(p.numel for p in rank_params(arch, 1, 1, 0)) == hf_count


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_per_rank_parameters_sum_to_the_model_plus_padding(name):
    arch = LLAMA3_PRESETS[name]
    h, L, V = arch.hidden_size, arch.num_layers, arch.vocab_size
    for tp in (1, 2, 4, 8):
        for pp in [d for d in (1, 2, 4, 7, 8, 9, 14, 16) if L % d == 0]:
            total = sum(p.numel for r in range(pp) for p in rank_params(arch, tp, pp, r, spec="local")) * tp
            vocab_pad = math.ceil(V / (128 * tp)) * 128 * tp - V      # megatron pads V to 128 * TP
            replicated_norms = (2 * L + 1) * h * (tp - 1)             # RMSNorm weights live on every TP rank
            assert total == arch.num_parameters() + 2 * vocab_pad * h + replicated_norms, (tp, pp)
            assert total == total_params_over_ranks(arch, tp, pp, spec="te")
            # TP splits every matrix evenly: each TP rank of a stage holds the same count
            stage_sizes = [sum(p.numel for p in rank_params(arch, tp, pp, r)) for r in range(pp)]
            assert max(stage_sizes) - min(stage_sizes) <= 2 * padded_vocab_size(V, tp) // tp * h + h


def test_tied_embeddings_keep_a_copy_on_the_last_stage():
    arch = LlamaArch(1000, 64, 128, 4, 4, 2, 16, tie_word_embeddings=True)
    one = sum(p.numel for p in rank_params(arch, 1, 1, 0))
    assert one == arch.num_parameters() + 24 * 64  # 1000 -> 1024 rows, one table
    two = [rank_params(arch, 1, 2, r) for r in (0, 1)]
    assert [p.shared_embedding for p in two[0] if "embedding" in p.name] == [True]
    assert [p.name for p in two[1] if p.shared_embedding] == ["output_layer.weight"]


def test_distributed_optimizer_partitions_every_parameter_once():
    arch = LLAMA3_PRESETS["llama3-8b"]
    for spec in ("te", "local"):
        params = rank_params(arch, 2, 2, 1, spec=spec)
        for dp, bucket in ((3, None), (8, 40_000_000), (64, None)):
            bufs = ddp_buffers(params, dp, distributed_optimizer=True, grad_reduce_in_fp32=True, bucket_size=bucket)
            for b in bufs:
                assert all((e - s) % math.lcm(dp, 128) == 0 for s, e in b.buckets)
                assert all(s % 64 == 0 for _, s, _ in b.spans)
            owned = sum(b.owned_numel(r, dp) for b in bufs for r in range(dp))
            assert owned == sum(p.numel for p in params)
            st = [rank_state(params, dp, r, distributed_optimizer=True, grad_reduce_in_fp32=True,
                             bucket_size=bucket) for r in range(dp)]
            n16 = sum(p.numel for p in params if p.nbytes_per == 2)
            n32 = sum(p.numel for p in params if p.nbytes_per == 4)
            assert sum(s.optimizer_bytes for s in st) == 12 * n16 + 8 * n32


def base(**kw) -> PlanInput:
    return PlanInput(LLAMA3_PRESETS["llama3-8b"], get_gpu("H100"), Layout(1, 8, 2, 1),
                     model_name="llama3-8b", **kw)


def test_policy_state_scales_as_documented():
    p1 = make_plan(base(), with_mbs=False).stages[0]
    p2 = make_plan(base(train=TrainOptions(distributed_optimizer=False)), with_mbs=False).stages[0]
    # replicated optimizer: 12 bytes per parameter on each rank; sharded over DP=4: about a quarter
    n = sum(p.numel for p in rank_params(LLAMA3_PRESETS["llama3-8b"], 2, 1, 0))
    assert p2.optimizer == 12 * n and p2.weights == 2 * n and p2.grads == 4 * n
    assert abs(p1.optimizer - 3 * n) / (3 * n) < 1e-3
    bf16 = make_plan(base(train=TrainOptions(grad_reduce_in_fp32=False)), with_mbs=False).stages[0]
    assert bf16.grads * 2 == p1.grads


def test_1f1b_in_flight_micro_batches_and_recompute():
    inp = base().replace(layout=Layout(2, 8, 2, 4), work=Workload(micro_batch=2))
    layers = 32 // 4
    full, inp_b = layer_activation_bytes(inp, 2), layer_input_bytes(inp, 2)
    for r in range(4):  # stage r holds PP - r micro-batches
        assert stage_activation_bytes(inp, r, 2) == (4 - r) * layers * full + full
    rc = inp.replace(train=TrainOptions(recompute=True))
    assert stage_activation_bytes(rc, 0, 2) == 4 * layers * inp_b + 2 * full
    assert layer_activation_bytes(inp, 4) == 2 * layer_activation_bytes(inp, 2)
    # sequence parallelism splits the replicated parts over TP
    nosp = inp.replace(train=TrainOptions(sequence_parallel=False))
    assert layer_activation_bytes(nosp, 2) > layer_activation_bytes(inp, 2)
    assert layer_input_bytes(nosp, 2) == 2 * layer_input_bytes(inp, 2)


def test_sleep_levels_decide_what_stays_resident():
    plans = {lvl: make_plan(base(rollout=RolloutOptions(tp=2, pp=1, sleep_level=lvl)), with_mbs=False)
             for lvl in (0, 1, 2)}
    s0, s1, s2 = (plans[k].stages[0] for k in (0, 1, 2))
    awake = s0.engine_weights + s0.engine_kv + s0.engine_overhead
    assert s0.phases["train"] - s2.phases["train"] == awake
    assert s1.phases["train"] == s2.phases["train"]
    assert s1.host_bytes - s2.host_bytes == s1.engine_weights  # level 1 parks the weights on the host
    assert s2.phases["sync"] - s2.phases["rollout"] == s2.sync_bucket - s2.engine_kv - s2.engine_overhead
    assert plans[1].time.host_copies > plans[2].time.host_copies == 0


def test_step_time_parts_follow_their_formulas():
    inp = base().replace(layout=Layout(1, 8, 2, 2))
    p = make_plan(inp, with_mbs=False)
    t, w = p.time, inp.work
    m = w.sequences // (w.micro_batch * inp.layout.dp_size)
    assert t.pipeline_bubble == pytest.approx((t.reference_forward + t.policy_forward + t.train) / m)
    assert t.tokens_per_s_per_gpu == pytest.approx(w.sequences * w.seq_len / (t.total * 8))
    # memory-bound decode: doubling HBM bandwidth halves the bandwidth part (TP latency unchanged)
    fast = make_plan(inp.replace(gpu=inp.gpu.with_overrides(hbm_bytes_s=2 * inp.gpu.hbm_bytes_s),
                                 rollout=dataclasses.replace(p.inp.rollout)), with_mbs=False)
    assert t.decode_bound == "memory"
    assert fast.time.rollout_decode < 0.75 * t.rollout_decode
    # recompute costs one extra forward: train time x 4/3
    rc = make_plan(p.inp.replace(train=TrainOptions(recompute=True)), with_mbs=False)
    assert rc.time.train == pytest.approx(t.train * 4 / 3)


def test_largest_micro_batch_is_the_boundary():
    p = make_plan(base(rollout=RolloutOptions(tp=8, pp=1, gpu_memory_utilization=0.2)))
    k = p.largest_micro_batch
    per_dp = 512 // 4
    assert k >= 1 and per_dp % k == 0
    ok = make_plan(p.inp.replace(work=Workload(micro_batch=k)), with_mbs=False)
    assert ok.fits
    nxt = min(d for d in range(k + 1, per_dp + 1) if per_dp % d == 0)
    assert not make_plan(p.inp.replace(work=Workload(micro_batch=nxt)), with_mbs=False).fits


def test_bad_layouts_fail_with_the_fix():
    with pytest.raises(ValueError, match="divide"):
        make_plan(base().replace(layout=Layout(1, 8, 3, 1)))
    with pytest.raises(ValueError, match="GPUs"):
        make_plan(base().replace(layout=Layout(1, 8, 2, 1, dp=3)))
    with pytest.raises(ValueError, match="n >= 2"):
        make_plan(base(work=Workload(n=1)))


def test_cli_table_json_search_png(tmp_path, capsys):
    from agro_megatron.cli.plan import main

    assert main(["--model", "llama3-8b", "--tp", "2", "--pp", "1", "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"] == PUBLISHED["llama3-8b"] and d["layout"]["dp"] == 4
    assert d["fits"] is True and d["time"]["tokens_per_s_per_gpu"] > 0
    assert main(["--model", "llama3-70b", "--nodes", "4", "--search", "--plain", "--top", "3",
                 "--offload-train-state"]) == 0
    out = capsys.readouterr().out
    assert "layout(s) fit" in out and "TP8" in out
    cfg = dataclasses.replace(LLAMA3_PRESETS["llama3-8b"], num_layers=4).to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    png = tmp_path / "mem.png"
    assert main(["--model", str(tmp_path), "--tp", "1", "--nodes", "1", "--plain", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "memory per GPU" in capsys.readouterr().out
    assert main(["--model", "llama3-8b", "--tp", "3", "--pp", "1"]) == 2
    assert "TP=3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- measured (cpu) profiles
def _cpu_gpu(rate=1e10, copy=None, op=0.0, lat=0.0, bw=1e30, **kw):
    """A measured profile with a flat matmul rate (a full 2 x 2 grid) and the given constants."""
    from agro_megatron.plan.hardware import GPU

    table = [(m, s, s, rate) for m in (1, 4096) for s in (16, 512)]
    return GPU("cpu-test", memory_bytes=16 * 2 ** 30, bf16_flops=rate, hbm_bytes_s=copy or 1e30,
               intra_node_bytes_s=bw, inter_node_bytes_s=bw, host_bytes_s=1e30, gpus_per_node=2,
               kind="cpu", matmul_table=table, op_overhead_s=op, allreduce_latency_s=lat, **kw)


def test_cpu_profile_round_trips_through_json_and_get_gpu(tmp_path):
    from agro_megatron.plan.hardware import load_profile, save_profile

    g = _cpu_gpu(op=2e-6, lat=1e-4, bw=1e9, copy_table=[(1024, 5e10), (2 ** 25, 1e10)])
    path = save_profile(g, str(tmp_path / "cpu.json"))
    assert load_profile(path) == g
    assert get_gpu(path) == g
    assert get_gpu("h100").kind == "gpu" and not get_gpu("h100").matmul_table  # presets untouched


def test_bad_profiles_name_the_file_and_the_key(tmp_path):
    from agro_megatron.plan.hardware import ProfileError, load_profile, save_profile

    good = json.load(open(save_profile(_cpu_gpu(), str(tmp_path / "good.json"))))
    cases = {
        "unknown": ({**good, "tflops": 3}, "tflops"),
        "missing": ({k: v for k, v in good.items() if k != "hbm_bytes_s"}, "hbm_bytes_s"),
        "no_table": ({**good, "matmul_table": []}, "matmul_table"),
        "negative": ({**good, "op_overhead_s": -1}, "op_overhead_s"),
        "kind": ({**good, "kind": "tpu"}, "kind"),
    }
    for name, (data, key) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(data))
        with pytest.raises(ProfileError) as e:
            load_profile(str(p))
        assert str(p) in str(e.value) and key in str(e.value), name
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ProfileError, match="broken.json"):
        load_profile(str(tmp_path / "broken.json"))


def test_matmul_rate_is_the_measured_one_at_grid_points_and_interpolated_between():
    from agro_megatron.plan.hardware import GPU

    rates = {(16, 32): 1e9, (16, 128): 4e9, (256, 32): 2e9, (256, 128): 16e9}
    g = GPU("c", 1, 1, 1, 1, 1, 1, kind="cpu", matmul_table=[(m, s, s, r) for (m, s), r in rates.items()])
    for (m, s), r in rates.items():
        assert g.matmul_s(m, s, s) == pytest.approx(2 * m * s * s / r, rel=1e-12)
    # geometric midpoint in both axes: the geometric mean of the four corners
    mid = 2 * 64 * 64 * 64 / g.matmul_s(64, 64, 64)
    assert mid == pytest.approx(math.prod(rates.values()) ** 0.25, rel=1e-9)
    # k != n: the size is sqrt(k n); outside the grid the edge rate holds
    assert g.matmul_s(16, 16, 64) == pytest.approx(2 * 16 * 16 * 64 / 1e9, rel=1e-12)
    assert 2 * 1e5 * 1e3 * 1e3 / g.matmul_s(1e5, 1e3, 1e3) == pytest.approx(16e9)
    with pytest.raises(ValueError, match="full grid"):
        GPU("c", 1, 1, 1, 1, 1, 1, kind="cpu", matmul_table=[(16, 32, 32, 1e9), (256, 128, 128, 1e9)]).matmul_s(64, 64, 64)


def test_copy_rate_follows_the_working_set():
    g = _cpu_gpu(copy=3e9, copy_table=[(2 ** 14, 4e10), (2 ** 24, 1e10)])
    assert g.copy_s(1e9, 2 ** 14) == pytest.approx(1e9 / 4e10)
    assert g.copy_s(1e9, 2 ** 30) == pytest.approx(1e9 / 1e10)          # clamped: DRAM-sized
    assert g.copy_s(1e9, 2 ** 19) == pytest.approx(1e9 / 2e10)          # log-log midpoint
    assert _cpu_gpu(copy=3e9).copy_s(6e9, 1) == pytest.approx(2.0)     # no table: hbm_bytes_s


def _cpu_plan(gpu, tp=1, pp=1, resp=32, arch=None):
    arch = arch or LlamaArch(512, 64, 256, 2, 4, 2, 16)
    dp = 2 // (tp * pp)
    inp = PlanInput(arch, gpu, Layout(nodes=1, gpus_per_node=2, tp=tp, pp=pp),
                    Workload(prompts_per_step=4, n=4, prompt_len=40, response_len=resp, micro_batch=16 // dp),
                    TrainOptions(dtype_bytes=4, spec="local", distributed_optimizer=dp > 1),
                    RolloutOptions(engine="native"))
    return make_plan(inp, with_mbs=False)


def test_kernel_model_matmul_time_equals_the_flop_count_at_a_flat_rate():
    """Only matmuls cost (flat rate, free memory, ops and links): the training pass is 3x the
    forward's matmul FLOPs (qkv, proj, fc1, fc2, attention's full square, LM head) / rate."""
    R = 1e10
    arch = LlamaArch(512, 64, 256, 2, 4, 2, 16)
    plan = _cpu_plan(_cpu_gpu(rate=R), tp=1, pp=1)
    per_rank, seq = 8, 72                       # 16 sequences over DP 2; 40 + 32 tokens
    tokens = per_rank * seq
    h, d, heads, kv, ffn, V = 64, 16, 4, 2, 256, padded_vocab_size(512, 1)
    layer = 2 * tokens * (h * (heads + 2 * kv) * d + heads * d * h + h * 2 * ffn + ffn * h)
    attention = per_rank * heads * 2 * (2 * seq * d * seq)
    fwd = 2 * (layer + attention) + 2 * tokens * h * V
    assert plan.time.train == pytest.approx(3 * fwd / R, rel=1e-9)
    assert plan.time.reference_forward + plan.time.policy_forward == pytest.approx(2 * fwd / R, rel=1e-9)


def test_kernel_model_op_overhead_and_decode_length_terms():
    from agro_megatron.plan import kernels

    tiny_rate = 1e30   # matmuls free: only the op overhead costs
    op = 1e-5
    p32, p128 = (_cpu_plan(_cpu_gpu(rate=tiny_rate, op=op), resp=r) for r in (32, 128))
    batch, layers = 8, 2
    per_step = op * (layers * kernels.DECODE_OPS_PER_LAYER + kernels.DECODE_OPS_FIXED + kernels.SAMPLER_OPS + batch)
    assert p32.time.detail["decode_step"] == pytest.approx(per_step, rel=1e-9)
    # decode is linear in the response length: 96 more tokens cost 96 more steps
    assert p128.time.rollout_decode - p32.time.rollout_decode == pytest.approx(96 * per_step, rel=1e-9)
    # and the whole step scales with the op cost
    p2 = _cpu_plan(_cpu_gpu(rate=tiny_rate, op=2 * op), resp=32)
    assert p2.time.total == pytest.approx(2 * p32.time.total, rel=1e-9)


def test_kernel_model_pipeline_and_links():
    from agro_megatron.plan.kernels import _pipeline

    assert _pipeline([1.0, 3.0], 1) == (3.0, 1.0)          # one micro-batch: stages in series
    assert _pipeline([1.0, 3.0], 4) == (12.0, 1.0)         # (m - 1) more slots of the slowest stage
    lat = 1e-3
    tp1, tp2 = (_cpu_plan(_cpu_gpu(rate=1e30, lat=lat), tp=t) for t in (1, 2))
    # TP2 decode: 2 all-reduces per layer; the embedding all-reduce, logits gather, token broadcast per step
    assert tp2.time.detail["decode_step"] - tp1.time.detail["decode_step"] == pytest.approx((2 * 2 + 3) * lat)
    # TP1 x DP2 syncs gradients (reduce-scatter + all-gather); TP2 has no DP group
    assert tp1.time.grad_sync == pytest.approx(2 * lat, rel=1e-6) and tp2.time.grad_sync == 0
    pp2 = _cpu_plan(_cpu_gpu(rate=1e10), pp=2)
    assert pp2.time.pipeline_bubble > 0 and pp2.time.detail["micro_batches"] == 1


def test_a_measured_profile_needs_the_native_engine():
    inp = PlanInput(LlamaArch(512, 64, 256, 2, 4, 2, 16), _cpu_gpu(), Layout(nodes=1, gpus_per_node=2),
                    Workload(prompts_per_step=4, n=4, prompt_len=40, response_len=32))
    with pytest.raises(ValueError, match="native"):
        make_plan(inp, with_mbs=False)
