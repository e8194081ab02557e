"""Error types with one readable message that names the fix."""

from __future__ import annotations


class AvssError(ValueError):
    """Base class for user-facing errors: the message says what is wrong and how to fix it."""


class ConfigError(AvssError):
    """A parameter has a value the study cannot use (unknown site, ratio outside (0, 1), ...)."""


class DataError(AvssError):
    """A data root, file or row is missing or malformed."""


class ModelSpecError(AvssError):
    """A model specification cannot be resolved, or its architecture is not supported."""
