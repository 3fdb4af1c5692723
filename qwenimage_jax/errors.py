"""The errors a user can fix, one class per kind, each with the exit code `qwenimage-jax` ends with.

    QwenImageError            (never raised itself)
      ConfigError         3   a config file or a --config.key=value override
      InputError          4   an input the user gave: an image, a flag's value, a data directory
      WeightsError        5   model weights: a directory, config.json, safetensors/Orbax files, LoRA adapters
      OutputError         6   an output that cannot be written where it was asked for
      CheckpointError     7   a training checkpoint that cannot be saved or restored
      TrainingError       8   a run that cannot go on as configured (NaN/Inf loss)

Exit codes 1 (an unexpected exception: a bug), 2 (argparse: bad usage) and 130 (Ctrl-C) are the CLI's own
(`qwenimage_jax/cli.py`). The concrete classes live where they are raised (`checkpoints.safetensors_io.WeightFileError`,
`training.guards.NonFiniteError`, ...) and also derive from the builtin they always were (ValueError,
FileNotFoundError, ...), so code that catches the builtin keeps working. This module imports nothing of ours: every
layer, models included, may use it.
"""
from __future__ import annotations


class QwenImageError(Exception):
    """An error whose message says what is wrong, with the file, key or value, and how to fix it."""
    exit_code = 1


class ConfigError(QwenImageError):
    exit_code = 3


class InputError(QwenImageError):
    exit_code = 4


class WeightsError(QwenImageError):
    exit_code = 5


class OutputError(QwenImageError):
    exit_code = 6


class CheckpointError(QwenImageError):
    exit_code = 7


class TrainingError(QwenImageError):
    exit_code = 8


# Shared concrete classes: raised in more than one layer, so they live here rather than beside one raise site.
class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weights directory, config.json, shard or adapter file that is not where it was looked for."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input file or directory (image, dataset) that does not exist."""


class InputValueError(InputError, ValueError):
    """A flag or argument whose value is out of range or malformed."""


class MissingPackageError(InputError, ImportError):
    """An optional package that what was asked for (a flag, a data source) needs is not installed; the message names
    what to pip install."""


class OutputExistsError(OutputError, FileExistsError):
    """An output (file or directory) already holds something, and replacing it was not asked for (--overwrite)."""


class InputKeyError(InputError, KeyError):
    """A name (a bundled photo, a data source entry) that is not among the known ones."""

    def __str__(self):  # KeyError's str() would wrap the whole sentence in quotes
        return str(self.args[0]) if self.args else ""
