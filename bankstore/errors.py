"""Errors of the bank store; each renders as one line that names what was observed."""

from __future__ import annotations

from pipeline.errors import BankError, DefectscopeError


class RedisUnavailableError(DefectscopeError):
    """The Redis server cannot be reached, refused the credentials, or timed out."""


class ProductNameError(BankError):
    """A product name is empty, too long or has characters keys cannot carry."""


class BankNotFoundError(BankError):
    """No bank (or not the asked-for version) is stored for a product."""


class BankCorruptError(BankError):
    """A stored bank fails its checksums, lengths or metadata checks."""


class FingerprintMismatchError(BankError):
    """A stored bank was built with another encoder than the one asking for it."""


class ExportFileError(BankError):
    """A file is not a defectscope bank export, or its tensors disagree with its metadata."""
