"""Scaling planner (`agro-plan`): per-GPU memory, fit, step time and layout search for AGRO runs.

    from agro_megatron.plan import PlanInput, Layout, get_gpu, make_plan
    plan = make_plan(PlanInput(LLAMA3_PRESETS["llama3-8b"], get_gpu("H100"), Layout(tp=2)))

Modules: hardware (GPU presets; measured profiles from JSON), params (exact megatron parameter /
grad / optimizer bytes), memory (per stage and phase), engine (rollout engine shape), timing (step
time), kernels (step time on a measured profile, kernel by kernel), planner (one plan), search
(ranked layouts), report (tables, JSON, PNG).
"""
from agro_megatron.plan.hardware import GPU, GPU_PRESETS, get_gpu  # noqa: F401
from agro_megatron.plan.params import rank_params, rank_state, total_params_over_ranks  # noqa: F401
from agro_megatron.plan.planner import Plan, make_plan  # noqa: F401
from agro_megatron.plan.search import DEFAULT_LAYOUTS, search  # noqa: F401
from agro_megatron.plan.spec import (  # noqa: F401
    Efficiency, Layout, PlanInput, RolloutOptions, TrainOptions, Workload,
)
