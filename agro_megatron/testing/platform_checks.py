"""Worker functions for tests/test_platform_cpu.py (run inside gloo ranks by run_distributed).

Weights are made once at TP=1/PP=1 and sliced into each layout with megatron's own per-parameter
partition metadata (partition_dim), so every layout computes with identical weights.
"""
from __future__ import annotations

import torch

from agro_megatron.models.llama import LlamaArch, build_model

# Tiny Llama-3 shape: RMSNorm, SwiGLU, RoPE theta 5e5, GQA (4 heads, 2 KV groups), untied embeddings.
# vocab 256 is a multiple of 128 * TP for TP <= 2, so padding is the same in every layout.
ARCH = LlamaArch(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=500000.0, max_position_embeddings=64)
BATCH, SEQ = 2, 12


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARCH.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _global_layer_key(key: str, stage: int, layers_per_stage: int) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + stage * layers_per_stage)
    return ".".join(parts)


def _tp_slice(full: torch.Tensor, param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """This TP rank's shard of a full (TP=1) tensor, following megatron's layout for `param`."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):  # SwiGLU: each rank holds [gate shard; up shard]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]], dim=0)
    return full.chunk(tp, dim=dim)[r]


def _load_full(model, full_state: dict) -> None:
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    per_stage = ARCH.num_layers // ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = full_state[_global_layer_key(name, stage, per_stage)]
            p.copy_(_tp_slice(full, p, name).to(p.dtype))


def _grads_vs_full(model, full_grads: dict) -> float:
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    per_stage = ARCH.num_layers // ps.get_pipeline_model_parallel_world_size()
    worst = 0.0
    for name, p in model.named_parameters():
        ref = _tp_slice(full_grads[_global_layer_key(name, stage, per_stage)], p, name)
        g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
        scale = ref.abs().max().clamp_min(1e-12)
        worst = max(worst, float(((g.float() - ref.float()).abs().max() / scale)))
    return worst


def _run_schedule(model, dtype, forward_only=False):
    """One global batch through megatron's forward_backward_func; returns (loss, logits or None)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, labels = _batch()
    captured = {}

    def forward_step(data_iterator, m):
        positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
        logits = m(tokens, positions, attention_mask=None)

        def loss_func(output):
            captured["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(output).detach().clone()
            # (clone: megatron's cross entropy subtracts the max from its input in place)
            loss = tensor_parallel.vocab_parallel_cross_entropy(output.float(), labels).mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    model.config.pipeline_dtype = dtype
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=SEQ, micro_batch_size=BATCH, forward_only=forward_only)
    if ps.is_pipeline_last_stage():
        return float(out[0]["loss"]), captured["logits"]
    return None, None


def reference(path: str) -> None:
    """TP=1/PP=1: weights, loss, logits and grads in fp32 and bf16, saved to `path`."""
    torch.manual_seed(0)
    model = build_model(ARCH, dtype="fp32")
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    record = {"weights": weights}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = build_model(ARCH, dtype=dtype_name)
        _load_full(m, weights)
        m.zero_grad(set_to_none=True)
        loss, logits = _run_schedule(m, dtype)
        record[dtype_name] = {"loss": loss, "logits": logits.float(),
                              "grads": {k: p.grad.float().clone() for k, p in m.named_parameters()}}
    torch.save(record, path)


def compare_layout(path: str) -> dict:
    """Any TP x PP layout: errors against the TP=1 reference for fp32 and bf16."""
    from megatron.core import parallel_state as ps

    ref = torch.load(path, weights_only=False)
    result = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = build_model(ARCH, dtype=dtype_name)
        _load_full(m, ref["weights"])
        m.zero_grad(set_to_none=True)
        loss, logits = _run_schedule(m, dtype)
        r = ref[dtype_name]
        entry = {"grad_rel_err": _grads_vs_full(m, r["grads"])}
        if ps.is_pipeline_last_stage():
            v = ARCH.vocab_size
            entry["logit_err"] = float((logits.float()[..., :v] - r["logits"][..., :v]).abs().max())
            entry["loss_err"] = abs(loss - r["loss"])
        result[dtype_name] = entry
    return result



def checkpoint_results_queue_round_trips(count: int) -> int:
    """How many of `count` large results, put on dist_checkpointing's writer results queue, the
    saving process can take back at once with get_nowait, as megatron's synchronous save does."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    q = filesystem_async._get_write_results_queue()
    payload = {i: torch.zeros(1 << 18) for i in range(4)}  # ~4 MB: far beyond a pipe's buffer
    got = 0
    for _ in range(count):
        q.put(payload)
        try:
            got += len(q.get_nowait()) == len(payload)
        except queue.Empty:
            pass
    return got


def model_devices_when_platform_names(device_name: str) -> list[str]:
    """Device types of every parameter, buffer and the RoPE frequencies of a model built while
    the platform layer names `device_name` as the model device (e.g. "meta" standing in for CUDA)."""
    import torch

    from agro_megatron import platform
    from agro_megatron.models.llama import LlamaArch, build_model

    platform.device = lambda: torch.device(device_name)
    arch = LlamaArch(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
    model = build_model(arch)
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    devices.add(model.rotary_pos_emb.inv_freq.device.type)
    return sorted(devices)
