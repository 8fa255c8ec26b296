"""Build a rollout engine by name: the one place an engine name is read.

Engines are imported inside `make_engine`, so the protocol (base.py) and the engines (native.py,
vllm_engine.py) never import each other, and vLLM is imported only when asked for.
"""
from __future__ import annotations

from typing import Any

from agro_megatron.rollout.base import RolloutEngine

ENGINE_KINDS = ("native", "vllm")


def make_engine(kind: str, model: Any = None, **kwargs) -> RolloutEngine:
    """Build a rollout engine by name ("native" or "vllm"); `kwargs` go to the engine."""
    if kind == "native":
        from agro_megatron.rollout.native import NativeEngine

        if model is None:
            raise ValueError("the native engine samples from the training model: pass model=")
        return NativeEngine(model, **kwargs)
    if kind == "vllm":
        from agro_megatron.rollout.vllm_engine import VLLMEngine, import_vllm

        import_vllm()  # without vllm: say how to get it, before the engine's own arguments are checked
        return VLLMEngine(model, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
