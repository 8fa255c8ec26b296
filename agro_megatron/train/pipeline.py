"""Running token batches through megatron-core's forward_backward_func (any TP x PP).

The trainer hands over micro-batches of right-padded sequences (train/layout.py) and a
`loss_fn(logits_shard, mb)` that runs on the last pipeline stage. This module owns the megatron
details: pipeline shapes, the policy+reference pairing, and the micro-batch loss scaling.

The fused output path (`fused_output=True`, config `train.fused_output`): for the duration of one
schedule call, the last stage's models return final hidden states instead of logits
(models/hidden_head.py) and loss_fn gets `HiddenStates(hidden, output weight)` in place of each
logits shard, for `agro_megatron.ops.output_logprobs` to turn into log-probs without ever forming
the [tokens, V/TP] logits. The hook is undone when the call returns, so a sampler sharing the
model instance (rollout/native.py) still gets logits.

Context parallelism (cp > 1): each CP rank runs its positions of every sequence (the layout's
`MicroBatch.split_for_context_parallel`). The loss_fn sees this rank's positions only; the
per-position stats it returns come back gathered to whole sequences and its scalar stats summed, so
callers above this module never see CP.

Why a `PolicyWithReference` pair: the local_kl estimator and kl_pg need the full-vocabulary
KL(pi || pi_ref) at every position, i.e. both models' vocab-sharded logits on the last stage at the
same time. Running the frozen reference beside the policy in one module makes the pipeline carry both
streams ([s, 2b, h] activations) through the same schedule, for any PP, with no extra copies.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from agro_megatron import platform
from agro_megatron.models import unwrap_model
from agro_megatron.models.hidden_head import hidden_states_output, output_weight
from agro_megatron.ops.output import HiddenStates
from agro_megatron.ops.context_parallel import cp_size_and_rank, gather_sequence, split_sequence
from agro_megatron.train.layout import MicroBatch


class PolicyWithReference(torch.nn.Module):
    """One pipeline stage of the policy and of the frozen reference, run side by side."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.reference = reference
        self.config = unwrap_model(policy).config
        self._input = None

    def __getattr__(self, name):
        """DDP's grad-sync hooks (finish_grad_sync, no_sync, ...) belong to the policy alone."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("policy"), name)

    @property
    def module(self):
        """megatron's get_attr_wrapped_model walks `.module` to find model_type, config, etc."""
        return self.policy

    def set_input_tensor(self, input_tensor) -> None:
        t = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        self._input = t
        if t is None:
            unwrap_model(self.policy).set_input_tensor(None)
            self.reference.set_input_tensor(None)
        else:
            pol, ref = t.chunk(2, dim=1)  # [s, 2b, h]
            unwrap_model(self.policy).set_input_tensor(pol)
            self.reference.set_input_tensor(ref)

    def forward(self, input_ids, position_ids, attention_mask=None):
        out_pol = self.policy(input_ids, position_ids, attention_mask)
        with torch.no_grad():
            out_ref = self.reference(input_ids, position_ids, attention_mask)
        if unwrap_model(self.policy).post_process:
            return torch.cat([out_pol, out_ref.detach()], dim=0)  # logits [2b, s, V/tp] (or hidden [2b, s, h])
        return torch.cat([out_pol, out_ref.detach()], dim=1)      # hidden [s, 2b, h]


