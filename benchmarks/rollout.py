"""Native rollout engine vs transformers `generate`: same tiny Llama-3 weights, same prompts.

Both use a KV cache, sample at T = 1 with no top-k / top-p, and generate exactly
--max-new-tokens per sequence (no stop tokens), n samples per prompt, prompts of different
lengths (left-padded on both sides). One process, TP = PP = 1, fp32 on CPU (or CUDA if present).
Before timing, the Megatron logits of a prompt are checked against transformers'.

    python benchmarks/rollout.py [--max-new-tokens 256] [--prompts 8] [--n 4] [--repeats 2] [--threads 1]

Runs alternate between the engines and the best of each is kept (the machine may be shared);
rates per CPU-second of this process are printed too, as a load-independent cross-check.

Last line: tokens_per_s=<native> ratio_vs_transformers=<native / transformers>.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from agro_megatron.models.llama import LlamaArch

ARCH = LlamaArch(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                 num_kv_heads=4, head_dim=32, rope_theta=500000.0, max_position_embeddings=1024,
                 torch_dtype="float32")


def hf_to_megatron_(hf_model, mg_model, arch: LlamaArch) -> None:
    """Copy HF Llama weights into a TP=1/PP=1 megatron GPTModel through the one mapping table."""
    from agro_megatron.checkpoint.mapping import hf_to_megatron, parse_megatron_name

    hf = hf_model.state_dict()
    with torch.no_grad():
        for name, param in mg_model.named_parameters():
            w = parse_megatron_name(name)
            if w is None:
                raise RuntimeError(f"{name} is not in checkpoint/mapping.py's table")
            param.copy_(hf_to_megatron(arch, w, hf, tp=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine (best is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from agro_megatron import parallel
    from agro_megatron.models.llama import build_model
    from agro_megatron.rollout import SamplingParams, make_engine
    import transformers

    parallel.init_distributed()
    parallel.init_model_parallel(tp=1, pp=1, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH.to_hf_config())).to(device).eval()
    mg = build_model(ARCH, dtype="fp32").to(device)
    hf_to_megatron_(hf, mg, ARCH)

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, ARCH.vocab_size, (int(length),), generator=g).tolist()
               for length in torch.randint(16, 65, (args.prompts,), generator=g)]
    with torch.no_grad():  # same model? (megatron's forward is [b, s] -> [b, s, V] like HF's)
        ids = torch.tensor([prompts[0]], device=device)
        ref = hf(ids).logits
        mg.eval()
        got = mg(ids, torch.arange(ids.shape[1], device=device)[None], None)
        err = float((ref - got).abs().max())
    print(f"model: {ARCH.num_layers} layers, hidden {ARCH.hidden_size}, vocab {ARCH.vocab_size}; "
          f"megatron vs transformers max |logit diff| = {err:.2e}")
    if err > 1e-3:
        raise SystemExit("the two models differ: the weight copy is wrong")

    engine = make_engine("native", mg, vocab_size=ARCH.vocab_size)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    attn = torch.zeros_like(batch)
    for r, p in enumerate(prompts):
        batch[r, width - len(p):], attn[r, width - len(p):] = torch.tensor(p), 1
    batch, attn = batch.to(device), attn.to(device)

    def run_native(max_new):
        out = engine.generate(prompts, args.n, SamplingParams(
            temperature=1.0, max_new_tokens=max_new, seed=params.seed))
        return sum(len(c.token_ids) for group in out for c in group)

    def run_hf(max_new):
        with torch.no_grad():
            out = hf.generate(input_ids=batch, attention_mask=attn, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=max_new, min_new_tokens=max_new,
                              num_return_sequences=args.n, use_cache=True, pad_token_id=0)
        return (out.shape[1] - width) * out.shape[0]

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = fn(args.max_new_tokens)
        return tokens, tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)

    run_native(4), run_hf(4)  # warm-up
    expected = args.prompts * args.n * args.max_new_tokens
    best = {"native": (0.0, 0.0), "hf": (0.0, 0.0)}
    for _ in range(args.repeats):  # interleaved, best of each: robust to load from other processes
        for name, fn in (("native", run_native), ("hf", run_hf)):
            tokens, wall, cpu = timed(fn)
            if tokens != expected:
                raise SystemExit(f"{name} generated {tokens} tokens, expected {expected}")
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    (native, native_cpu), (ref_rate, ref_cpu) = best["native"], best["hf"]
    print(f"{args.prompts} prompts (16-64 tokens) x n={args.n}, {args.max_new_tokens} new tokens each, "
          f"T=1, KV cache, {torch.get_num_threads()} threads, device {device}")
    print(f"native megatron engine: {native:10.1f} tokens/s wall, {native_cpu:10.1f} per CPU-second")
    print(f"transformers generate : {ref_rate:10.1f} tokens/s wall, {ref_cpu:10.1f} per CPU-second "
          f"(transformers {transformers.__version__})")
    print(f"tokens_per_s={native:.1f} ratio_vs_transformers={native / ref_rate:.2f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
