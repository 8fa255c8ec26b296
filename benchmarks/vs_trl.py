"""Our on-policy RL step against TRL's GRPOTrainer on the same workload, side by side.

What a new user would compare on one machine: the README demo's SFT model (exported to HF with
`agro-convert export`), its training prompts and the MATH reward, n=8 responses x 8 prompts per
step, up to 24 new tokens at T=1, beta=0.1, fp32, Adam (lr 1e-4, betas 0.9/0.95, no weight decay,
clip 1.0, constant schedule), on the CPU. Each round runs our `agro-train` and then TRL's
`GRPOTrainer` as fresh processes, `--steps` steps each; the first `--warmup` steps of every process
are dropped (allocator and cache warm-up) and the medians are taken over all rounds, so slow
drifts of the machine hit both sides alike.

What still differs between the two (printed in full before the last line):
* the objective: ours is AGRO (agro_on); TRL's is GRPO with its own loss normalisation. Both do
  one forward+backward of the policy per step and need log pi_ref, so the work per token matches;
* ours samples with the native Megatron-core sampler (KV cache), TRL with HF `generate`;
* ours runs through megatron-core (gloo process group, the pipeline schedule), TRL through HF
  Trainer / accelerate;
* `--ours-logprobs` (default `engine`): our log pi comes from the sampler and only the reference
  runs a log-prob pass (TRL does the same: with one iteration per batch it skips the old-policy
  pass). `recompute` is our exact path, also timed and printed;
* a step's time is its wall time: ours `time/step_s` (train/loop.py), TRL's from
  `on_step_begin` to `on_step_end` (generation, reward, reference pass, loss, optimizer).
Start-up (model loading, conversion, the reward sandbox's warm-up) is outside the steps on both
sides; both warm the reward sandbox before step 1.

Needs `pip install -e ".[bench]"` (trl). Last line: `trl_over_ours=<median TRL step s / ours>`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "tiny_cpu.yaml")
STEP = {"prompts": 8, "n": 8, "max_new_tokens": 24, "temperature": 1.0, "beta": 0.1, "lr": 1e-4}


def _run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if p.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"vs_trl: {' '.join(cmd[:3])} ... exited {p.returncode}:\n{tail}")


def _common_overrides() -> list[str]:
    return [f"train.prompts_per_step={STEP['prompts']}", f"rollout.n={STEP['n']}",
            f"rollout.max_new_tokens={STEP['max_new_tokens']}", f"rollout.temperature={STEP['temperature']}",
            f"algorithm.beta={STEP['beta']}", f"optim.lr={STEP['lr']}", "model.dtype=fp32",
            "logging.plots=false", "logging.progress=false"]


def prepare(work: str) -> tuple[str, str]:
    """The demo's SFT model as an HF checkpoint (with its tokenizer) and the demo's training prompts."""
    hf, prompts = os.path.join(work, "hf"), os.path.join(work, "prompts.jsonl")
    if os.path.exists(os.path.join(hf, "config.json")) and os.path.exists(prompts):
        return hf, prompts
    sft = os.path.join(work, "sft")
    print("vs_trl: SFT warm-up of the README demo (train.steps=0) ...", flush=True)
    _run(["agro-train", DEMO, f"logging.dir={sft}", "train.steps=0", "eval.max_problems=1", "eval.n=1",
          *_common_overrides()], os.path.join(work, "sft.log"))
    with open(os.path.join(sft, "result.json")) as f:
        final = json.load(f)["final_model"]
    _run(["agro-convert", "export", "--megatron", final, "--out", hf, "--quiet"], os.path.join(work, "export.log"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(sft, "tokenizer", name), hf)

    from agro_megatron.config import JobConfig
    from agro_megatron.data import format_prompt, load_tokenizer
    from agro_megatron.train.inputs import select_problems

    cfg = JobConfig.load(DEMO, [f"logging.dir={sft}"])
    tok = load_tokenizer(hf)
    train, _ = select_problems(cfg.data, tok, None, cfg.data.max_prompt_tokens)
    with open(prompts, "w") as f:
        for p in train:
            text = format_prompt(p, tok, system_prompt=None)
            # TRL tokenizes with the tokenizer's special tokens, which prepend <|begin_of_text|>
            text = text[len(tok.bos_token):] if text.startswith(tok.bos_token) else text
            f.write(json.dumps({"prompt": text, "answer": p.answer}) + "\n")
    return hf, prompts


def ours(work: str, hf: str, steps: int, tag: str, logprobs: str) -> list[float]:
    log_dir = os.path.join(work, f"ours-{tag}")
    shutil.rmtree(log_dir, ignore_errors=True)
    _run(["agro-train", DEMO, f"logging.dir={log_dir}", f"model.hf_checkpoint={hf}", f"model.tokenizer={hf}",
          "sft.steps=0", f"train.steps={steps}", "eval.every=0", "eval.max_problems=1", "eval.n=1",
          "checkpoint.save_every=0", f"train.logprobs={logprobs}", *_common_overrides()],
         os.path.join(work, f"ours-{tag}.log"))
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["time/step_s"] for r in rows if "time/step_s" in r]


def run_trl(work: str, hf: str, prompts: str, steps: int, tag: str) -> list[float]:
    out = os.path.join(work, f"trl-{tag}.json")
    _run([sys.executable, os.path.abspath(__file__), "--trl-worker", hf, prompts, str(steps), out],
         os.path.join(work, f"trl-{tag}.log"))
    with open(out) as f:
        return json.load(f)["step_s"]


def trl_worker(hf: str, prompts: str, steps: int, out: str) -> None:
    """One TRL GRPOTrainer run; writes the wall seconds of every step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from agro_megatron.rewards import score_batch
    from agro_megatron.rewards.math import warm

    with open(prompts) as f:
        rows = [json.loads(line) for line in f]
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype="float32")

    def math_reward(completions, answer, **_):
        return score_batch(list(completions), list(answer))

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=STEP["prompts"] * STEP["n"], num_generations=STEP["n"],
            max_completion_length=STEP["max_new_tokens"], temperature=STEP["temperature"], beta=STEP["beta"],
            learning_rate=STEP["lr"], adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
            lr_scheduler_type="constant", warmup_steps=0, max_steps=steps, logging_steps=1, report_to="none",
            save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=1234, disable_dropout=True,
            dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, callbacks=[StepTimer()])
        warm()
        trainer.train()
    with open(out, "w") as f:
        json.dump({"step_s": times}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every process")
    ap.add_argument("--ours-logprobs", default="engine", choices=("engine", "recompute"))
    ap.add_argument("--work", default=None, help="working dir (default: a temp dir); reused if it holds a model")
    ap.add_argument("--trl-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        hf, prompts, steps, out = args.trl_worker
        return trl_worker(hf, prompts, int(steps), out)
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        sys.exit('vs_trl: needs TRL: pip install -e ".[bench]"')
    work = args.work or tempfile.mkdtemp(prefix="agro-vs-trl-")
    os.makedirs(work, exist_ok=True)
    hf, prompts = prepare(work)
    sides = {f"ours ({args.ours_logprobs})": [], "ours (recompute)": [], "TRL GRPOTrainer": []}
    if args.ours_logprobs == "recompute":
        del sides["ours (recompute)"]
    for r in range(args.rounds):
        for name in sides:
            t = time.perf_counter()
            if name.startswith("ours"):
                mode = name[len("ours ("):-1]
                steps = ours(work, hf, args.steps, f"{mode}-{r}", mode)
            else:
                steps = run_trl(work, hf, prompts, args.steps, str(r))
            sides[name] += steps[args.warmup:]
            print(f"round {r + 1}/{args.rounds} {name}: {len(steps)} steps, median "
                  f"{statistics.median(steps[args.warmup:]):.3f} s/step (process {time.perf_counter() - t:.0f} s)",
                  flush=True)
    med = {name: statistics.median(v) for name, v in sides.items()}
    print(f"\nworkload: {STEP['prompts']} prompts x n={STEP['n']}, <= {STEP['max_new_tokens']} new tokens, "
          f"T={STEP['temperature']}, beta={STEP['beta']}, fp32, Adam lr={STEP['lr']}; "
          f"{args.rounds} rounds x {args.steps - args.warmup} timed steps per side")
    for name, m in med.items():
        print(f"  {name:<22} median {m:.3f} s/step  (n={len(sides[name])})")
    print(f"  ours (recompute) / ours ({args.ours_logprobs}) = "
          f"{med.get('ours (recompute)', med[f'ours ({args.ours_logprobs})']) / med[f'ours ({args.ours_logprobs})']:.2f}")
    print(f"trl_over_ours={med['TRL GRPOTrainer'] / med[f'ours ({args.ours_logprobs})']:.3f}")


if __name__ == "__main__":
    main()
