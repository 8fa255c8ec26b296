"""One AGRO job from a config: parallel set-up, optional SFT warm-up, RL, evaluation, plots.

`run_job` is what `agro-train` and `python -m agro_megatron.train` call. Its stages are restartable:
the SFT result and the pre-training evaluation are stored in the run directory, and RL resumes
from the newest complete checkpoint (`checkpoint.resume: auto`).
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch.distributed as dist

from agro_megatron import parallel
from agro_megatron.config import JobConfig
from agro_megatron.train import state as ckpt
from agro_megatron.train.context import RunContext, load_run_data, save_json
from agro_megatron.train.loop import StopRequested, Trainer
from agro_megatron.train.model_setup import arch_for_job, build_policy, build_reference, copy_weights


def default_reward_fn(cfg: JobConfig) -> Callable:
    from agro_megatron.rewards import score_batch

    def reward(responses, truths):
        return score_batch(responses, truths)

    return reward


def make_context(cfg: JobConfig, reward_fn: Callable | None) -> RunContext:
    from megatron.core import parallel_state as ps

    log_dir = cfg.logging.dir
    ckpt_dir = cfg.checkpoint.dir or os.path.join(log_dir, "checkpoints")
    if dist.get_rank() == 0:
        os.makedirs(log_dir, exist_ok=True)
        save_json(os.path.join(log_dir, "config.json"), cfg.to_dict())
    dist.barrier()
    tok_dir = cfg.model.tokenizer
    if tok_dir is None and cfg.model.megatron_checkpoint:
        from agro_megatron.checkpoint.convert import ASSETS_DIR

        tok_dir = os.path.join(cfg.model.megatron_checkpoint, ASSETS_DIR)  # copied by agro-convert import
    if tok_dir is None and cfg.model.hf_checkpoint:
        tok_dir = cfg.model.hf_checkpoint
    tokenizer, tok_dir, train, heldout = load_run_data(cfg, log_dir, tok_dir)
    from agro_megatron.data import stop_token_ids

    last = ps.is_pipeline_last_stage()
    ctx = RunContext(
        cfg=cfg, log_dir=log_dir, ckpt_dir=ckpt_dir, tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(), dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), is_last_stage=last,
        cp_size=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
        is_logging_rank=(last and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
                         and ps.get_context_parallel_rank() == 0),
        tokenizer=tokenizer, pad_id=tokenizer.pad_token_id or 0, stop_ids=tuple(stop_token_ids(tokenizer)),
        train_problems=train, heldout_problems=heldout,
        reward_fn=reward_fn or default_reward_fn(cfg), tokenizer_dir=tok_dir)
    ctx.arch = arch_for_job(cfg, vocab_size=len(tokenizer))
    return ctx


def _make_engine(ctx: RunContext, model):
    from agro_megatron.rollout import make_engine

    r = ctx.cfg.rollout
    if r.engine == "native":
        return make_engine("native", model, vocab_size=ctx.arch.vocab_size, pad_token_id=ctx.pad_id)
    return make_engine("vllm", model, arch=ctx.arch, tokenizer_dir=ctx.tokenizer_dir, tp=r.vllm_tp,
                       gpu_memory_utilization=r.vllm_gpu_memory_utilization, sleep_level=r.vllm_sleep_level)


def _starting_weights(ctx: RunContext, module) -> None:
    """Load the starting policy (= reference) into `module` from the configured checkpoint."""
    from agro_megatron.checkpoint.load import load_checkpoint

    m = ctx.cfg.model
    if m.megatron_checkpoint:
        load_checkpoint(module, m.megatron_checkpoint)
    elif m.hf_checkpoint:
        load_checkpoint(module, converted_hf_checkpoint(ctx))


def converted_hf_checkpoint(ctx: RunContext) -> str:
    """model.hf_checkpoint converted once (by rank 0, streaming) into <logging.dir>/converted.

    A 70B conversion outlasts the process-group timeout, so the other ranks wait for it on the
    filesystem (parallel.run_on_rank0, bounded by parallel.long_work_timeout_minutes), not in a
    barrier; if it fails they stop with RankZeroWorkFailed.
    """
    from agro_megatron.checkpoint.convert import META_NAME, import_hf

    hf, out = ctx.cfg.model.hf_checkpoint, os.path.join(ctx.log_dir, "converted")
    done = os.path.join(out, META_NAME)  # import_hf writes it last, then renames the finished dir into place

    def convert():
        if not os.path.exists(done):
            print(f"[rank 0] converting {hf} into {out} (once)", flush=True)
            import_hf(hf, out, tp=1, pp=1, dtype=ctx.cfg.model.dtype)

    parallel.run_on_rank0(convert, done=done, failed=os.path.join(ctx.log_dir, "converted.FAILED"),
                          what=f"to convert {hf} into {out}",
                          limit_minutes=ctx.cfg.parallel.long_work_timeout_minutes)
    return out


def run_sft_stage(ctx: RunContext) -> str | None:
    """SFT warm-up (once): returns the saved model's path, or None when sft.steps == 0."""
    cfg = ctx.cfg
    if cfg.sft.steps <= 0:
        return None
    path = os.path.join(ctx.log_dir, "sft_model")
    if os.path.exists(os.path.join(path, "COMPLETE")):
        ctx.print(f"SFT model found at {path}; skipping SFT")
        return path
    from agro_megatron.train.sft import run_sft

    bundle = build_policy(cfg, ctx.arch, lr=cfg.sft.lr, total_steps=cfg.sft.steps, with_reference=False)
    _starting_weights(ctx, bundle.module)
    losses = run_sft(ctx, bundle)
    ckpt.save_model(bundle.module, path)
    ctx.print(f"SFT done: loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {path}")
    return path


