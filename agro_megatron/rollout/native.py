"""The native rollout engine: sample from the live Megatron-core training model at any TP x PP.

Why a native engine: tests, CPU runs and small jobs need rollouts without vLLM, and sampling from
the training model itself means there are no weights to synchronise (`update_weights` only swaps
the reference).

How:
* KV cache and incremental forward: rollout/kv_cache.py (the model's own modules, RoPE-applied
  key cache, per-row positions; see there why not megatron's StaticInferenceContext).
* Prompts of different lengths share a batch by LEFT padding: all rows write the same cache slot
  each step, a boolean mask hides pad keys, and each row's RoPE positions start at 0 at its first
  real token, so the computation matches the trainer's unpadded forward up to float rounding.
* The last stage computes the last position's logits gathered over TP ([batch, V]) and samples
  there (rollout/sampling.py); its TP rank 0 broadcasts (token, log-prob) over its TP group,
  then over every PP group, so all ranks of the model-parallel group hold identical results.
* PP: hidden states [s, b, h] go stage to stage with torch.distributed send/recv.
* Finished rows keep decoding (outputs discarded) until a quarter of the batch is done; then
  the batch and its KV cache are compacted to the rows still running.

Determinism: the draws come from one generator seeded with `SamplingParams.seed` on the sampling
rank; results are a function of (seed, prompts, n, params, max_batch_size, weights).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from agro_megatron.models import unwrap_model
from agro_megatron.rollout.base import Completion, SamplingParams, validate_prompts
from agro_megatron.rollout.kv_cache import KVCache, StageDecoder
from agro_megatron.rollout.sampling import sample

BATCHING = ("pad", "by_length")


class _Topology:
    """Who is first/last stage, who samples, and where hidden states and tokens travel."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.driver = self.last and ps.get_tensor_model_parallel_rank() == 0
        self.tp_group, self.tp_src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_last = ps.get_pipeline_model_parallel_last_rank()
        self.next = None if self.last else ps.get_pipeline_model_parallel_next_rank()
        self.prev = None if self.first else ps.get_pipeline_model_parallel_prev_rank()

    def share_from_driver(self, buf: torch.Tensor) -> torch.Tensor:
        """The driver's `buf` on every rank of this model-parallel group."""
        if self.tp > 1 and self.last:
            dist.broadcast(buf, src=self.tp_src, group=self.tp_group)
        if self.pp > 1:
            dist.broadcast(buf, src=self.pp_last, group=self.pp_group)
        return buf


