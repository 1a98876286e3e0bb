"""Redis-backed, versioned memory banks, shared by every matcher replica on every node.

Redis is the source of truth for the few-shot memory banks (AnomalyGPT Eq. 2): `BankStore` writes
and reads them, `BankCache` keeps them on a replica's device and current, `connect` finds the
server (`REDIS_URL`, else the embedded one of `bankstore.embedded`).

Key schema (prefix `defectscope:` by default; `<p>` below is the product, `<n>` a version):

    defectscope:banks                               SET     products that have a bank
    defectscope:bank-events                         channel JSON {"event", "product", "version"}
    defectscope:bank:<p>:current                    STRING  the current version, e.g. "7"
    defectscope:bank:<p>:next_version               STRING  INCR counter that allocates versions
    defectscope:bank:<p>:versions                   ZSET    stored versions (score = version)
    defectscope:bank:<p>:meta:v<n>                  STRING  msgpack map: the version's metadata
    defectscope:bank:<p>:v<n>:stage<i>:<chunk>      STRING  raw bytes of stage i, chunk number
    defectscope:bank:<p>:calibration                STRING  msgpack map: calibrated threshold

A stage is an (N_i, C_i) float16 matrix stored as little-endian bytes in chunks of at most
`chunk_bytes` (64 MiB by default); the metadata map holds the encoder fingerprint (model name,
weights sha256 or "random:<seed>", tap blocks, image size), per stage the patch count, dims, chunk
size and the xxh3_64 of each chunk, the sha256 of each source image, augmentation, coreset ratio,
threshold, class name, created time and the version it was appended to. Keys of a version are
written before `current` names it and never change afterwards; a Lua script moves `current`
forward only, so readers see one version whole. `next_version` survives `bank rm`, so versions of
a product never repeat.

Looking at it with redis-cli:

    redis-cli smembers defectscope:banks
    redis-cli get defectscope:bank:washer:current
    redis-cli zrange defectscope:bank:washer:versions 0 -1
    redis-cli --scan --pattern 'defectscope:bank:washer:v7:*'
    redis-cli strlen defectscope:bank:washer:v7:stage0:0
    redis-cli --no-raw get defectscope:bank:washer:meta:v7    # msgpack; `defectscope bank show`
    redis-cli subscribe defectscope:bank-events                # reads it as text

(for the embedded server add `-s ~/.local/share/defectscope/redis/redis.sock`).
"""

from bankstore.cache import BankCache
from bankstore.codec import BankInfo, StageInfo
from bankstore.connection import connect, connect_async, redis_url, with_retries
from bankstore.embedded import EmbeddedRedis
from bankstore.errors import (
    BankCorruptError,
    BankNotFoundError,
    ExportFileError,
    FingerprintMismatchError,
    ProductNameError,
    RedisUnavailableError,
)
from bankstore.keys import DEFAULT_PREFIX, KeySchema, validate_product
from bankstore.store import (
    BankEvent,
    BankStore,
    BankSubscription,
    ProductInfo,
    PublishResult,
    Revision,
    StoredBank,
    StoredCalibration,
)

__all__ = [
    "DEFAULT_PREFIX",
    "BankCache",
    "BankCorruptError",
    "BankEvent",
    "BankInfo",
    "BankNotFoundError",
    "BankStore",
    "BankSubscription",
    "EmbeddedRedis",
    "ExportFileError",
    "FingerprintMismatchError",
    "KeySchema",
    "ProductInfo",
    "ProductNameError",
    "PublishResult",
    "RedisUnavailableError",
    "Revision",
    "StageInfo",
    "StoredBank",
    "StoredCalibration",
    "connect",
    "connect_async",
    "redis_url",
    "validate_product",
    "with_retries",
]