def run_micro_batches(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    loss_fn: Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict]],
    *,
    forward_only: bool,
    paired: bool = False,
    fused_output: bool = False,
) -> list[dict]:
    """Forward (and backward unless forward_only) every micro-batch; return loss_fn's stats.

    `loss_fn(logits, mb)` gets this rank's vocab shard of the logits ([b, L, V/tp], or the pair
    `(policy_logits, reference_logits)` when `paired`) and returns (loss, stats). Its loss must be the
    micro-batch's share of the total objective: this function undoes megatron's 1/num_microbatches.
    Stats come back (in micro-batch order) on the last pipeline stage, [] elsewhere.

    `fused_output`: loss_fn gets `HiddenStates` (ops/output.py: this stage's final hidden states and
    the output weight of the model that produced them) wherever it would get logits, the pair
    `(policy HiddenStates, reference HiddenStates)` when `paired`. The logits are never formed.

    Under context parallelism loss_fn gets `mb.split_for_context_parallel(...)` and the logits of
    those positions; its stats must be 0-dim tensors (additive over positions, e.g. the loss: summed
    over the CP group) or per-position [b, L/cp] tensors (gathered back to [b, L]).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    n_mb = len(micro_batches)
    shapes = {tuple(mb.tokens.shape) for mb in micro_batches}
    if ps.get_pipeline_model_parallel_world_size() > 1 and len(shapes) > 1:
        raise ValueError(f"pipeline parallelism needs equal micro-batch shapes, got {sorted(shapes)}; "
                         "pad them with make_micro_batches(..., uniform=True)")
    b, L = micro_batches[0].tokens.shape
    dev = platform.device()
    cp_size, cp_rank = cp_size_and_rank()
    stats: list[dict] = []
    # the models whose output layer returns hidden states during this call (last stage only)
    heads = _output_models(model, paired) if fused_output else ()

    def forward_step(data_iterator, m):
        whole = next(data_iterator)
        mb = whole.split_for_context_parallel(cp_size, cp_rank)
        tokens = mb.tokens.to(dev)
        positions = split_sequence(torch.arange(whole.tokens.shape[1], device=dev), 0, cp_size, cp_rank)
        output = m(tokens, positions.unsqueeze(0).expand_as(tokens), None)

        def loss_func(logits):
            if paired:
                logits = logits.chunk(2, dim=0)
            if heads:  # hidden states [b, L, h] (each of the pair), with their model's output weight
                outs = [HiddenStates(h, output_weight(m)) for h, m in zip(logits if paired else [logits], heads)]
                logits = tuple(outs) if paired else outs[0]
            loss, st = loss_fn(logits, mb)
            stats.append(st)
            # megatron multiplies a (loss, stats) loss by the CP size (DDP averages over DP x CP)
            return loss * n_mb, {"loss": loss.detach()}

        return output, loss_func

    with hidden_states_output(*heads):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=n_mb, seq_length=L, micro_batch_size=b * (2 if paired else 1),
            forward_only=forward_only)
    if cp_size > 1:
        stats = [_whole_sequence_stats(st, cp_size) for st in stats]
    return stats


def _output_models(model: torch.nn.Module, paired: bool) -> tuple:
    """The models whose outputs loss_fn sees, (policy, reference) when paired, if this rank holds
    the last pipeline stage (the only one with an output layer); () on other stages."""
    models = (model.policy, model.reference) if paired else (model,)
    return models if unwrap_model(models[0]).post_process else ()


def _whole_sequence_stats(st: dict, cp_size: int) -> dict:
    """One micro-batch's stats from every CP rank: 0-dim summed, [b, L/cp] gathered to [b, L]."""
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group()
    out = {}
    for key, v in st.items():
        if not torch.is_tensor(v) or v.dim() not in (0, 2):
            raise ValueError(f"under context parallelism loss_fn stats must be 0-dim or [b, L/cp] tensors; "
                             f"{key!r} is {type(v).__name__} {tuple(getattr(v, 'shape', ()))}")
        v = v.detach()
        if v.dim() == 0:
            v = v.clone()
            torch.distributed.all_reduce(v, group=group)
            out[key] = v
        else:
            out[key] = gather_sequence(v, 1, group)
    return out


def all_reduce_dp(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a tensor over the data-parallel group (no-op without DP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return t
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    t = t.clone()
    dist.all_reduce(t, op=red, group=ps.get_data_parallel_group())
    return t


def broadcast_from_last_stage(obj: Any) -> Any:
    """Send a picklable object from the last pipeline stage to every stage of this pipeline."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]
