"""Ingress: the HTTP API (FastAPI through Serve).

    POST   /v1/inspect               one frame in, its result out (the verdict; no waiting for
                                     the explanation, which follows in the results stream)
    POST   /v1/frames                push a frame: 202 with its id; the result goes to
                                     results:<line> and GET /v1/results/{frame_id}
    GET    /v1/results/{frame_id}    the newest result of a frame
    GET    /v1/banks                 products with banks
    GET    /v1/banks/{product}       versions, patch counts, bytes, fingerprint, calibration
    POST   /v1/banks/{product}/normals   add normal images (publish, or append a version)
    DELETE /v1/banks/{product}
    GET    /healthz                  200 when Redis answers (with the stream consumer's state),
                                     else 503
    GET    /metrics                  Prometheus exposition of every replica

Frames are a msgpack frame message (`Content-Type: application/x-msgpack`, see
`deployments.messages`) or the encoded image itself (`image/jpeg`, `image/png`,
`application/octet-stream`) with `line`, `product` and optional `camera`, `frame_id`,
`class_name`, `explain`, `timestamp` as query parameters. Add `?heatmap=true` to /v1/inspect for a
base64 PNG overlay in the response.

With `DEFECTSCOPE_API_TOKEN` set, /v1 routes need `Authorization: Bearer <token>`; bank routes need
`DEFECTSCOPE_ADMIN_TOKEN` when that is set. Overload answers 503 (inspect) or 429 (frames) with
`Retry-After`.
"""

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import time
from typing import Any

import msgpack
import numpy as np
import redis
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from bankstore import (
    BankNotFoundError,
    BankStore,
    ProductNameError,
    RedisUnavailableError,
    connect,
)
from deployments import metrics
from deployments.config import AppArgs, IngressOptions, from_mapping
from deployments.encoder_decoder import EncodeRequest
from deployments.inspector import Inspector
from deployments.messages import (
    ErrorCode,
    Frame,
    FrameError,
    error_result,
    frame_from_fields,
    parse_frame,
)
from deployments.metrics import exposition
from deployments.replica import async_client, start_metrics
from deployments.results import FrameQueue, ResultStore
from pipeline.detector import calibrated_bank, threshold_after_append
from pipeline.encoder import EncoderFingerprint
from pipeline.errors import DefectscopeError
from pipeline.images import square_pixels
from pipeline.memory import build_bank, rotations
from pipeline.overlay import overlay

logger = logging.getLogger(__name__)

MSGPACK = "application/x-msgpack"
STATUS_BY_ERROR = {
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.BAD_IMAGE: 422,
    ErrorCode.OVERSIZE: 413,
    ErrorCode.UNKNOWN_PRODUCT: 404,
    ErrorCode.BANK_MISMATCH: 409,
    ErrorCode.FAILED: 500,
}
BANK_BATCH = 16
"""Normal images encoded per call when building a bank."""
QUERY_FIELDS = ("frame_id", "line", "camera", "product", "class_name", "explain", "timestamp")

