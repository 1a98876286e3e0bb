"""Configuration of the service: what the app builder takes, and each deployment's `user_config`.

`AppArgs` are the `args:` of the application in `serve_config.yaml` (fixed for the app's lifetime:
which weights, which Redis). The `*Options` classes are the deployments' `user_config:` blocks;
Serve hands them to `reconfigure`, so they change at run time without a restart. Every class maps
one-to-one onto its YAML block; an unknown key is an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.detector import ExplainPolicy
from pipeline.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """Builds a config dataclass from a YAML/JSON mapping, refusing unknown keys."""
    values = dict(values or {})
    known = {item.name for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


@dataclass(frozen=True)
class AppArgs:
    """The application's build arguments (`args:` in serve_config.yaml)."""

    preset: str = "tiny"
    """Encoder preset (see `pipeline.encoder.PRESETS`)."""
    model_name: str | None = None
    weights: str | None = None
    """Encoder weights file or cached open_clip tag; None takes the preset's."""
    checkpoint: str | None = None
    """Directory of trained decoder/explainer parts."""
    llm: str | None = "gemma3-270m"
    """Explainer LLM: "gemma3-270m", a .gguf file, a transformers directory, or None."""
    redis_url: str | None = None
    """None: `$REDIS_URL`, else the embedded server."""
    redis_prefix: str = "defectscope:"
    device: str | None = None
    """"cuda", "cpu"; None takes CUDA when the replica has a GPU."""
    api_token_env: str = "DEFECTSCOPE_API_TOKEN"
    """Environment variable holding the bearer token for /v1 routes (unset: open)."""
    admin_token_env: str = "DEFECTSCOPE_ADMIN_TOKEN"
    """Environment variable holding the bearer token for /v1/banks routes (unset: the API token)."""


@dataclass(frozen=True)
class BatchOptions:
    """Dynamic batching of a model deployment."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(
                f"invalid batching {self.max_batch_size} / {self.batch_wait_timeout_s}"
            )


@dataclass(frozen=True)
class EncoderOptions(BatchOptions):
    """EncoderDecoder's user_config."""

    torch_threads: int | None = None
    """CPU threads for torch on a replica without a GPU; None keeps Ray's (its num_cpus, at
    least 1)."""


@dataclass(frozen=True)
class MatcherOptions(BatchOptions):
    """BankMatcher's user_config."""

    cache_capacity: int = 8
    """Products whose banks stay cached on the replica's device (LRU)."""
    check_interval_s: float = 1.0
    """How often a cached bank's version is compared with Redis, for missed notifications."""
    fusion: str = "auto"
    score_mode: str = "max"
    topk_fraction: float = 0.01
    min_region_area: float = 0.0
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per-product thresholds that override the calibrated ones."""
    default_threshold: float | None = None
    """Threshold for products that have no calibrated one; None uses the fusion's default."""


@dataclass(frozen=True)
class ExplainerOptions(BatchOptions):
    """Explainer's user_config."""

    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    max_new_tokens: int = 40


@dataclass(frozen=True)
class IngressOptions:
    """Ingress's (and StreamIngest's) request handling."""

    explain: str = ExplainPolicy.ANOMALOUS.value
    """Default explanation policy: never, anomalous or always."""
    line_explain: dict[str, str] = field(default_factory=dict)
    """Per-line explanation policies."""
    max_frame_bytes: int = 16 * 2**20
    """Largest accepted frame (encoded image plus message)."""
    max_inflight: int = 64
    """Frames inspected at once by one replica; more get 503 with Retry-After."""
    retry_after_s: int = 1
    results_ttl_s: int = 24 * 3600
    """How long a frame's result stays readable by id."""
    results_maxlen: int = 100_000
    """Approximate bound of each results:<line> stream."""
    frames_maxlen: int = 100_000
    """Approximate bound of each frames:<line> stream (see the README's drop policy)."""
    backlog_limit: int = 10_000
    """POST /v1/frames answers 429 once a line has this many undelivered frames."""
    heatmaps: bool = True
    """Whether results may carry heatmap PNGs on request."""

    def __post_init__(self) -> None:
        for policy in [self.explain, *self.line_explain.values()]:
            ExplainPolicy(policy)

    def policy_for(self, line: str, requested: str | None = None) -> ExplainPolicy:
        """The request's policy if it names one, else the line's, else the default."""
        return ExplainPolicy(requested or self.line_explain.get(line) or self.explain)


@dataclass(frozen=True)
class StreamOptions(IngressOptions):
    """StreamIngest's user_config: the request handling above plus the consumer group."""

    lines: tuple[str, ...] | list[str] = ()
    """Lines to consume; empty consumes every frames:<line> stream found."""
    exclude_lines: tuple[str, ...] | list[str] = ()
    """Line name patterns (fnmatch) this consumer leaves alone, e.g. lines another app reads."""
    group: str = "defectscope"
    read_count: int = 16
    """Entries read per XREADGROUP."""
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    """Pending entries idle this long belong to a dead consumer and are claimed."""
    max_deliveries: int = 3
    """A frame delivered this many times without a result goes to the dead-letter stream."""
    discover_interval_s: float = 5.0
