"""Typed errors that jev4 raises for bad input.

Every error says what was wrong and where (a path, a tensor name, a task), so
that a user can fix the input without reading jev4's source. The CLI turns any
`Jev4Error` into a one-line message and exit code 2.
"""

from __future__ import annotations


class Jev4Error(Exception):
    """Base class of every error jev4 raises on purpose."""


class ConfigError(Jev4Error):
    """config.json is missing, unreadable or inconsistent."""


class CheckpointError(Jev4Error):
    """A checkpoint directory or safetensors file is missing, corrupt or does not match the model."""


class AdapterError(Jev4Error):
    """The adapters/ directory is missing, or its tensors do not fit the base model."""


class TaskError(Jev4Error):
    """An unknown task (adapter) name was asked for."""


class EncodeError(Jev4Error):
    """Bad arguments to an encode call (truncate_dim, prompt name, empty input...)."""


class OutputExistsError(Jev4Error):
    """The output path exists and --force was not given."""


class OutputLockedError(Jev4Error):
    """Another process is writing the same output right now (it holds the output's lock)."""


class SettingsError(Jev4Error, ValueError):
    """An option value that cannot work (an opset, a size, a dim), caught before any model is loaded."""


class ManifestError(Jev4Error):
    """An artifact's files do not match its manifest."""


class MissingDependencyError(Jev4Error):
    """An optional dependency is not installed; the message gives the pip command."""


class ProviderError(Jev4Error):
    """An onnxruntime execution provider (or a GPU) that was asked for is not available."""


class EmbeddingQuantError(Jev4Error, ValueError):
    """Bad input to an embedding codec: unknown precision, wrong dim, missing calibration, non-finite values."""


class TensorRTError(Jev4Error):
    """Building or running a TensorRT engine failed (parser errors, no engine, bad engine settings)."""


class EngineMismatchError(TensorRTError):
    """An engine was built with another TensorRT version or on another GPU than the one running it."""