app = FastAPI(title="defectscope", description="Visual inspection for factory lines.")


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=256,
    max_queued_requests=512,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        encoder: DeploymentHandle,
        matcher: DeploymentHandle,
        explainer: DeploymentHandle | None,
        stream: DeploymentHandle,
        args: dict[str, Any] | None = None,
    ) -> None:
        self.args = from_mapping(AppArgs, args, "Ingress args")
        self.options = IngressOptions()
        self.redis = async_client(self.args.redis_url)
        self.sync_redis = connect(self.args.redis_url)
        self.store = BankStore.connect(self.args.redis_url, prefix=self.args.redis_prefix)
        self.results = ResultStore(
            self.redis,
            self.args.redis_prefix,
            self.options.results_ttl_s,
            self.options.results_maxlen,
        )
        self.queue = FrameQueue(
            self.redis, self.args.redis_prefix, self.options.frames_maxlen, "defectscope"
        )
        self.inspector = Inspector(encoder, matcher, explainer, self.results, self.options)
        self.encoder, self.matcher, self.stream = encoder, matcher, stream
        self.inflight = 0
        self.api_token = os.environ.get(self.args.api_token_env) or None
        self.admin_token = os.environ.get(self.args.admin_token_env) or self.api_token
        if self.api_token is None:
            logger.warning("%s is not set: the /v1 routes are open", self.args.api_token_env)
        self.replica, self.snapshots = start_metrics(self.args, "ingress")

    def reconfigure(self, config: dict[str, Any]) -> None:
        options = from_mapping(IngressOptions, config, "Ingress user_config")
        self.options = options
        self.inspector.options = options
        self.results.ttl_s, self.results.maxlen = options.results_ttl_s, options.results_maxlen
        self.queue.maxlen = options.frames_maxlen

    # Frames ------------------------------------------------------------------------------------

    @app.post("/v1/inspect")
    async def inspect(self, request: Request, heatmap: bool = False) -> Response:
        if (denied := self._authorise(request, admin=False)) is not None:
            return denied
        if self.inflight >= self.options.max_inflight:
            metrics.FRAMES.labels(
                metrics.LINE(request.query_params.get("line", "unknown")), "rejected"
            ).inc()
            return self._overloaded(503, "too many frames in flight")
        self.inflight += 1
        try:
            frame = await self._read_frame(request)
            inspected = await self.inspector.inspect(frame)
        except FrameError as error:
            return await self._frame_error(request, error)
        except BackPressureError as error:
            return self._overloaded(error.status_code, str(error), error.retry_after_s)
        except (RedisUnavailableError, redis.RedisError) as error:
            return self._unavailable(error)
        finally:
            self.inflight -= 1
        result = inspected.result
        body = result.to_dict()
        if result.status == "error":
            return JSONResponse(body, status_code=STATUS_BY_ERROR[ErrorCode(result.error_code)])
        if heatmap and self.options.heatmaps and inspected.match is not None:
            body["heatmap_png"] = await asyncio.to_thread(self._heatmap, inspected)
        return JSONResponse(body)

    @app.post("/v1/frames", status_code=202)
    async def push(self, request: Request) -> Response:
        if (denied := self._authorise(request, admin=False)) is not None:
            return denied
        try:
            frame = await self._read_frame(request)
        except FrameError as error:
            return await self._frame_error(request, error)
        try:
            backlog = await self.queue.backlog(frame.line)
            if backlog >= self.options.backlog_limit:
                metrics.FRAMES.labels(metrics.LINE(frame.line), "rejected").inc()
                return self._overloaded(429, f"line {frame.line} has {backlog} frames waiting")
            entry = await self.queue.push(frame)
        except redis.RedisError as error:
            return self._unavailable(error)
        return JSONResponse(
            {"frame_id": frame.frame_id, "line": frame.line, "entry_id": entry}, status_code=202
        )

    @app.get("/v1/results/{frame_id}")
    async def result(self, frame_id: str, request: Request) -> Response:
        if (denied := self._authorise(request, admin=False)) is not None:
            return denied
        try:
            found = await self.results.get(frame_id)
        except redis.RedisError as error:
            return self._unavailable(error)
        if found is None:
            return JSONResponse({"error": f"no result for frame {frame_id!r}"}, status_code=404)
        return JSONResponse(found.to_dict())

    async def _read_frame(self, request: Request) -> Frame:
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.options.max_frame_bytes:
            raise FrameError(
                ErrorCode.OVERSIZE,
                f"frame of {declared} bytes, above the {self.options.max_frame_bytes} limit",
            )
        body = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type == MSGPACK:
            defaults = {
                key: request.query_params[key]
                for key in QUERY_FIELDS
                if key in request.query_params
            }
            return parse_frame(body, self.options.max_frame_bytes, defaults)
        if len(body) > self.options.max_frame_bytes:
            raise FrameError(
                ErrorCode.OVERSIZE,
                f"frame of {len(body)} bytes, above the {self.options.max_frame_bytes} limit",
            )
        fields: dict[str, Any] = {key: request.query_params.get(key) for key in QUERY_FIELDS}
        fields = {key: value for key, value in fields.items() if value is not None}
        fields["image"] = body
        fields["encoding"] = {"image/png": "png"}.get(content_type, "jpeg")
        return frame_from_fields(fields)

    async def _frame_error(self, request: Request, error: FrameError) -> Response:
        """A bad frame: its error result is stored (when it names a line) and returned as 4xx."""
        fallback = {key: request.query_params.get(key) for key in QUERY_FIELDS}
        result = error_result(None, error.code, str(error), fallback)
        if fallback.get("line") and fallback.get("frame_id"):
            await self.inspector.store(result)
        else:
            metrics.FRAMES.labels(metrics.LINE(result.line), error.code.value).inc()
        return JSONResponse(result.to_dict(), status_code=STATUS_BY_ERROR[error.code])

    def _overloaded(self, status: int, reason: str, retry_after_s: float | None = None) -> Response:
        retry = max(1, round(retry_after_s or self.options.retry_after_s))
        return JSONResponse(
            {"error": f"overloaded: {reason}; retry after {retry} s"},
            status_code=status,
            headers={"Retry-After": str(retry)},
        )

    def _unavailable(self, error: Exception) -> Response:
        """Redis is down: nothing was stored; the client should retry the frame."""
        logger.warning("Redis unavailable: %s", error)
        retry = str(max(1, self.options.retry_after_s))
        return JSONResponse(
            {"error": f"Redis unavailable ({str(error).splitlines()[0]}); nothing was stored, "
             f"retry the frame"},
            status_code=503,
            headers={"Retry-After": retry},
        )  # fmt: skip

    def _heatmap(self, inspected: Any) -> str:
        match = inspected.match
        picture = overlay(
            inspected.image,
            match.anomaly_map.astype(np.float32),
            match.verdict.threshold,
            match.verdict.regions,
        )
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    # Banks -------------------------------------------------------------------------------------

    @app.get("/v1/banks")
    async def banks(self, request: Request) -> Response:
        if (denied := self._authorise(request, admin=True)) is not None:
            return denied
        products = await asyncio.to_thread(self.store.list)
        return JSONResponse([product.to_dict() for product in products])

    @app.get("/v1/banks/{product}")
    async def bank(self, product: str, request: Request) -> Response:
        if (denied := self._authorise(request, admin=True)) is not None:
            return denied
        try:
            info = await asyncio.to_thread(self.store.info, product)
        except (BankNotFoundError, ProductNameError) as error:
            return JSONResponse({"error": str(error)}, status_code=404)
        return JSONResponse(info.to_dict())

    @app.delete("/v1/banks/{product}")
    async def delete_bank(self, product: str, request: Request) -> Response:
        if (denied := self._authorise(request, admin=True)) is not None:
            return denied
        try:
            deleted = await asyncio.to_thread(self.store.delete, product)
        except ProductNameError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        if not deleted:
            return JSONResponse({"error": f"no bank for product {product!r}"}, status_code=404)
        return JSONResponse({"product": product, "deleted": True})

    @app.post("/v1/banks/{product}/normals")
    async def add_normals(self, product: str, request: Request) -> Response:
        """Body: msgpack or JSON map {images: [bytes | base64 str], class_name?, augment?,
        coreset_ratio?}. Publishes a new bank, or appends to the product's current one."""
        if (denied := self._authorise(request, admin=True)) is not None:
            return denied
        try:
            request_fields = await self._read_normals(request)
            summary = await self._add_normals(product, **request_fields)
        except (FrameError, DefectscopeError) as error:
            status = STATUS_BY_ERROR.get(getattr(error, "code", None), 400)
            return JSONResponse({"error": str(error)}, status_code=status)
        return JSONResponse(summary, status_code=201)

    async def _read_normals(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            fields = (
                msgpack.unpackb(body, raw=False) if content_type == MSGPACK else json.loads(body)
            )
        except (ValueError, msgpack.ExtraData, msgpack.FormatError) as error:
            raise FrameError(ErrorCode.BAD_MESSAGE, f"unreadable request body ({error})") from error
        images = fields.get("images") if isinstance(fields, dict) else None
        if not images:
            raise FrameError(ErrorCode.BAD_MESSAGE, "no images: a bank needs at least one")
        decoded = [base64.b64decode(image) if isinstance(image, str) else image for image in images]
        return {
            "images": decoded,
            "class_name": fields.get("class_name"),
            "augment": bool(fields.get("augment", False)),
            "coreset_ratio": fields.get("coreset_ratio"),
        }

    async def _add_normals(
        self,
        product: str,
        images: list[bytes],
        class_name: str | None,
        augment: bool,
        coreset_ratio: float | None,
    ) -> dict[str, Any]:
        model = await self.inspector.model_info()
        size = model["image_size"]
        pictures = []
        for index, data in enumerate(images):
            frame = Frame(f"normal-{index}", "bank", "bank", product, time.time(), "jpeg", data)
            pictures.append(await asyncio.to_thread(frame.decode))
        views = [rotations(picture) if augment else [picture] for picture in pictures]
        requests = [
            EncodeRequest(square_pixels(view, size), class_name)
            for picture_views in views
            for view in picture_views
        ]
        encoded = []
        for start in range(0, len(requests), BANK_BATCH):
            encoded += await self.encoder.encode_many.remote(requests[start : start + BANK_BATCH])
        stacked = torch.from_numpy(np.stack([item.patch_tokens for item in encoded])).float()
        tokens = [stacked[:, stage] for stage in range(stacked.shape[1])]  # (K * V, L, C) each
        fingerprint = EncoderFingerprint.from_dict(model["fingerprint_dict"])
        sources = [hashlib.sha256(data).hexdigest() for data in images]
        rules = await self.matcher.rules.remote()

        current = await asyncio.to_thread(self.store.current_version, product)
        if current is None:
            bank = calibrated_bank(tokens, len(views[0]), size, rules, coreset_ratio)
            published = await asyncio.to_thread(
                self.store.publish,
                product,
                bank,
                fingerprint,
                sources,
                augment,
                coreset_ratio,
                class_name,
            )
        else:
            # The new images are not in the current bank: their scores against it are held out.
            first_views = [encoded[index * len(views[0])] for index in range(len(pictures))]
            sizes = [picture.size for picture in pictures]
            matches = await self.matcher.match_many.remote(
                [product] * len(first_views), first_views, sizes
            )
            failed = next((match for match in matches if isinstance(match, Exception)), None)
            if failed is not None:
                raise failed
            info = (await asyncio.to_thread(self.store.info, product)).current_info
            threshold = threshold_after_append(
                info.threshold if info else None, torch.tensor([m.verdict.score for m in matches])
            )
            bank = build_bank(tokens)
            published = await asyncio.to_thread(
                self.store.append,
                product,
                bank,
                fingerprint,
                sources,
                augment,
                coreset_ratio,
                threshold,
                class_name,
            )
        return {
            "product": product,
            "version": published.version,
            "current": published.current,
            "num_patches": list(published.num_patches),
            "nbytes": published.nbytes,
            "images": len(images),
        }

    # Operations --------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> Response:
        try:
            await self.redis.ping()
        except Exception as error:  # any Redis failure makes this replica unhealthy to callers
            return JSONResponse(
                {"status": "redis unavailable", "error": str(error)}, status_code=503
            )
        try:
            stream = await asyncio.wait_for(self.stream.status.remote(), timeout=5)
        except Exception as error:  # the stream consumer's state is reported, not required
            stream = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}
        return JSONResponse({"status": "ok", "replica": self.replica, "stream": stream})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        text = await asyncio.to_thread(
            exposition, self.sync_redis, self.args.redis_prefix, "ingress", self.replica
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _authorise(self, request: Request, admin: bool) -> Response | None:
        token = self.admin_token if admin else self.api_token
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), token):
            return None
        which = "admin token" if admin and self.admin_token != self.api_token else "API token"
        return JSONResponse(
            {"error": f"missing or wrong bearer {which}"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
