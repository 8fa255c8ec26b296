"""One AGRO job from a config: parallel set-up, optional SFT warm-up, RL, evaluation, plots.

`run_job` is what `agro-train` and `python -m agro_megatron.train` call. It builds every part of a
run from the config, in this order, and hands them to the Trainer:

    start_job       process groups, the run's context (dirs, layout, tokenizer, problems, arch)
    run_sft_stage   the SFT warm-up, once (its model is stored in the run directory)
    build_training  policy + optimizer, frozen reference, rollout engine, objective, sample source

Its stages are restartable: the SFT result and the pre-training evaluation are stored in the run
directory, and RL resumes from the newest complete checkpoint (`checkpoint.resume: auto`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import torch.distributed as dist

from agro_megatron import parallel
from agro_megatron.config import JobConfig
from agro_megatron.losses.objective import Objective
from agro_megatron.platform.lifetime import die_with_parent
from agro_megatron.sources import make_sample_source
from agro_megatron.sources.base import PromptStream, RolloutGenerator
from agro_megatron.train import state as ckpt
from agro_megatron.train.context import Evaluator, ProcessLayout, RunContext, load_run_data, save_json
from agro_megatron.train.loop import StopRequested, Trainer
from agro_megatron.train.run_dir import claim_run_dir
from agro_megatron.train.model_setup import PolicyBundle, arch_for_job, build_policy, build_reference


def default_reward_fn(cfg: JobConfig) -> Callable:
    from agro_megatron.rewards import score_batch
    from agro_megatron.rewards.math import warm

    warm(wait=False)  # the sandbox starts while the model is built: no step pays its start-up

    def reward(responses, truths):
        return score_batch(responses, truths)

    return reward


def start_job(cfg: JobConfig, reward_fn: Callable | None = None) -> RunContext:
    """Process groups (timeouts from parallel.*), the world-size check, megatron's parallel state,
    then the run's context: the first half of every job (agro-train, agro-sft)."""
    cfg.validate()  # before the process group: its timeout is parallel.timeout_minutes
    from agro_megatron.config import check_writable_dir

    check_writable_dir("logging.dir", cfg.logging.dir)  # on every rank, before any rank can wait for another
    if cfg.checkpoint.dir:
        check_writable_dir("checkpoint.dir", cfg.checkpoint.dir)
    parallel.init_distributed(timeout_minutes=cfg.parallel.timeout_minutes,
                              rendezvous_timeout_minutes=cfg.parallel.rendezvous_timeout_minutes)
    cfg.validate(world_size=dist.get_world_size())
    die_with_parent()  # processes forked from here on (megatron's checkpoint writers) die with this one
    p = cfg.parallel
    parallel.init_model_parallel(tp=p.tp, pp=p.pp, cp=p.cp, seed=cfg.train.seed, timeout_minutes=p.timeout_minutes)
    log_dir = cfg.logging.dir
    # the dir belongs to one run: resume it only with its config; resume=never moves it aside (run_dir.py)
    claim_run_dir(cfg)
    tok_dir = cfg.model.tokenizer
    if tok_dir is None and cfg.model.megatron_checkpoint:
        from agro_megatron.checkpoint.convert import ASSETS_DIR

        tok_dir = os.path.join(cfg.model.megatron_checkpoint, ASSETS_DIR)  # copied by agro-convert import
    if tok_dir is None and cfg.model.hf_checkpoint:
        tok_dir = cfg.model.hf_checkpoint
    data = load_run_data(cfg, log_dir, tok_dir)
    return RunContext(cfg=cfg, log_dir=log_dir, ckpt_dir=cfg.checkpoint.dir or os.path.join(log_dir, "checkpoints"),
                      layout=ProcessLayout.from_megatron(), data=data,
                      arch=arch_for_job(cfg, vocab_size=len(data.tokenizer)),
                      reward_fn=reward_fn or default_reward_fn(cfg))


def make_engine(run: RunContext, model):
    from agro_megatron.rollout import make_engine as make

    r = run.cfg.rollout
    if r.engine == "native":
        return make("native", model, vocab_size=run.arch.vocab_size, pad_token_id=run.data.pad_id)
    return make("vllm", model, arch=run.arch, tokenizer_dir=run.data.tokenizer_dir, tp=r.vllm_tp,
                gpu_memory_utilization=r.vllm_gpu_memory_utilization, sleep_level=r.vllm_sleep_level)


