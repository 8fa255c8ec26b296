"""Worker functions for the trainer tests (run inside gloo ranks by run_distributed)."""
from __future__ import annotations

import os
import signal

import torch

from agro_megatron.config import JobConfig


def tiny_config(log_dir: str, **overrides) -> JobConfig:
    """A seconds-long job: 2-layer model, 4 prompts x 2 responses, 8 new tokens, no SFT."""
    base = [
        f"logging.dir={log_dir}", "logging.progress=false", "logging.plots=false",
        "model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
        "data.synthetic_levels=[1, 2]", "data.synthetic_train_size=64", "data.synthetic_heldout_size=8",
        "data.system_prompt=null", "rollout.n=2", "rollout.max_new_tokens=8", "train.steps=4",
        "train.prompts_per_step=4", "sft.steps=0", "eval.max_problems=4", "eval.every=0", "optim.lr=1e-3",
        "checkpoint.save_every=1", "checkpoint.keep_last=3",
    ]
    return JobConfig.load(None, base + [f"{k}={v}" for k, v in overrides.items()])


def length_reward(responses, truths):
    """A deterministic, non-constant stand-in for the MATH reward (the model is untrained)."""
    return [float(len(r) % 3 == 0) for r in responses]


_calls = {"n": 0}


def sigterm_on_third_call(responses, truths):
    """Reward that delivers SIGTERM to this process during the 3rd step, as Slurm/torchrun would."""
    _calls["n"] += 1
    if _calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return length_reward(responses, truths)


def nan_reward_on_second_call(responses, truths):
    _calls["n"] += 1
    out = length_reward(responses, truths)
    if _calls["n"] == 2:
        out[0] = float("nan")
    return out


def always_nan_reward(responses, truths):
    return [float("nan")] * len(responses)


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.bundle.module.state_dict().items()
            if torch.is_tensor(v)}


def _losses(trainer) -> list:
    return [(r["step"], r["train/loss"]) for r in trainer.metrics.history if "train/loss" in r]


def run(log_dir: str, reward: str, overrides: dict) -> dict:
    """run_job with a named reward function; returns losses, final weights and status."""
    from agro_megatron.train.run import run_job

    _calls["n"] = 0
    cfg = tiny_config(log_dir, **overrides)
    try:
        result = run_job(cfg, reward_fn=globals()[reward])
    except RuntimeError as e:
        return {"error": str(e)}
    trainer = result.pop("trainer")
    return {"stopped": result.get("stopped", False), "steps": result["steps"], "losses": _losses(trainer),
            "weights": _weights(trainer), "history": trainer.metrics.history,
            "layout": {"tp": trainer.context.layout.tp, "pp": trainer.context.layout.pp, "cp": trainer.context.layout.cp,
                       "dp": trainer.context.layout.dp}}


def run_each(root: str, runs: dict) -> dict:
    """Several `run` jobs, one after another in this process group: {name: (reward, overrides)}.

    For tests that need independent short runs but not fresh processes (a launch costs more than
    a tiny run); each run gets its own directory under `root`.
    """
    return {name: run(os.path.join(root, name), reward, overrides) for name, (reward, overrides) in runs.items()}


def run_killed_during_save(log_dir: str, kill_at_step: int) -> None:
    """Run with save_every=1; die abruptly (os._exit, like SIGKILL) inside the save of `kill_at_step`."""
    from megatron.core import dist_checkpointing

    from agro_megatron.train.run import run_job

    real_save = dist_checkpointing.save

    def dying_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        if f"step_{kill_at_step:06d}" in str(checkpoint_dir):
            real_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)  # files written ...
            os._exit(9)                                                     # ... but never completed
        return real_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    dist_checkpointing.save = dying_save
    run_job(tiny_config(log_dir), reward_fn=length_reward)


# Everything a paper config sets that a CPU test cannot have: the 8B checkpoint, MATH files, vLLM,
# and the run length. The rest (TP layout, bf16, algorithm, regime, optimizer, n, temperature) is kept.
SHRINK_PAPER = ["model.megatron_checkpoint=null", "data.train=synthetic", "data.heldout=synthetic",
                "data.synthetic_train_size=32", "data.synthetic_heldout_size=4", "data.system_prompt=null",
                "rollout.engine=native", "rollout.max_new_tokens=8", "train.prompts_per_step=4",
                "train.micro_batch_tokens=512", "eval.max_problems=2", "eval.every=0", "logging.progress=false",
                "logging.plots=false", "checkpoint.save_every=0", "checkpoint.resume=never",
                "model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}"]


def run_paper_configs_shrunk(paths: list[str], root: str, steps: int) -> dict:
    """Each paper config, shrunk (SHRINK_PAPER), through run_job in this process group."""
    from agro_megatron.train.run import run_job

    out = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        cfg = JobConfig.load(path, SHRINK_PAPER + [f"logging.dir={root}/{name}", f"train.steps={steps}",
                                                   f"algorithm.offline_data={root}/{name}/offline.jsonl"])
        result = run_job(cfg, reward_fn=length_reward)
        trainer = result.pop("trainer")
        out[name] = {"steps": result["steps"], "tp": trainer.context.layout.tp, "dtype": cfg.model.dtype,
                     "estimator": cfg.algorithm.estimator, "regime": cfg.algorithm.regime,
                     "losses": [r["train/loss"] for r in trainer.metrics.history if "train/loss" in r],
                     "replay_fraction": [r["data/replay_fraction"] for r in trainer.metrics.history
                                         if "data/replay_fraction" in r]}
    return out