class NativeEngine:
    """Sampler over the training model (a megatron GPTModel stage, possibly DDP/Float16-wrapped).

    `vocab_size`: the tokenizer's vocabulary; ids from megatron's padding (>= vocab_size) are
    never sampled and excluded from the log-softmax (the trainer must exclude them likewise).
    `max_batch_size`: sequences decoded together (bounds the KV cache). `batching`: "pad" (left
    padding + mask, any prompt lengths in one batch) or "by_length" (one batch per prompt length,
    no padding; a cross-check and a fallback).
    """

    def __init__(self, model: Any, *, vocab_size: int | None = None, max_batch_size: int = 256,
                 batching: str = "pad", pad_token_id: int = 0):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.vocab_size, self.max_batch_size = vocab_size, max_batch_size
        self.pad_token_id, self.batching = pad_token_id, batching
        self.update_weights(model)

    # -- protocol ------------------------------------------------------------------------------
    def update_weights(self, model: Any) -> None:
        """Sample from `model` from now on. The engine holds the training model itself, so this is
        a reference swap: the optimizer's in-place updates are already visible."""
        if isinstance(model, (list, tuple)):
            if len(model) != 1:
                raise NotImplementedError(
                    f"got {len(model)} model chunks (virtual pipeline parallelism); the native "
                    "engine needs one chunk per rank: disable virtual PP or use the vLLM engine")
            model = model[0]
        gpt = unwrap_model(model)  # under DDP / Float16Module / PolicyWithReference
        self.model, self.decoder = model, StageDecoder(gpt)
        self.config = gpt.config
        self.max_positions = getattr(gpt, "max_sequence_length", None)
        self.device = next(gpt.parameters()).device

    def sleep(self) -> None:
        """No-op: the KV cache lives only inside `generate`, and the weights are the trainer's."""

    def wake(self) -> None:
        """No-op (see `sleep`)."""

    def close(self) -> None:
        """No-op: the engine holds nothing of its own between calls."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        """`n` completions per prompt (collective over the model-parallel group; see base.py)."""
        prompts = validate_prompts(prompts, n, self.vocab_size)
        if self.max_positions is not None:
            longest = max((len(p) for p in prompts), default=0)
            if longest + params.max_new_tokens > self.max_positions:
                raise ValueError(
                    f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                    f"the model's {self.max_positions} positions: shorten prompts or max_new_tokens")
        topo = _Topology()
        generator = None
        if topo.driver and params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        try:
            for chunk in self._chunks(prompts, n):
                outs = self._generate_batch([prompts[i] for i, _ in chunk], params, generator, topo)
                for (i, j), out in zip(chunk, outs):
                    results[i][j] = out
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    # -- batching ------------------------------------------------------------------------------
    def _chunks(self, prompts: list[list[int]], n: int) -> list[list[tuple[int, int]]]:
        """(prompt, sample) pairs grouped into batches, longest prompts first (less padding)."""
        seqs = sorted(((i, j) for i in range(len(prompts)) for j in range(n)),
                      key=lambda s: -len(prompts[s[0]]))
        groups: list[list[tuple[int, int]]] = []
        if self.batching == "by_length":
            for s in seqs:
                if groups and len(prompts[groups[-1][0][0]]) == len(prompts[s[0]]):
                    groups[-1].append(s)
                else:
                    groups.append([s])
        else:
            groups = [seqs]
        return [g[k:k + self.max_batch_size] for g in groups for k in range(0, len(g), self.max_batch_size)]

    # -- one static batch ----------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                 mask: torch.Tensor | None, topo: _Topology) -> torch.Tensor | None:
        """Run this stage at cache slots start.. ; the last stage returns logits [b, V]."""
        b, s = tokens.shape
        hidden = None
        dtype = self.config.params_dtype
        if not topo.first:
            hidden = torch.empty(s, b, self.config.hidden_size, dtype=dtype, device=self.device)
            dist.recv(hidden, src=topo.prev)
        out = self.decoder.forward(tokens, positions, hidden, cache, start, mask)
        if not topo.last:
            dist.send(out.to(dtype).contiguous(), dst=topo.next)
            return None
        return out

    def _sample(self, logits, params: SamplingParams, generator, b: int, topo: _Topology):
        buf = torch.empty(b, 2, dtype=torch.float64, device=self.device)
        if topo.driver:
            s = sample(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                       generator=generator, vocab_size=self.vocab_size)
            buf[:, 0], buf[:, 1] = s.tokens, s.logprobs
        buf = topo.share_from_driver(buf).cpu()
        return buf[:, 0].long(), buf[:, 1].float()

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator,
                        topo: _Topology) -> list[Completion]:
        b, dev = len(prompts), self.device
        lens = torch.tensor([len(p) for p in prompts])
        width, max_new = int(lens.max()), params.max_new_tokens
        slots = width + max_new - 1  # the last sampled token is never fed back
        n_pad = (width - lens).to(dev)  # left padding of each row
        tokens = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            tokens[r, width - len(p):] = torch.tensor(p)
        tokens = tokens.to(dev)
        slot_ids = torch.arange(slots, device=dev)
        real = slot_ids[None, :] >= n_pad[:, None]  # [b, slots]: slot holds a real token
        padded = bool((n_pad > 0).any())
        if padded and self.batching == "by_length":
            raise AssertionError("by_length batching produced a padded batch")

        cache = self.decoder.new_cache(b, slots, self.config.params_dtype, dev)
        positions = (slot_ids[None, :width] - n_pad[:, None]).clamp_min(0)
        mask = None
        if padded:  # causal, no pad keys; a pad query attends to itself only (no empty rows)
            causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
            eye = torch.eye(width, dtype=torch.bool, device=dev)
            mask = ((causal[None] & real[:, None, :width]) | eye[None])[:, None]
        logits = self._forward(tokens, positions, cache, 0, mask, topo)

        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long)
        out_tokens: list[list[int]] = [[] for _ in range(b)]
        out_logprobs: list[list[float]] = [[] for _ in range(b)]
        finish: list[str | None] = [None] * b
        rows = torch.arange(b)  # original index of each row of the current batch
        running = torch.ones(b, dtype=torch.bool)  # per current row
        for step in range(max_new):
            tok, lp = self._sample(logits, params, generator, len(rows), topo)
            stopped = torch.isin(tok, stop_ids) & running
            for o, t, l, live, st in zip(rows.tolist(), tok.tolist(), lp.tolist(), running.tolist(),
                                         stopped.tolist()):
                if live:
                    out_tokens[o].append(t)
                    out_logprobs[o].append(l)
                    if st:
                        finish[o] = "stop"
            running &= ~stopped
            if step == max_new - 1 or not running.any():
                break
            if int(running.sum()) <= 3 * len(rows) // 4:  # compact batch and KV cache
                keep = running.nonzero()[:, 0]
                keep_dev = keep.to(dev)
                cache.select(keep_dev)
                rows, tok, n_pad, real = rows[keep], tok[keep], n_pad[keep_dev], real[keep_dev]
                running = torch.ones(len(rows), dtype=torch.bool)
            slot = width + step
            mask = real[:, None, None, :slot + 1] if padded else None
            logits = self._forward(tok[:, None].to(dev), (slot - n_pad)[:, None], cache, slot, mask, topo)
        return [Completion(out_tokens[o], out_logprobs[o], finish[o] or "length") for o in range(b)]