def _starting_weights(run: RunContext, module) -> None:
    """Load the starting policy (= reference) into `module` from the configured checkpoint."""
    from agro_megatron.checkpoint.load import load_converted_checkpoint

    m = run.cfg.model
    if m.megatron_checkpoint:
        load_converted_checkpoint(m.megatron_checkpoint, module)
    elif m.hf_checkpoint:
        load_converted_checkpoint(converted_hf_checkpoint(run), module)


def converted_hf_checkpoint(run: RunContext) -> str:
    """model.hf_checkpoint converted once (by rank 0, streaming) into <logging.dir>/converted.

    A 70B conversion outlasts the process-group timeout, so the other ranks wait for it on the
    filesystem (parallel.run_on_rank0, bounded by parallel.long_work_timeout_minutes), not in a
    barrier; if it fails they stop with RankZeroWorkFailed.
    """
    from agro_megatron.checkpoint.convert import META_NAME, import_hf

    hf, out = run.cfg.model.hf_checkpoint, os.path.join(run.log_dir, "converted")
    done = os.path.join(out, META_NAME)  # import_hf writes it last, then renames the finished dir into place

    def convert():
        if not os.path.exists(done):
            print(f"[rank 0] converting {hf} into {out} (once)", flush=True)
            import_hf(hf, out, tp=1, pp=1, dtype=run.cfg.model.dtype)

    parallel.run_on_rank0(convert, done=done, failed=os.path.join(run.log_dir, "converted.FAILED"),
                          what=f"to convert {hf} into {out}",
                          limit_minutes=run.cfg.parallel.long_work_timeout_minutes)
    return out


def run_sft_stage(run: RunContext) -> str | None:
    """SFT warm-up (once): returns the saved model's path, or None when sft.steps == 0.
    StopRequested (after saving the SFT state, which the next run resumes) on SIGTERM/SIGUSR1."""
    cfg = run.cfg
    if cfg.sft.steps <= 0:
        return None
    path = os.path.join(run.log_dir, "sft_model")
    ckpt.recover_model_checkpoint(path)  # a kill in the middle of its save may have left it under a temp name
    if os.path.exists(os.path.join(path, "COMPLETE")):
        run.print(f"SFT model found at {path}; skipping SFT")
        return path
    from agro_megatron.train.sft import StopSignals, discard_sft_checkpoints, run_sft, sft_examples

    examples = sft_examples(run)  # over-long rows stop the job here, before any model is built
    bundle = build_policy(cfg, run.arch, lr=cfg.sft.lr, total_steps=cfg.sft.steps, with_reference=False)
    _starting_weights(run, bundle.module)
    bundle.optimizer.reload_model_params()  # bf16: the fp32 master weights follow the loaded ones
    with StopSignals() as stop:  # SIGTERM/SIGUSR1: save the SFT state, StopRequested (exit 75)
        losses = run_sft(run, bundle, examples, stop=stop)
        ckpt.save_model_checkpoint(path, bundle.module)
        run.print(f"SFT done: loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {path}")
        discard_sft_checkpoints(run)
        if stop.requested():  # the signal came during the last step or the save
            run.print(f"stopped by signal after SFT; the SFT model is saved in {path} and the same command "
                      "continues with RL")
            raise StopRequested("stopped by signal after SFT")
    return path


@dataclasses.dataclass
class Training:
    """Everything the Trainer is handed, built by `build_training`."""

    bundle: PolicyBundle
    engine: object
    objective: Objective
    source: object
    evaluator: Evaluator


def build_training(run: RunContext, sft_path: str | None) -> Training:
    """Policy + optimizer from the SFT model or the starting checkpoint, the frozen reference (its
    copy), the rollout engine, the objective and the sample source."""
    from agro_megatron.models.llama import build_model

    cfg = run.cfg
    bundle = build_policy(cfg, run.arch, lr=cfg.optim.lr, total_steps=cfg.train.steps, with_reference=False)
    if sft_path:
        ckpt.load_model_checkpoint(sft_path, bundle.module)
    else:
        _starting_weights(run, bundle.module)
    # bf16: the optimizer's fp32 master weights were copied from the random init in build_policy;
    # without this the first step would put them back
    bundle.optimizer.reload_model_params()
    bundle.reference = build_reference(cfg, run.arch, bundle.module)
    engine = make_engine(run, bundle.policy)
    layout = run.layout
    prompts = PromptStream(run.data.train_problems, run.data.encode_prompt, cfg.train.prompts_per_step,
                           cfg.train.seed, layout.dp_rank, layout.dp)
    rollouts = RolloutGenerator(engine, run.reward_fn, run.data.tokenizer, run.sampling_params, cfg.rollout.n,
                                cfg.train.seed, layout.dp_rank, layout.cp_rank, layout.cp)
    source = make_sample_source(cfg.algorithm, prompts=prompts, rollouts=rollouts, policy=bundle.module,
                                build_behaviour_model=lambda: build_model(run.arch, dtype=cfg.model.dtype),
                                progress=run.progress, total_steps=cfg.train.steps, notice=run.print)
    objective = Objective(cfg.algorithm, temperature=cfg.rollout.temperature, vocab_size=run.arch.vocab_size)
    return Training(bundle, engine, objective, source, Evaluator(run, engine))