def start_job(cfg: JobConfig, reward_fn: Callable | None = None) -> RunContext:
    """Process groups (timeouts from parallel.*), the world-size check, megatron's parallel state,
    then the run's context: the first half of every job (agro-train, agro-sft)."""
    cfg.validate()  # before the process group: its timeout is parallel.timeout_minutes
    parallel.init_distributed(timeout_minutes=cfg.parallel.timeout_minutes)
    cfg.validate(world_size=dist.get_world_size())
    p = cfg.parallel
    parallel.init_model_parallel(tp=p.tp, pp=p.pp, cp=p.cp, seed=cfg.train.seed, timeout_minutes=p.timeout_minutes)
    return make_context(cfg, reward_fn)


def setup_job(cfg: JobConfig, *, reward_fn: Callable | None = None) -> RunContext:
    """Process groups, data, SFT warm-up (once), policy + reference + optimizer, rollout engine."""
    ctx = start_job(cfg, reward_fn)
    sft_path = run_sft_stage(ctx)

    bundle = build_policy(cfg, ctx.arch, lr=cfg.optim.lr, total_steps=cfg.train.steps, with_reference=False)
    if sft_path:
        ckpt.load_model(bundle.module, sft_path)
    else:
        _starting_weights(ctx, bundle.module)
    bundle.reference = build_reference(cfg, ctx.arch, bundle.module)
    ctx.bundle = bundle
    ctx.engine = _make_engine(ctx, bundle.policy)
    if cfg.algorithm.regime == "stale" and cfg.algorithm.staleness > 0:
        from agro_megatron.models.llama import build_model

        # the stale weights' host: the trainer loads a snapshot into it and pushes it into ctx.engine
        ctx.behaviour_model = build_model(ctx.arch, dtype=cfg.model.dtype)
        copy_weights(ctx.behaviour_model, bundle.module)
    if cfg.algorithm.regime == "offline":
        ctx.offline_path = cfg.algorithm.offline_data
        ensure_offline_data(ctx)
    return ctx


def run_job(cfg: JobConfig, *, reward_fn: Callable | None = None) -> dict:
    """Run the whole job on this process (a rank of a torchrun/srun launch, or alone)."""
    ctx = setup_job(cfg, reward_fn=reward_fn)
    try:
        return _train_and_evaluate(ctx)
    finally:
        ctx.engine.close()  # vLLM allows one sleep-mode engine per process: release it with the job


