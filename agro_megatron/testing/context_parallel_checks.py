"""Worker functions for tests/test_context_parallel.py (run inside gloo ranks by run_distributed).

The trainer's own path (make_micro_batches -> run_micro_batches with the policy+reference pair ->
vocab-parallel log-probs -> kl_pg surrogate with per-sequence mean -> megatron DDP grads) runs at
CP=1 and at CP x TP x PP layouts with identical weights (platform_checks slices them); the per-token
statistics, the loss and the DP x CP-reduced gradients must agree.
"""
from __future__ import annotations

import torch

from agro_megatron import losses
from agro_megatron.config import JobConfig
from agro_megatron.ops import vocab_parallel_logprobs
from agro_megatron.testing.platform_checks import ARCH, _global_layer_key, _load_full, _tp_slice

BETA = 0.3


def _sequences():
    """Sequences of different lengths (prompt + response), fixed per-token advantages."""
    g = torch.Generator().manual_seed(5)
    lengths = [9, 14, 23, 17, 11]
    prompts = [3, 5, 7, 4, 6]
    seqs = [torch.randint(0, ARCH.vocab_size, (n,), generator=g).tolist() for n in lengths]
    adv = torch.randn(len(seqs), max(lengths), generator=g)
    return seqs, prompts, adv


def _bundle(weights: dict):
    from agro_megatron.train.model_setup import build_policy, build_reference

    cfg = JobConfig.load(None, ["optim.clip_grad=0"])
    bundle = build_policy(cfg, ARCH, lr=1e-3, total_steps=1, with_reference=False)
    _load_full(bundle.module, weights)
    bundle.reference = build_reference(cfg, ARCH, bundle.module)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not zero
        for p in bundle.reference.parameters():
            p.mul_(0.5)
    return bundle


def save_weights(path: str) -> None:
    """Seeded TP=1 weights, shared by every layout."""
    from agro_megatron.models.llama import build_model

    torch.manual_seed(0)
    torch.save({k: v.detach().clone() for k, v in build_model(ARCH, dtype="fp32").named_parameters()}, path)


def run_layout(weights_path: str, reference: dict | None = None) -> dict:
    """Score and one backward of the kl_pg surrogate: per-token stats, loss and grads, or (given
    the CP=1 `reference`) their errors against it."""
    from megatron.core import parallel_state as ps

    from agro_megatron.train.layout import make_micro_batches, scatter_rows
    from agro_megatron.train.pipeline import PolicyWithReference, run_micro_batches

    bundle = _bundle(torch.load(weights_path, weights_only=True))
    seqs, plens, adv = _sequences()
    pp = ps.get_pipeline_model_parallel_world_size()
    mbs = make_micro_batches(seqs, plens, pad_id=0, max_tokens=48, uniform=pp > 1)
    for mb in mbs:
        A = torch.zeros(mb.tokens.shape)
        for j, row in enumerate(mb.index.tolist()):
            if row >= 0:
                A[j, :len(seqs[row])] = adv[row, :len(seqs[row])]
        mb.extra["adv"] = A
    paired = PolicyWithReference(bundle.policy, bundle.reference)
    V = ARCH.vocab_size

    seen_lengths = []  # positions each scoring loss_fn call saw: L/cp under context parallelism

    def score(logits, mb):
        pol, ref = logits
        assert mb.tokens.shape[1] == pol.shape[1]
        seen_lengths.append(pol.shape[1])
        st = vocab_parallel_logprobs(pol, mb.labels, ref_logits=ref, vocab_size=V)
        return torch.zeros(()), {"logp": st.logprobs, "kl": st.kl, "entropy": st.entropy}

    def surrogate(logits, mb):
        pol, ref = logits
        st = vocab_parallel_logprobs(pol, mb.labels, ref_logits=ref, compute_entropy=False, vocab_size=V)
        rows = mb.index >= 0
        loss = losses.surrogate_loss(
            st.logprobs[rows].unsqueeze(1), mb.extra["adv"][rows].unsqueeze(1),
            mb.loss_mask[rows].unsqueeze(1), num_prompts=len(seqs), kl_pg_token_kl=st.kl[rows].unsqueeze(1),
            beta=BETA, logratio_reduction="mean", response_lengths=mb.response_lengths[rows].unsqueeze(1))
        return loss, {"loss": loss.detach()}

    with torch.no_grad():
        stats = run_micro_batches(paired, mbs, score, forward_only=True, paired=True)
    bundle.policy.zero_grad_buffer()
    train_stats = run_micro_batches(paired, mbs, surrogate, forward_only=False, paired=True)
    stage, per_stage = ps.get_pipeline_model_parallel_rank(), ARCH.num_layers // pp
    grads = {_global_layer_key(name, stage, per_stage): (p, p.main_grad.detach().clone())
             for name, p in bundle.module.named_parameters()}
    last = ps.is_pipeline_last_stage()
    if last:
        L = max(len(s) for s in seqs)
        tokens = {k: scatter_rows(stats, mbs, k, len(seqs), L) for k in ("logp", "kl", "entropy")}
        mask = scatter_rows([{"m": mb.loss_mask} for mb in mbs], mbs, "m", len(seqs), L).bool()
        loss = sum(float(s["loss"]) for s in train_stats)
    if reference is None:
        out = {"grads": {k: g for k, (_, g) in grads.items()}}
        if last:
            out.update(tokens=tokens, mask=mask, loss=loss)
        return out
    worst = 0.0
    for key, (p, g) in grads.items():
        ref = _tp_slice(reference["grads"][key], p, key)
        worst = max(worst, float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    attention = {type(m).__name__ for m in bundle.module.modules() if "Attention" in type(m).__name__}
    out = {"grad_rel_err": worst, "attention": attention}
    if last:
        out["seen_lengths"] = sorted(seen_lengths)
        out["full_lengths"] = sorted(mb.tokens.shape[1] for mb in mbs)
        m = reference["mask"]
        out["token_err"] = {k: float((tokens[k] - reference["tokens"][k])[m].abs().max()) for k in tokens}
        out["loss_err"] = abs(loss - reference["loss"]) / abs(reference["loss"])
        out["kl_max"] = float(reference["tokens"]["kl"][m].abs().max())
    return out