def setup_job(cfg: JobConfig, *, reward_fn: Callable | None = None) -> tuple[RunContext, Training]:
    """Everything before the first step: start_job, the SFT stage, build_training."""
    run = start_job(cfg, reward_fn)
    return run, build_training(run, run_sft_stage(run))


def run_job(cfg: JobConfig, *, reward_fn: Callable | None = None) -> dict:
    """Run the whole job on this process (a rank of a torchrun/srun launch, or alone)."""
    try:
        run, parts = setup_job(cfg, reward_fn=reward_fn)
    except StopRequested:  # a signal during SFT: its state is saved and the message printed (train/sft.py)
        return {"stopped": True, "steps": 0}
    try:
        return _train_and_evaluate(run, parts)
    finally:
        parts.engine.close()  # vLLM allows one sleep-mode engine per process: release it with the job


def _train_and_evaluate(run: RunContext, parts: Training) -> dict:
    cfg = run.cfg
    before_path = os.path.join(run.log_dir, "eval_before.json")
    if os.path.exists(before_path):
        with open(before_path) as f:
            before = json.load(f)
    else:
        before = parts.evaluator.evaluate(prefix="eval", step=0)
        if run.layout.is_logging_rank:
            save_json(before_path, before)
        dist.barrier()
        before = _share(before)
    trainer = Trainer(run, bundle=parts.bundle, engine=parts.engine, objective=parts.objective,
                      source=parts.source, evaluator=parts.evaluator)
    if not trainer.maybe_resume():
        trainer.metrics.restore([])  # a fresh run starts a fresh metrics.jsonl
        if before:
            trainer.metrics.log(0, before)
    try:
        trainer.run()
    except StopRequested as e:
        run.print(str(e))
        trainer.metrics.close()
        return {"stopped": True, "steps": trainer.progress.step, "trainer": trainer}
    trainer.save()
    final = save_final_model(run, parts.bundle)
    after = parts.evaluator.evaluate(prefix="eval", step=trainer.progress.step)
    trainer.metrics.log(trainer.progress.step, after)
    trainer.metrics.close()
    layout = run.layout
    result = {"steps": trainer.progress.step, "before": before.get("eval/accuracy"),
              "after": after.get("eval/accuracy"),
              "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp},
              "log_dir": run.log_dir, "final_model": str(final)}
    if layout.is_logging_rank:
        from agro_megatron.train.metrics import format_phase_table, phase_table

        phases = phase_table(trainer.metrics.history)
        result["phases"] = {phase: seconds for phase, seconds, _ in phases}
        if phases:
            print("where a step's time went (median per step; checkpoint: total / steps)\n"
                  + format_phase_table(phases), flush=True)
        if cfg.logging.plots:
            result["plot"] = trainer.metrics.plot(os.path.join(run.log_dir, "training.png"))
        save_json(os.path.join(run.log_dir, "result.json"), result)
        from agro_megatron.train.inputs import heldout_line

        print(heldout_line(cfg.data, result["before"], result["after"]), flush=True)  # always the last line
    result["trainer"] = trainer  # in-process callers (tests, notebooks) can inspect the final state
    return result


def save_final_model(run: RunContext, bundle: PolicyBundle):
    """The trained policy as a converted checkpoint: `agro-convert export --megatron <it>` gives HF."""
    from agro_megatron.checkpoint.convert import read_metadata, save_trained_model

    m = run.cfg.model
    source = read_metadata(m.megatron_checkpoint) if m.megatron_checkpoint else None
    path = save_trained_model(bundle.module, os.path.join(run.log_dir, "final_model"), arch=run.arch,
                              tp=run.layout.tp, pp=run.layout.pp, dtype=m.dtype, assets_from=run.data.tokenizer_dir,
                              source_meta=source)
    run.print(f"trained policy saved to {path} (agro-convert export --megatron {path} --out HF_DIR)")
    return path


def _share(obj):
    """Broadcast a small object from the logging rank (the last rank) to all ranks."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]
