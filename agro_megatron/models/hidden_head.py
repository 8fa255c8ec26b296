"""Make a megatron GPTModel's last stage return its final hidden states instead of logits.

Why: `agro_megatron.ops.fused_output.fused_output_logprobs` computes log-probs, entropy and KL
from the final hidden states and the vocab-parallel output weight without ever materialising
the [tokens, V/TP] logits. megatron's GPTModel always applies its output layer, so this module
turns that layer, on one model instance, into a pass-through: GPTModel.forward then returns the
final (post-norm) hidden states as [b, s, H] (its usual [s, b] -> [b, s] transpose applies to
them as it would to logits), and the weight the layer would have used (its own, or the tied
embedding weight that GPTModel passes in) is recorded for the loss.

Only the instance's `forward` attribute is replaced, so parameter names, checkpoints and DDP
gradient hooks are untouched; `restore_logits_output` undoes it. It applies where the output
layer's input is the full sequence on every TP rank: without sequence parallelism (with it, the
layer would first gather the sequence; `enable_hidden_states_output` refuses such a layer).
"""
from __future__ import annotations

import contextlib

import torch

_WEIGHT = "_agro_hidden_head_weight"


class HiddenHeadError(ValueError):
    """The model cannot return hidden states for the fused output op."""


def _output_layer(model: torch.nn.Module):
    from agro_megatron.models import unwrap_model

    gpt = unwrap_model(model)
    if not getattr(gpt, "post_process", False) or getattr(gpt, "output_layer", None) is None:
        raise HiddenHeadError("hidden-states output needs the last pipeline stage of a GPTModel "
                              "(post_process=True, with an output_layer)")
    return gpt, gpt.output_layer


def enable_hidden_states_output(model: torch.nn.Module) -> None:
    """From now on `model(...)` returns final hidden states [b, s, H] instead of logits."""
    gpt, layer = _output_layer(model)
    if getattr(layer, "sequence_parallel", False):
        raise HiddenHeadError("hidden-states output does not support sequence parallelism (the "
                              "output layer would gather the sequence first); use the logits path")

    def forward(input_, weight=None, runtime_gather_output=None, **_):
        # into the instance dict: Module.__setattr__ would register a Parameter as a new parameter
        # (an extra state_dict key that outlives the hook)
        layer.__dict__[_WEIGHT] = layer.weight if weight is None else weight
        return input_, None

    layer.forward = forward


def restore_logits_output(model: torch.nn.Module) -> None:
    """Undo `enable_hidden_states_output`: `model(...)` returns logits again."""
    _, layer = _output_layer(model)
    layer.__dict__.pop("forward", None)
    layer.__dict__.pop(_WEIGHT, None)


@contextlib.contextmanager
def hidden_states_output(*models: torch.nn.Module):
    """Within the block the models return hidden states (e.g. around the training passes only,
    while a sampler that shares the model instance needs logits outside it)."""
    done = []
    try:
        for m in models:
            enable_hidden_states_output(m)
            done.append(m)
        yield
    finally:
        for m in done:
            restore_logits_output(m)


def returns_hidden_states(model: torch.nn.Module) -> bool:
    """Whether `model(...)` currently returns hidden states (False off the last stage)."""
    try:
        return "forward" in _output_layer(model)[1].__dict__
    except HiddenHeadError:
        return False


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's vocab shard [V/TP, H] of the output weight, as the output layer would use it.

    The Parameter itself (or the tied embedding weight), so gradients reach it through autograd.
    """
    gpt, layer = _output_layer(model)
    w = getattr(layer, _WEIGHT, None)
    if w is not None:
        return w
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
        else layer.weight
