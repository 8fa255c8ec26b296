"""AGRO losses: sequence and token advantages and the surrogate loss (docs/algorithm.md §2-5)."""
from agro_megatron.losses.agro import (
    ESTIMATORS,
    FULL_VOCAB_KL_TOKEN_ESTIMATORS,
    LOGRATIO_REDUCTIONS,
    RATIO_BASELINES,
    TOKEN_ESTIMATORS,
    agro_off_variance_objective,
    agro_on_parts,
    sequence_advantages,
    surrogate_loss,
    token_advantages,
    validate_algorithm,
)
from agro_megatron.losses.objective import Advantages, Objective, TokenStats

__all__ = [
    "Advantages",
    "Objective",
    "TokenStats",
    "ESTIMATORS",
    "FULL_VOCAB_KL_TOKEN_ESTIMATORS",
    "LOGRATIO_REDUCTIONS",
    "RATIO_BASELINES",
    "TOKEN_ESTIMATORS",
    "agro_off_variance_objective",
    "agro_on_parts",
    "sequence_advantages",
    "surrogate_loss",
    "token_advantages",
    "validate_algorithm",
]