def run_strict(log_dir: str, overrides: dict, backend: str | None = None, fake_vllm: bool = False) -> dict:
    """run_job under StrictCollectives (the GPU device rule replayed on CPU); optionally with the
    stand-in vLLM installed as `vllm`. Returns the violations, the calling modules and the count."""
    import contextlib

    from agro_megatron.testing.strict_collectives import StrictCollectives
    from agro_megatron.train.run import run_job

    stand_in = contextlib.nullcontext()
    if fake_vllm:
        from agro_megatron.testing import fake_vllm as fv

        stand_in = fv.install()
    with stand_in, StrictCollectives(backend) as strict:
        result = run_job(tiny_config(log_dir, **overrides), reward_fn=length_reward)
    result.pop("trainer", None)
    return {"violations": [f"{c.function} {c.devices} {c.backend} {c.caller} ours={c.our_caller}"
                           for c in strict.violations],
            "callers": sorted(strict.callers()), "calls": len(strict.calls), "steps": result.get("steps")}


# A model vLLM's CPU attention accepts (head_dim >= 64), for runs with the vLLM stand-in.
VLLM_TINY = "{hidden_size: 128, intermediate_size: 256, num_layers: 2, num_heads: 2, num_kv_heads: 1, head_dim: 64}"


def _embedding_fingerprint(weight: torch.Tensor, vocab: int) -> float:
    return float(weight[:vocab].double().sum())


def run_with_stand_in_vllm(root: str, runs: dict) -> dict:
    """run_job for each {name: overrides} with rollout.engine=vllm against the vLLM stand-in
    (testing/fake_vllm.py, emulating a GPU platform, so sleep mode is on and its rules enforced).

    Each run returns the stand-in's event log, and for every rollout the fingerprint of the weights
    the engine sampled from next to the fingerprint of the weights the regime says it should have
    sampled from (the stale regime: the snapshot k versions back; every other regime: the policy).
    A run whose name ends in "+resume" continues the run named before the "+" in the same dir.
    """
    from agro_megatron.testing import fake_vllm as fv
    from agro_megatron.train import loop
    from agro_megatron.train.run import run_job

    out: dict = {}
    with fv.install(platform="cuda"):
        record_generate = fv.EngineRecord.generate
        rollouts: list = []
        current: dict = {}

        def generate(self, *args, **kwargs):
            emb = self._model.get_input_embeddings().weight
            current.setdefault("used", []).append(_embedding_fingerprint(emb, emb.shape[0]))
            return record_generate(self, *args, **kwargs)

        original_train_step = loop.Trainer.train_step

        def train_step(self, step):
            vocab = self.context.arch.vocab_size
            snaps = getattr(self.source, "snapshots", [])  # the stale source's versions, oldest first
            policy = _embedding_fingerprint(self.bundle.module.embedding.word_embeddings.weight, vocab)
            expected = policy
            if len(snaps) > 1:  # behind: the oldest snapshot is what the engine must sample from
                expected = _embedding_fingerprint(snaps[0]["embedding.word_embeddings.weight"], vocab)
            current.clear()
            scalars = original_train_step(self, step)
            rollouts.append({"step": step, "expected": expected, "policy": policy,
                             "used": list(current.get("used", []))})
            return scalars

        fv.EngineRecord.generate = generate
        loop.Trainer.train_step = train_step
        try:
            for name, overrides in runs.items():
                log_dir = os.path.join(root, name.split("+")[0])
                rollouts.clear()
                first_engine = len(fv.instances())
                cfg_overrides = {"rollout.engine": "vllm", "model.tiny": VLLM_TINY, **overrides}
                result = run_job(tiny_config(log_dir, **cfg_overrides), reward_fn=length_reward)
                result.pop("trainer", None)
                engines = fv.instances()[first_engine:]
                out[name] = {"steps": result.get("steps"), "before": result.get("before"), "after": result.get("after"),
                             "rollouts": list(rollouts),
                             "events": [list(e.events) for e in engines],
                             "sleep_mode": [e.sleep_mode for e in engines],
                             "rejected": [list(e.rejected) for e in engines],
                             "shut_down": [e.shut_down for e in engines]}
        finally:
            fv.EngineRecord.generate = record_generate
            loop.Trainer.train_step = original_train_step
    return out


def zero_lr_step_keeps_loaded_weights(log_dir: str, dtype: str) -> dict:
    """SFT (2 steps) then one RL step at learning rate 1e-30 (0 is refused by validation; an update
    that small rounds away in fp32 and bf16): the policy must still hold the weights
    it was started from (the SFT model). With bf16 the optimizer keeps fp32 master weights; if
    they were not reloaded after the starting weights were loaded, the step writes the random
    initialisation back."""
    from agro_megatron.train.loop import Trainer
    from agro_megatron.train.run import setup_job

    cfg = tiny_config(log_dir, **{"model.dtype": dtype, "sft.steps": 2, "sft.batch_size": 4, "optim.lr": 1e-30,
                                  "checkpoint.save_every": 0})
    run, parts = setup_job(cfg, reward_fn=length_reward)
    start = {k: v.detach().clone() for k, v in parts.bundle.module.state_dict().items() if torch.is_tensor(v)}
    trainer = Trainer(run, bundle=parts.bundle, engine=parts.engine, objective=parts.objective,
                      source=parts.source, evaluator=parts.evaluator)
    out = trainer.train_step(0)
    after = parts.bundle.module.state_dict()
    changed = sorted(k for k, v in start.items() if not torch.equal(v, after[k]))
    parts.engine.close()
    return {"changed": changed, "skipped": out["train/skipped"], "checked": len(start)}