def _train_and_evaluate(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    before_path = os.path.join(ctx.log_dir, "eval_before.json")
    if os.path.exists(before_path):
        with open(before_path) as f:
            before = json.load(f)
    else:
        before = ctx.evaluate(prefix="eval")
        if ctx.is_logging_rank:
            save_json(before_path, before)
        dist.barrier()
        before = _share(before)
    trainer = Trainer(ctx)
    resumed = trainer.maybe_resume()
    if not resumed:
        trainer.metrics.restore([])  # a fresh run starts a fresh metrics.jsonl
        if before:
            trainer.metrics.log(0, before)
    try:
        trainer.run()
    except StopRequested as e:
        ctx.print(str(e))
        trainer.metrics.close()
        return {"stopped": True, "steps": trainer.step, "trainer": trainer}
    trainer.save()
    final = save_final_model(ctx)
    after = ctx.evaluate(prefix="eval")
    trainer.metrics.log(trainer.step, after)
    trainer.metrics.close()
    result = {"steps": trainer.step, "before": before.get("eval/accuracy"), "after": after.get("eval/accuracy"),
              "layout": {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp_size, "dp": ctx.dp_size},
              "log_dir": ctx.log_dir, "final_model": str(final)}
    if ctx.is_logging_rank:
        if cfg.logging.plots:
            result["plot"] = trainer.metrics.plot(os.path.join(ctx.log_dir, "training.png"))
        save_json(os.path.join(ctx.log_dir, "result.json"), result)
        if result["before"] is not None:
            print(f"heldout_accuracy before={result['before']:.4f} after={result['after']:.4f}", flush=True)
    result["trainer"] = trainer  # in-process callers (tests, notebooks) can inspect the final state
    return result


def save_final_model(ctx: RunContext):
    """The trained policy as a converted checkpoint: `agro-convert export --megatron <it>` gives HF."""
    from agro_megatron.checkpoint.convert import read_metadata, save_trained_model

    m = ctx.cfg.model
    source = read_metadata(m.megatron_checkpoint) if m.megatron_checkpoint else None
    path = save_trained_model(ctx.bundle.module, os.path.join(ctx.log_dir, "final_model"), arch=ctx.arch,
                              tp=ctx.tp, pp=ctx.pp, dtype=m.dtype, assets_from=ctx.tokenizer_dir,
                              source_meta=source)
    ctx.print(f"trained policy saved to {path} (agro-convert export --megatron {path} --out HF_DIR)")
    return path


def _share(obj):
    """Broadcast a small object from the logging rank (the last rank) to all ranks."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]


def ensure_offline_data(ctx: RunContext) -> None:
    """Offline regime: generate n responses per training prompt from pi_ref once, store them."""
    from agro_megatron.train.rollouts import OfflineDataset, generate_samples

    path = ctx.offline_path
    if os.path.exists(path):
        return
    cfg = ctx.cfg
    records = []
    probs = ctx.train_problems
    bs = 32
    progress = ctx.progress(len(probs), desc="offline data from pi_ref")
    for start in range(0, len(probs), bs):
        chunk = probs[start:start + bs]
        prompts = [ctx.encode_prompt(p) for p in chunk]
        params = ctx.sampling_params(seed=cfg.train.seed * 1000 + start)
        samples = generate_samples(ctx.engine, prompts, [p.answer for p in chunk], cfg.rollout.n, params,
                                   ctx.reward_fn, ctx.tokenizer, version=0)
        import dataclasses

        for p, pr, row in zip(chunk, prompts, samples):
            records.append({"prompt_id": p.id, "prompt": pr, "answer": p.answer,
                            "samples": [dataclasses.asdict(s) for s in row]})
        progress.update(len(chunk))
    progress.close()
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        OfflineDataset.write(path, records)
    dist.barrier()
