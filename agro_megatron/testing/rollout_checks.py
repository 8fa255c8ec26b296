"""Worker functions for tests/test_rollout_native.py (run inside gloo ranks by run_distributed).

The independent reference is the trainer's path: a full-sequence forward through megatron's
forward_backward_func (no KV cache, no padding on the left, positions from 0) and log-probs of the
TP-sharded logits by the trainer's op (ops/vocab_parallel; megatron's vocab_parallel_cross_entropy
negated where that module is absent): log softmax(logits / T)[y].
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from agro_megatron.models.llama import LlamaArch, build_model
from agro_megatron.rollout import SamplingParams, make_engine

# Tiny Llama-3 shape (GQA 4 heads / 2 KV groups, untied). vocab 256 is already a multiple of
# 128 * TP for TP <= 2, so megatron adds no padded ids.
ARCH = LlamaArch(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=500000.0, max_position_embeddings=128)
# megatron's init (std 0.02) gives nearly uniform next-token distributions; scaling the output
# layer makes them peaked, so a sampler bug shows up in the chi-square test.
LOGIT_SCALE = 10.0
PROMPTS = [[3, 17, 200], [5, 6, 7, 8, 9, 10, 11, 12, 13], [42], [100, 101, 102, 103, 104, 105]]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ARCH, dtype="fp32")
    if hasattr(model, "output_layer"):
        with torch.no_grad():
            model.output_layer.weight.mul_(LOGIT_SCALE)
    return model


def _trainer_logprobs(shard: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The trainer's op (ops/vocab_parallel) when present; megatron's CE negated otherwise."""
    try:
        from agro_megatron.ops.vocab_parallel import vocab_parallel_logprobs
    except ImportError:
        from megatron.core import tensor_parallel

        return -tensor_parallel.vocab_parallel_cross_entropy(shard.float().clone() / temperature, labels)
    return vocab_parallel_logprobs(shard, labels, temperature=temperature, vocab_size=ARCH.vocab_size).logprobs


def trainer_forward(model, seqs: list[list[int]], temperature: float = 1.0):
    """Full-sequence forward of right-padded `seqs`. Last stage: (gathered fp32 logits [B, S, V],
    log softmax(logits / T)[next token] [B, S-1] from the sharded logits); other stages: (None, None)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = len(seqs), max(len(q) for q in seqs)
    tokens = torch.zeros(b, s, dtype=torch.long)
    for r, q in enumerate(seqs):
        tokens[r, :len(q)] = torch.tensor(q)
    labels = torch.cat([tokens[:, 1:], torch.zeros(b, 1, dtype=torch.long)], dim=1)
    captured = {}

    def forward_step(_it, m):
        out = m(tokens, torch.arange(s).expand(b, s), None)

        def loss_func(output):
            captured["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()).float().clone()
            captured["logprobs"] = _trainer_logprobs(output.detach(), labels, temperature)[:, :-1]
            return output.sum() * 0, {}

        return out, loss_func

    was_training = model.training
    model.eval()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    model.train(was_training)
    if ps.is_pipeline_last_stage():
        return captured["logits"], captured["logprobs"]
    return None, None


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return t


def _greedy_by_recompute(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy decoding by a full forward of every sequence at every step (no KV cache; right
    padding, which a causal model never attends to from the real positions)."""
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        logits, _ = trainer_forward(model, seqs)
        nxt = torch.zeros(len(seqs), dtype=torch.long)
        if logits is not None:
            for r, q in enumerate(seqs):
                nxt[r] = logits[r, len(q) - 1, :ARCH.vocab_size].argmax()
        for q, t in zip(seqs, _broadcast_from_last_stage(nxt).tolist()):
            q.append(t)
    return [q[len(p):] for q, p in zip(seqs, prompts)]


def _as_lists(results):
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in group] for group in results]


