"""The application: five deployments bound into one Serve app.

    serve run deployments/serve_config.yaml          # one machine
    serve deploy deployments/serve_config.yaml       # a running Ray cluster (or KubeRay RayService)

`build_app` is the config's `import_path`; its `args` are `deployments.config.AppArgs`. Code that
builds the app itself (tests, benchmarks, the demo) calls `compose`, which also takes
per-deployment options.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.bank_matcher import BankMatcher
from deployments.config import AppArgs, from_mapping
from deployments.encoder_decoder import EncoderDecoder
from deployments.explainer import Explainer
from deployments.ingress import Ingress
from deployments.stream_ingest import StreamIngest
from pipeline.errors import ConfigError

DEPLOYMENTS = ("EncoderDecoder", "BankMatcher", "Explainer", "StreamIngest", "Ingress")


def build_app(args: dict[str, Any]) -> Application:
    """The config file's application builder: `args` are `AppArgs` fields (its `args:`)."""
    return compose(args)


def compose(
    args: dict[str, Any] | None = None, options: dict[str, dict[str, Any]] | None = None
) -> Application:
    """Binds EncoderDecoder, BankMatcher, Explainer (when an LLM is configured), StreamIngest and
    the HTTP Ingress that fronts them.

    Args:
        args: `AppArgs` fields.
        options: per-deployment `.options(...)` (num_replicas, user_config, ray_actor_options,
            ...) for programmatic use; a config file sets these in its `deployments:` list.
    """
    values = dict(args or {})
    app_args = from_mapping(AppArgs, values, "application args")
    options = options or {}
    unknown = set(options) - set(DEPLOYMENTS)
    if unknown:
        raise ConfigError(
            f"options for unknown deployments {sorted(unknown)}; known: {DEPLOYMENTS}"
        )

    def configured(deployment: Deployment) -> Deployment:
        return (
            deployment.options(**options[deployment.name])
            if deployment.name in options
            else deployment
        )

    encoder = configured(EncoderDecoder).bind(values)
    matcher = configured(BankMatcher).bind(values)
    explainer = configured(Explainer).bind(values) if app_args.llm else None
    stream = configured(StreamIngest).bind(encoder, matcher, explainer, values)
    return configured(Ingress).bind(encoder, matcher, explainer, stream, values)


app = compose()
"""The application with embedded defaults, for `serve build deployments.app:app`."""
