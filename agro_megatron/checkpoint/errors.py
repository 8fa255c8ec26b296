"""Named conversion errors. Each message says what is wrong and how to fix it."""
from __future__ import annotations


class ConversionError(ValueError):
    """Base class: bad input to checkpoint import / export / load."""


class NotLlamaError(ConversionError):
    """The source is not a Llama (LlamaForCausalLM) checkpoint."""


class ParallelLayoutError(ConversionError):
    """The model cannot be split TP x PP ways (e.g. TP does not divide the KV heads)."""


class MissingShardError(ConversionError, FileNotFoundError):
    """A safetensors shard named by the index (or a tensor it should hold) is missing."""


class CheckpointContentError(ConversionError):
    """A tensor is missing from the checkpoint or has the wrong shape for its config."""


class DtypeMismatchError(ConversionError):
    """Tensor dtypes disagree with the config / the model they are loaded into."""


class OutputExistsError(ConversionError, FileExistsError):
    """The output directory exists and --overwrite was not given."""


class IncompatibleCheckpointError(ConversionError):
    """The checkpoint was written by an incompatible writer (megatron-core version, format)."""
