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


class CorruptCheckpointError(ConversionError):
    """A trainer or SFT checkpoint's files do not match the checksums written with it (truncated,
    bytes changed), or it cannot be read; the message names the checkpoint and the damaged files."""


class CheckpointWriteError(OSError):
    """A trainer checkpoint could not be written (no space left on device, a read-only or
    unwritable directory); the previous checkpoint is intact and the message says how to go on."""


class CorruptFileError(ConversionError):
    """A checkpoint file is truncated or not what its name says (a broken config.json, a safetensors
    shard cut short by an interrupted download, a damaged .distcp file)."""


class OutputWriteError(ConversionError, OSError):
    """The output cannot be written: its directory is not writable, or the disk (or a file-size
    limit) filled up while writing. Nothing partial is left behind; the source is untouched."""


class BadArgumentError(ConversionError):
    """An option's value is invalid (e.g. --max-shard-size abc, 0 or negative)."""
