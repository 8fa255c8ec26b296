"""Worker functions for the conversion tests, run on gloo ranks by `run_distributed`.

They live in the package (not in tests/) so spawned processes can import them by name.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def pipeline_forward(model, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, vocab_size] on the last PP stage (None elsewhere).

    Stages run in turn, hidden states passed with point-to-point sends (forward only); the
    last stage gathers the vocabulary-parallel logits over the TP group and drops the padding.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    b, s = input_ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    with torch.no_grad():
        if not first:
            hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(input_ids, position_ids, None)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return logits[..., :vocab_size].float()


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def check_checkpoints(ckpts: dict, refs: dict, input_ids: torch.Tensor, loads: list) -> dict:
    """Load checkpoints at (TP, PP) layouts and compare logits with their HF references.

    ckpts: {label: (checkpoint dir, reference name)}; refs: {reference name: logits};
    loads: [(label, tp, pp)]. Returns {(label, tp, pp): relative error} from the TP rank 0 of
    the last pipeline stage (other ranks return an empty dict).
    """
    from megatron.core import parallel_state as ps

    from agro_megatron import parallel
    from agro_megatron.checkpoint.load import build_and_load

    errors = {}
    layouts = sorted({(tp, pp) for _, tp, pp in loads})
    for tp, pp in layouts:
        parallel.init_model_parallel(tp=tp, pp=pp)
        for label, _, _ in [x for x in loads if x[1:] == (tp, pp)]:
            ckpt, ref_name = ckpts[label]
            model, arch = build_and_load(ckpt)
            model.eval()
            logits = pipeline_forward(model, input_ids, arch.vocab_size)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                errors[(label, tp, pp)] = relative_error(logits, refs[ref_name])
            dist.barrier()
    return errors


def load_error(ckpt: str, tp: int, pp: int, dtype: str) -> str:
    """The error `load_converted_checkpoint` raises for a model built with another dtype ('' if none)."""
    from agro_megatron import parallel
    from agro_megatron.checkpoint.convert import checkpoint_arch
    from agro_megatron.checkpoint.load import load_converted_checkpoint
    from agro_megatron.models.llama import build_model

    parallel.init_model_parallel(tp=tp, pp=pp)
    model = build_model(checkpoint_arch(ckpt), dtype=dtype)
    try:
        load_converted_checkpoint(ckpt, model)
    except Exception as e:  # noqa: BLE001 - the test inspects which error
        return f"{type(e).__name__}: {e}"
    return ""


def run_all(ckpts: dict, refs: dict, input_ids: torch.Tensor, loads: list, layout_probe: tuple,
            dtype_probe: tuple) -> dict:
    """Everything the distributed conversion test checks, in one launch (each launch costs seconds)."""
    return {"errors": check_checkpoints(ckpts, refs, input_ids, loads),
            "layout": sharded_layout(*layout_probe),
            "dtype_error": load_error(*dtype_probe)}


def sharded_layout(ckpt: str, tp: int, pp: int) -> list:
    """(key, global offset, local shape, global shape) of every main-replica chunk this rank's
    `GPTModel.sharded_state_dict()` asks for - megatron's own view of the checkpoint layout."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from agro_megatron import parallel
    from agro_megatron.checkpoint.convert import checkpoint_arch
    from agro_megatron.models.llama import build_model

    parallel.init_model_parallel(tp=tp, pp=pp)
    model = build_model(checkpoint_arch(ckpt))
    sd = model.sharded_state_dict()
    apply_factories(sd)
    out = []
    stack = [sd]
    while stack:
        node = stack.pop()
        values = node.values() if isinstance(node, dict) else node
        for v in values:
            if isinstance(v, (dict, list)):
                stack.append(v)
            elif isinstance(v, ShardedTensor) and all(r == 0 for r in v.replica_id):
                local = (1,) * v.prepend_axis_num + tuple(v.local_shape)
                out.append((v.key, tuple(v.global_offset), local, tuple(v.global_shape)))
    return out
