"""Where everything of the bank store lives in Redis: one place builds every key name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bankstore.errors import ProductNameError

DEFAULT_PREFIX = "defectscope:"
PRODUCT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRODUCT_RULE = (
    "1 to 128 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
)


def validate_product(product: str) -> str:
    """Returns `product` if it can name a bank; raises `ProductNameError` saying what is allowed.

    Note:
        The rule keeps names free of ':' (the key separator) and of glob characters, so one
        product's keys never match another's pattern in `redis-cli --scan --pattern`.
    """
    if not isinstance(product, str) or PRODUCT_PATTERN.fullmatch(product) is None:
        raise ProductNameError(f"product name {product!r} is not allowed: use {PRODUCT_RULE}")
    return product


@dataclass(frozen=True)
class KeySchema:
    """Key names under one prefix (`defectscope:` unless configured).

    TODO(#3): Redis Cluster needs all keys of a product in one hash slot (a `{product}` hash tag)
    for the multi-key Lua scripts; the schema assumes one primary (with replicas or not).
    """

    prefix: str = DEFAULT_PREFIX

    @property
    def products(self) -> str:
        """SET of the products that have a current bank."""
        return f"{self.prefix}banks"

    @property
    def events(self) -> str:
        """Pub/sub channel of bank events (JSON messages)."""
        return f"{self.prefix}bank-events"

    def product_base(self, product: str) -> str:
        return f"{self.prefix}bank:{product}:"

    def current(self, product: str) -> str:
        """STRING: the current version number."""
        return f"{self.product_base(product)}current"

    def next_version(self, product: str) -> str:
        """STRING counter: INCR allocates the next version number."""
        return f"{self.product_base(product)}next_version"

    def versions(self, product: str) -> str:
        """ZSET of the stored versions that were ever current (score = version)."""
        return f"{self.product_base(product)}versions"

    def calibration(self, product: str) -> str:
        """STRING msgpack: the product's calibrated threshold."""
        return f"{self.product_base(product)}calibration"

    def meta(self, product: str, version: int) -> str:
        """STRING msgpack: the metadata of one version."""
        return f"{self.product_base(product)}meta:v{version}"

    def chunk(self, product: str, version: int, stage: int, chunk: int) -> str:
        """STRING raw bytes: one chunk of one stage's float16 matrix."""
        return f"{self.product_base(product)}v{version}:stage{stage}:{chunk}"

    def version_pattern(self, product: str, version: int) -> str:
        """Glob matching every chunk key of one version (for keys no metadata describes)."""
        return f"{self.product_base(product)}v{version}:stage*"
