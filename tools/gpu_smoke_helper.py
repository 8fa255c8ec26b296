"""Python side of tools/gpu_smoke.sh: the checks that are easier in Python than in bash.

    python tools/gpu_smoke_helper.py env                      facts about this machine (JSON)
    python tools/gpu_smoke_helper.py missing-deps             setup.py's CORE requirements not satisfied here
    python tools/gpu_smoke_helper.py cuda-stack               CUDA device, bf16 matmul, a 1-rank NCCL all-reduce
    python tools/gpu_smoke_helper.py fused-loss-op --device D vocab_parallel_logprobs vs float64 log_softmax
    python tools/gpu_smoke_helper.py build-hf OUT             a tiny HF Llama-3 written by transformers
    python tools/gpu_smoke_helper.py train --spec S -- ARGS   agro-train ARGS with the layer spec forced
    python tools/gpu_smoke_helper.py check-run DIR ...        a finished agro-train run's files
    python tools/gpu_smoke_helper.py compare-export CKPT HF   exported HF logits vs the Megatron checkpoint's

Each command prints what it checked and exits 0, or prints the reason on its last line and exits 1.
Only imports what the command needs, so `env` and `missing-deps` work before anything is installed.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model: vLLM's attention kernels want head_dim >= 64; GQA (4 heads, 2 KV groups) so
# TP=2 splits the KV heads; hidden 128 != heads x head_dim (256), as megatron's kv_channels allows.
TINY = dict(vocab_size=300, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, head_dim=64)

# dist name in setup.py -> module to import
IMPORT_NAMES = {"megatron-core": "megatron.core", "pyyaml": "yaml", "math-verify": "math_verify"}


class CheckFailed(Exception):
    pass


def _fail(msg: str):
    raise CheckFailed(msg)


# --------------------------------------------------------------------------- env / deps
def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except BaseException as e:  # noqa: BLE001 - a broken optional package is "not importable"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return True, ""


def cmd_env(args) -> None:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if info["cuda_available"]:
        info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["nccl_available"] = torch.distributed.is_nccl_available()
    for mod in ("vllm", "transformer_engine"):
        ok, why = _importable(mod if mod != "transformer_engine" else "transformer_engine.pytorch")
        info[mod] = ok
        info[mod + "_error"] = why
    try:
        import agro_megatron
        from agro_megatron.models.llama import te_available

        info["agro_megatron"] = os.path.dirname(os.path.dirname(os.path.abspath(agro_megatron.__file__)))
        info["te_spec"] = te_available()  # what build_model picks by default
    except Exception as e:  # noqa: BLE001
        info["agro_megatron"] = None
        info["agro_megatron_error"] = f"{type(e).__name__}: {e}"[:300]
        info["te_spec"] = False
    text = json.dumps(info)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


def core_requirements() -> list[str]:
    """setup.py's CORE list, read without running setup.py."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CORE" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("setup.py has no CORE list")


def cmd_missing_deps(args) -> None:
    """One requirement per line for each CORE requirement (torch excepted) not satisfied here."""
    from packaging.requirements import Requirement

    for line in core_requirements():
        req = Requirement(line)
        if req.name == "torch":
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            print(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            print(line)
            continue
        ok, _ = _importable(IMPORT_NAMES.get(req.name, req.name.replace("-", "_")))
        if not ok:
            print(line)


# --------------------------------------------------------------------------- CUDA stack
def cmd_cuda_stack(args) -> None:
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        _fail("torch.cuda.is_available() is False")
    dev = torch.device("cuda", 0)
    print(f"device 0: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuDNN {torch.backends.cudnn.version()}")
    if not torch.cuda.is_bf16_supported():
        _fail("this GPU does not support bf16 (model.dtype=bf16 needs Ampere or newer)")
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = torch.randn(256, 512, generator=g, dtype=torch.float64), torch.randn(512, 128, generator=g, dtype=torch.float64)
    ref = a @ b
    err = float(((a.to(dev, torch.bfloat16) @ b.to(dev, torch.bfloat16)).double().cpu() - ref).abs().max()
                / ref.abs().max())
    print(f"bf16 matmul relative error {err:.2e} (tolerance 2e-2)")
    if not err < 2e-2:
        _fail(f"bf16 matmul relative error {err:.2e} > 2e-2")
    if not dist.is_nccl_available():
        _fail("torch.distributed.is_nccl_available() is False: this torch has no NCCL")
    from agro_megatron.testing.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=dev)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        if t.tolist() != [0.0, 1.0, 2.0, 3.0]:
            _fail(f"NCCL all_reduce returned {t.tolist()}")
        v = torch.cuda.nccl.version()
        print(f"NCCL {'.'.join(map(str, v)) if isinstance(v, tuple) else v}: 1-rank all_reduce ok")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- fused loss op
