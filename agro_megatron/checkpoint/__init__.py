"""Checkpoints: the HF <-> Megatron mapping (mapping.py), streaming import/export (convert.py),
megatron's torch_dist format (dist_format.py), loading into live models at any TP x PP (load.py)."""
from .errors import (CheckpointContentError, ConversionError, DtypeMismatchError, IncompatibleCheckpointError,
                     MissingShardError, NotLlamaError, OutputExistsError, ParallelLayoutError)

__all__ = ["CheckpointContentError", "ConversionError", "DtypeMismatchError", "IncompatibleCheckpointError",
           "MissingShardError", "NotLlamaError", "OutputExistsError", "ParallelLayoutError"]
