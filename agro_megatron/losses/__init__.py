"""AGRO losses: sequence and token advantages and the surrogate loss (AGRO.md sec. 2-3)."""
from agro_megatron.losses.agro import (
    ESTIMATORS,
    LOGRATIO_REDUCTIONS,
    LR_BASELINES,
    TOKEN_ESTIMATORS,
    agro_off_variance_objective,
    agro_on_parts,
    sequence_advantages,
    surrogate_loss,
    token_advantages,
)

__all__ = [
    "ESTIMATORS",
    "LOGRATIO_REDUCTIONS",
    "LR_BASELINES",
    "TOKEN_ESTIMATORS",
    "agro_off_variance_objective",
    "agro_on_parts",
    "sequence_advantages",
    "surrogate_loss",
    "token_advantages",
]