def cmd_fused_loss_op(args) -> None:
    """vocab_parallel_logprobs (one rank: the whole vocabulary) against float64 log_softmax + autograd."""
    import torch

    from agro_megatron.ops import vocab_parallel_logprobs

    dev = torch.device(args.device)
    n, vocab, padded = (256, 128256, 128256 + 128) if dev.type == "cuda" else (64, 4000, 4096)
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(n, padded, generator=g, dtype=torch.float64) * 3).to(dev)
    ref_full = (full.cpu() + torch.randn(n, padded, generator=g, dtype=torch.float64)).to(dev)
    target = torch.randint(0, vocab, (n,), generator=g).to(dev)
    target[::7] = -100  # ignored tokens
    ups = [torch.randn(n, generator=g, dtype=torch.float64).to(dev) for _ in range(3)]
    dtypes = [torch.float32, torch.bfloat16] if dev.type == "cuda" else [torch.float32]
    worst = {}
    for dtype in dtypes:
        # inputs rounded to `dtype` once; the reference sees the same rounded values in float64
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for temperature in (1.0, 0.7):
            for chunk in (None, 17):
                z = full.to(dtype).clone().requires_grad_(True)
                zr = ref_full.to(dtype)
                t0 = time.perf_counter()
                out = vocab_parallel_logprobs(z, target, zr, temperature=temperature, chunk_size=chunk,
                                              vocab_size=vocab)
                loss = sum((o.double() * u).sum() for o, u in zip(out, ups))
                loss.backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                x = z.detach().double().requires_grad_(True)
                lp = torch.log_softmax(x[:, :vocab] / temperature, dim=-1)
                lq = torch.log_softmax(zr.double()[:, :vocab] / temperature, dim=-1)
                valid = target != -100
                zero = torch.zeros((), dtype=torch.float64, device=dev)
                ref_lp = torch.where(valid, lp.gather(-1, target.clamp(0).unsqueeze(-1)).squeeze(-1), zero)
                ref_h = torch.where(valid, -(lp.exp() * lp).sum(-1), zero)
                ref_kl = torch.where(valid, (lp.exp() * (lp - lq)).sum(-1), zero)
                ref_loss = sum((r * u).sum() for r, u in zip((ref_lp, ref_h, ref_kl), ups))
                ref_loss.backward()
                errs = {}
                for name, a, b in zip(("logprobs", "entropy", "kl"), out, (ref_lp, ref_h, ref_kl)):
                    errs[name] = float((a.double() - b).abs().max() / max(1.0, float(b.abs().max())))
                gref = x.grad
                errs["grad"] = float((z.grad.double() - gref).abs().max() / max(1.0, float(gref.abs().max())))
                if z.grad.dtype != dtype:
                    _fail(f"gradient dtype {z.grad.dtype} != logits dtype {dtype}")
                if float(z.grad[:, vocab:].abs().max()) != 0.0:
                    _fail("non-zero gradient reached the vocabulary padding columns")
                label = f"{str(dtype).replace('torch.', '')} T={temperature} chunk={chunk}"
                print(f"{label}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" ({dt * 1e3:.0f} ms)")
                for k, v in errs.items():
                    if not v <= tol:
                        _fail(f"{label}: {k} error {v:.2e} > tolerance {tol:.0e}")
                worst[str(dtype)] = max(worst.get(str(dtype), 0.0), *errs.values())
    print(f"fused loss op on {dev} [{n} tokens x {padded} vocab columns, {vocab} real]: worst error "
          + ", ".join(f"{k.replace('torch.', '')} {v:.1e}" for k, v in worst.items())
          + " (tolerance fp32 1e-5, bf16 1e-2; relative to max(1, |ref|))")


# --------------------------------------------------------------------------- tiny HF model
def _warm_up(out: str, steps: int, seed: int) -> str:
    """A few hundred steps of plain-torch SFT (transformers' model, Adam) on the trainer's synthetic
    problems, so that RL starts from a policy that sometimes answers right: with reward variance the
    advantages, gradients and weight updates of every later step are non-zero. A random model never
    writes "The final answer is", every reward is 0, and RL steps would not change a weight."""
    import torch
    from transformers import LlamaForCausalLM

    from agro_megatron.data import encode_sft_example, generate_problems, load_tokenizer

    tok = load_tokenizer(out)
    problems = generate_problems(100, seed=seed, levels=[1])
    examples = [encode_sft_example(p, tok, system_prompt=None) for p in problems]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(a) + len(b) for a, b in examples)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(examples), (32,), generator=g).tolist()
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        ids = torch.full((len(seqs), width), pad)  # one shape for every step: no per-shape kernel set-up
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (i, s) in enumerate(zip(idx, seqs)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            labels[r, len(examples[i][0]):len(s)] = torch.tensor(examples[i][1])
        loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.cpu().save_pretrained(out)
    return f"SFT warm-up {steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no SFT warm-up"


def cmd_build_hf(args) -> None:
    from agro_megatron.testing.tiny_llama import write_tiny_llama

    t0 = time.perf_counter()
    out = write_tiny_llama(args.out, **TINY, seed=args.seed)
    warm = _warm_up(str(out), args.sft_steps, args.seed)
    cfg = json.load(open(os.path.join(out, "config.json")))
    print(f"wrote {out}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV, head_dim {cfg['head_dim']}, "
          f"vocab {cfg['vocab_size']}; {warm} ({time.perf_counter() - t0:.1f} s)")


# --------------------------------------------------------------------------- training wrapper
def cmd_train(args, rest: list[str]) -> int:
    """agro-train with the layer spec chosen: local (megatron-core's torch spec even where TE
    imports), te (TransformerEngine; fails if it does not import), auto (what the model picks)."""
    from agro_megatron.models import llama

    if args.spec == "local":
        llama.te_available = lambda: False
    elif args.spec == "te" and not llama.te_available():
        _fail("--spec te: transformer_engine does not import here (or no CUDA)")
    orig = llama.layer_spec
    reported = []

    def layer_spec(use_te=None, attention="sdpa"):
        spec = orig(use_te, attention=attention)
        if not reported:
            te = llama.te_available() if use_te is None else use_te
            print(f"[gpu_smoke_helper] layer spec: {'transformer_engine' if te else 'local'}", flush=True)
            reported.append(True)
        return spec

    llama.layer_spec = layer_spec
    from agro_megatron.cli.train import main

    return main(rest)


# --------------------------------------------------------------------------- run checks
def cmd_check_run(args) -> None:
    d = args.dir
    res_path = os.path.join(d, "result.json")
    if not os.path.exists(res_path):
        _fail(f"{res_path} missing: the run did not finish")
    res = json.load(open(res_path))
    if res.get("steps") != args.steps:
        _fail(f"result.json says steps={res.get('steps')}, expected {args.steps}")
    recs = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()]
    train_steps = sorted({r["step"] for r in recs if "train/loss" in r})
    if train_steps != list(range(1, args.steps + 1)):
        _fail(f"metrics.jsonl has train/loss at steps {train_steps}, expected 1..{args.steps}")
    import math

    bad = [r["step"] for r in recs if "train/loss" in r and not math.isfinite(r["train/loss"])]
    if bad:
        _fail(f"non-finite train/loss at steps {bad}")
    eval_steps = sorted({r["step"] for r in recs if "eval/accuracy" in r})
    for s in args.eval_at or []:
        if s not in eval_steps:
            _fail(f"no evaluation logged at step {s} (eval/accuracy at steps {eval_steps})")
    if args.offline_fraction is not None:
        fr = [r["data/replay_fraction"] for r in recs if "data/replay_fraction" in r]
        if not fr or any(abs(f - args.offline_fraction) > 1e-6 for f in fr):
            _fail(f"data/replay_fraction {fr}, expected all {args.offline_fraction}")
    if args.expect_updates:
        moved = [r["step"] for r in recs if r.get("train/grad_norm", 0.0) > 0 and r.get("train/loss") is not None]
        if not moved:
            rs = [r.get("train/reward_std") for r in recs if "train/loss" in r]
            _fail(f"no step had a non-zero gradient (train/reward_std per step {rs}): the policy never "
                  "moved, so the update path went untested")
    if args.max_kl is not None:
        kls = [(r["step"], r.get("train/kl_full_vocab", 0.0)) for r in recs if "train/loss" in r]
        worst = max(kls, key=lambda x: x[1]) if kls else (0, 0.0)
        if not worst[1] <= args.max_kl:
            ent = [round(r.get("train/entropy", float("nan")), 3) for r in recs if "train/loss" in r]
            _fail(f"train/kl_full_vocab reached {worst[1]:.4g} at step {worst[0]} (limit {args.max_kl}; entropy per "
                  f"step {ent}): a few small updates should stay near the "
                  "reference; the policy jumped (in bf16: do the optimizer's fp32 main params hold the loaded "
                  "checkpoint, or megatron's random init?)")
    final = os.path.join(d, "final_model")
    if not os.path.exists(os.path.join(final, "agro_checkpoint.json")):
        _fail(f"{final} has no agro_checkpoint.json")
    losses = [round(r["train/loss"], 4) for r in recs if "train/loss" in r]
    gn = [round(r.get("train/grad_norm", float("nan")), 3) for r in recs if "train/loss" in r]
    print(f"{d}: {res['steps']} steps, losses {losses}, grad norms {gn}, eval at steps {eval_steps}, "
          f"accuracy before {res.get('before')} after {res.get('after')}")


