"""Checkpoints: the HF <-> Megatron mapping (mapping.py), streaming import/export (convert.py),
megatron's torch_dist format (dist_format.py), loading into live models at any TP x PP (load.py)."""
from .errors import (BadArgumentError, CheckpointContentError, ConversionError, CorruptFileError, DtypeMismatchError,
                     IncompatibleCheckpointError, MissingShardError, NotLlamaError, OutputExistsError,
                     OutputWriteError, ParallelLayoutError)

__all__ = ["BadArgumentError", "CheckpointContentError", "ConversionError", "CorruptFileError", "DtypeMismatchError",
           "IncompatibleCheckpointError", "MissingShardError", "NotLlamaError", "OutputExistsError",
           "OutputWriteError", "ParallelLayoutError"]
