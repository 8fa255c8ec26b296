"""Next-token sampling: temperature, top-k, top-p on the logits of the last position.

The native engine gathers the last position's logits over TP ([batch, padded vocab], one small
all-gather per decoding step; megatron-core's inference forward gathers them anyway) and samples
here on one rank, which then broadcasts the tokens. A vocab-parallel sampler (Gumbel-max per
shard) would avoid the gather but cannot do top-p without a global sort, and the gather is cheap
next to the forward at one position per step.

Order of operations (vLLM's and transformers' order): divide by the temperature, then keep the
top-k, then the smallest top-p nucleus, then draw. The reported log-prob is always the trainer's
quantity, log softmax(logits / T)[token] over the whole (unpadded) vocabulary, NOT the log-prob
under the truncated distribution the token was drawn from: AGRO's behaviour log-probs must be
comparable with the ones the trainer recomputes. Temperature 0 means greedy (argmax); its
log-prob is then taken at T = 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Sampled(NamedTuple):
    tokens: torch.Tensor  # [batch] int64
    logprobs: torch.Tensor  # [batch] float32, log softmax(logits / T)[token]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Logits as fp32 with megatron's vocabulary padding (ids >= vocab_size) removed."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    return logits


def filter_top_k(scaled: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties at the k-th are kept)."""
    if top_k <= 0 or top_k >= scaled.shape[-1]:
        return scaled
    kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
    return scaled.masked_fill(scaled < kth, float("-inf"))


def filter_top_p(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (>= 1 token)."""
    if top_p >= 1.0:
        return scaled
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row by inverting the float64 CDF: one uniform per row, where
    torch.multinomial and the exponential race draw one random number per vocabulary entry
    (the dominant cost of sampling on CPU). Zero-probability tokens are never chosen."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return tokens.clamp_max_(probs.shape[-1] - 1)


def sample(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, vocab_size: int | None = None) -> Sampled:
    """Draw one token per row of `logits` [batch, V]; see the module docstring for semantics."""
    logits = mask_padded_vocab(logits, vocab_size)
    if temperature == 0.0:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        return Sampled(tokens, logp.gather(-1, tokens[:, None])[:, 0])
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if top_k == 1:  # a point mass: no random draw needed
        tokens = scaled.argmax(dim=-1)
    else:
        filtered = filter_top_p(filter_top_k(scaled, top_k), top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = _inverse_cdf(probs, generator)
    return Sampled(tokens, logp.gather(-1, tokens[:, None])[:, 0])