# --------------------------------------------------------------------------- export check
def _megatron_logits(ckpt: str, input_ids, dtype: str):
    import torch

    from agro_megatron.checkpoint.load import build_and_load

    model, arch = build_and_load(ckpt, dtype=dtype)
    model.eval()
    dev = next(model.parameters()).device
    ids = input_ids.to(dev)
    pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        out = model(ids, pos, None)
    del model
    return out[..., :arch.vocab_size].float().cpu()


def cmd_compare_export(args) -> None:
    """transformers' forward of the exported HF dir vs the Megatron checkpoint it came from."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from agro_megatron import parallel
    from agro_megatron.checkpoint.convert import read_metadata

    parallel.init_distributed()
    parallel.init_model_parallel(tp=1, pp=1)
    meta = read_metadata(args.megatron)
    tok = AutoTokenizer.from_pretrained(args.hf)
    prompt = "Problem: What is 3 + 4? Put the answer in \\boxed{}.\nSolution:"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = LlamaForCausalLM.from_pretrained(args.hf, dtype=torch.float32, attn_implementation="eager").to(dev).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids.to(dev)).logits.float().cpu()
    del hf
    scale = float(ref.abs().max())
    # fp32 on both sides, same (bf16-representable when trained in bf16) weights: only kernels differ.
    checks = [("fp32", args.fp32_tol)]
    if meta["dtype"] == "bf16":  # and the model as trained: bf16 activations vs transformers' fp32
        checks.append(("bf16", args.bf16_tol))
    msgs = []
    for dtype, tol in checks:
        got = _megatron_logits(args.megatron, ids, dtype)
        if got.shape != ref.shape:
            _fail(f"logit shapes differ: megatron {tuple(got.shape)} vs transformers {tuple(ref.shape)}")
        err = float((got - ref).abs().max()) / scale
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        msgs.append(f"megatron {dtype} vs transformers fp32: max|diff|/max|ref| {err:.2e} "
                    f"(tolerance {tol:.0e}), argmax agreement {agree:.2f}")
        print(msgs[-1])
        if not err <= tol:
            _fail(msgs[-1])
    if args.original:
        base = LlamaForCausalLM.from_pretrained(args.original, dtype=torch.float32,
                                                attn_implementation="eager").eval()
        with torch.no_grad():
            moved = float((base(input_ids=ids).logits.float() - ref).abs().max()) / scale
        print(f"trained vs starting model logits: max|diff|/max|ref| {moved:.2e} (information only)")
    print(f"{len(ids[0])}-token prompt, checkpoint dtype {meta['dtype']}, vocab {ref.shape[-1]}: "
          + "; ".join(msgs))
    parallel.destroy()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="gpu_smoke_helper")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("env")
    s.add_argument("--out", default=None, help="also write the JSON here")
    sub.add_parser("missing-deps")
    sub.add_parser("cuda-stack")
    s = sub.add_parser("fused-loss-op")
    s.add_argument("--device", default="cuda")
    s = sub.add_parser("build-hf")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sft-steps", type=int, default=300, help="plain-torch SFT warm-up steps (0: random weights)")
    s = sub.add_parser("train")
    s.add_argument("--spec", choices=("local", "te", "auto"), default="auto")
    s = sub.add_parser("check-run")
    s.add_argument("dir")
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--eval-at", type=int, nargs="*")
    s.add_argument("--offline-fraction", type=float, default=None)
    s.add_argument("--expect-updates", action="store_true", help="some step must have a non-zero gradient")
    s.add_argument("--max-kl", type=float, default=None, help="largest train/kl_full_vocab allowed in any step")
    s = sub.add_parser("compare-export")
    s.add_argument("megatron")
    s.add_argument("hf")
    s.add_argument("--original", default=None, help="the starting HF model (reports how far training moved)")
    s.add_argument("--fp32-tol", type=float, default=1e-3)
    s.add_argument("--bf16-tol", type=float, default=5e-2)
    args = p.parse_args(argv)
    try:
        if args.cmd == "train":
            return cmd_train(args, rest)
        {"env": cmd_env, "missing-deps": cmd_missing_deps, "cuda-stack": cmd_cuda_stack,
         "fused-loss-op": cmd_fused_loss_op, "build-hf": cmd_build_hf, "check-run": cmd_check_run,
         "compare-export": cmd_compare_export}[args.cmd](args)
    except CheckFailed as e:
        print(f"check failed: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
