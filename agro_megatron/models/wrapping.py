"""The bare model inside the wrappers training puts around it: the one unwrapping rule.

megatron's DistributedDataParallel and Float16Module, and the trainer's PolicyWithReference pair
(train/pipeline.py; its `.module` is the policy), each hold what they wrap in `.module`. The bare
model is a GPTModel pipeline stage: the first object on that chain with a `decoder`.
"""
from __future__ import annotations

from typing import Any

_MAX_DEPTH = 16  # wrappers nest two or three deep; a longer chain is a `.module` loop


def unwrap_model(model: Any) -> Any:
    """The bare GPTModel stage inside DDP / Float16Module / PolicyWithReference wrappers.

    Follows `.module` until an object with a `decoder` (a GPTModel stage); an object with neither
    is returned as it is (nothing left to unwrap). A list or tuple of virtual-pipeline chunks is
    refused: unwrap each chunk.
    """
    if isinstance(model, (list, tuple)):
        raise TypeError(f"unwrap_model takes one model, got a {type(model).__name__} of {len(model)} "
                        "(virtual-pipeline chunks?): unwrap each chunk")
    for _ in range(_MAX_DEPTH):
        if hasattr(model, "decoder"):
            return model
        inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    raise TypeError(f"more than {_MAX_DEPTH} nested `.module` wrappers around {type(model).__name__}: "
                    "is there a wrapper loop?")