def engine_checks() -> dict:
    """Everything the test asserts, for this rank's layout; grouped to pay one launch."""
    from megatron.core import parallel_state as ps

    model = _model()
    last = ps.is_pipeline_last_stage()
    out: dict = {"last_stage": last}
    # most sequences hit one of 16 stop ids within 12 tokens: exercises stop + batch compaction
    stop = tuple(range(0, ARCH.vocab_size, 16))

    # (1) behaviour log-probs == trainer's recomputation (T != 1, top-p truncation active)
    temp = 0.7
    params = SamplingParams(temperature=temp, top_p=0.95, max_new_tokens=12, stop_token_ids=stop, seed=11)
    for batching in ("pad", "by_length"):
        engine = make_engine("native", model, vocab_size=ARCH.vocab_size, batching=batching)
        res = engine.generate(PROMPTS, 3, params)
        seqs = [p + c.token_ids for p, group in zip(PROMPTS, res) for c in group]
        _, ref = trainer_forward(model, seqs, temperature=temp)
        if last:
            err, k = 0.0, 0
            for p, group in zip(PROMPTS, res):
                for c in group:
                    span = ref[k, len(p) - 1:len(p) - 1 + len(c.token_ids)]
                    err = max(err, float((span - torch.tensor(c.logprobs)).abs().max()))
                    k += 1
            out[f"logprob_err_{batching}"] = err
        out[f"completions_{batching}"] = _as_lists(res)
    out["params_stop"] = stop
    out["max_new_tokens"] = params.max_new_tokens

    # (2) greedy and top_k=1 == a full-recompute greedy loop (no left padding, no cache)
    engine = make_engine("native", model, vocab_size=ARCH.vocab_size, max_batch_size=4096)
    greedy = engine.generate(PROMPTS, 1, SamplingParams(temperature=0.0, max_new_tokens=8))
    topk1 = engine.generate(PROMPTS, 2, SamplingParams(temperature=0.9, top_k=1, max_new_tokens=8, seed=3))
    out["greedy"] = [g[0].token_ids for g in greedy]
    out["topk1"] = [[c.token_ids for c in g] for g in topk1]
    out["greedy_ref"] = _greedy_by_recompute(model, PROMPTS, 8)

    # (3) first-token distribution vs softmax(logits / T); top-k / top-p supports
    prompt, temp = [7, 3, 11], 0.8
    logits, _ = trainer_forward(model, [prompt])
    if last:
        out["first_logits"] = logits[0, -1, :ARCH.vocab_size].double()
    first = {}
    for name, p in {"plain": SamplingParams(temperature=temp, max_new_tokens=1, seed=5),
                    "top_k": SamplingParams(temperature=temp, top_k=5, max_new_tokens=1, seed=6),
                    "top_p": SamplingParams(temperature=temp, top_p=0.6, max_new_tokens=1, seed=7)}.items():
        samples = engine.generate([prompt], 4000, p)[0]
        first[name] = torch.tensor([c.token_ids[0] for c in samples])
    out["first_tokens"], out["first_temperature"] = first, temp

    # (4) determinism for a seed; a different seed differs
    p = SamplingParams(temperature=1.0, max_new_tokens=6, seed=123)
    a, b = engine.generate(PROMPTS, 2, p), engine.generate(PROMPTS, 2, p)
    c = engine.generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=6, seed=124))
    out["det_a"], out["det_b"], out["det_c"] = _as_lists(a), _as_lists(b), _as_lists(c)
    out["model_training_after"] = model.training

    # (5) the engine samples the live model: an in-place update (an optimizer step) is seen as is
    noise = torch.Generator().manual_seed(ps.get_pipeline_model_parallel_rank())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=noise) * 0.5 * param.abs().mean())
    out["greedy_after_step"] = [group[0].token_ids for group in engine.generate(
        PROMPTS, 1, SamplingParams(temperature=0.0, max_new_tokens=4))]
    out["greedy_after_step_ref"] = _greedy_by_recompute(model, PROMPTS, 4)
    return out


def engine_checks_layouts(layouts: list[tuple[int, int]]) -> dict:
    """`engine_checks` for several (TP, PP) layouts in one launch (a launch costs 10-30 s here):
    megatron's parallel state is rebuilt per layout; ranks beyond TP x PP are data-parallel."""
    from agro_megatron import parallel

    return {(tp, pp): (parallel.init_model_parallel(tp=tp, pp=pp, seed=1234), engine_checks())[1]
            for tp, pp in layouts}
