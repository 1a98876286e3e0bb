"""Errors a user can act on.

Every exception here renders as one line that says what was observed and what to do about it; the
CLI prints that line instead of a traceback, and the service turns it into an error result.
"""


class DefectscopeError(Exception):
    """Base class for problems the user can fix (bad input, missing files, wrong configuration)."""


class ImageError(DefectscopeError):
    """An image could not be decoded or is outside the accepted limits."""


class WeightsError(DefectscopeError):
    """Model weights are missing, unreadable or do not fit the model."""


class CheckpointError(DefectscopeError):
    """A checkpoint is unreadable or was made for another encoder or LLM."""


class BankError(DefectscopeError):
    """A memory bank is empty or does not fit the encoder it is used with."""


class ConfigError(DefectscopeError):
    """A configuration value is unknown or out of range."""
