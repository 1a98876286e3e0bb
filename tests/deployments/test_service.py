"""The service under real Ray Serve and real Redis: HTTP, streams, banks, explanations, metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from deployments.messages import Frame
from tests.deployments.conftest import (
    BACKLOG_LIMIT,
    PAUSED_LINE,
    Service,
    add_normals,
    normal_bytes,
    wait_for_results,
)
from tests.helpers import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

DEFECTS = ("chip", "crack", "rust", "scratch")
GOOD = ("good_00", "good_01", "good_02")


def sample_bytes(sample_dir: Path) -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in sorted((sample_dir / "test").glob("*.jpg"))}


def xadd_frame(service: Service, frame: Frame) -> None:
    service.client.xadd(f"{service.prefix}frames:{frame.line}", {"frame": frame.to_message()})


def frame(line: str, image: bytes, product: str = "washer", **fields: object) -> Frame:
    return Frame(
        f"{line}-{uuid.uuid4().hex[:10]}",
        line,
        "cam-1",
        product,
        time.time(),
        "jpeg",
        image,
        **fields,
    )


def test_http_inspect_scores_painted_defects_above_good_parts(
    service: Service, sample_dir: Path
) -> None:
    images = sample_bytes(sample_dir)
    results = {}
    with service.http() as http:
        for name, data in images.items():
            response = http.post(
                "/v1/inspect",
                params={
                    "line": "http-line",
                    "product": "washer",
                    "frame_id": f"http-{name}-{uuid.uuid4().hex[:6]}",
                },
                content=data,
                headers={"content-type": "image/jpeg"},
            )
            assert response.status_code == 200, response.text
            results[name] = response.json()
    assert min(results[name]["score"] for name in DEFECTS) > max(
        results[name]["score"] for name in GOOD
    )
    assert all(results[name]["anomalous"] for name in DEFECTS)
    rust = results["rust"]
    assert rust["regions"][0]["location"] == "bottom left"
    assert set(rust) >= {
        "score",
        "anomalous",
        "regions",
        "answer",
        "timings",
        "bank_version",
        "model",
    }
    assert rust["bank_version"] >= 1 and "defectscope-tiny" in rust["model"]
    assert rust["explanation"] == "pending" and results["good_00"]["explanation"] == "none"
    with service.http() as http:
        stored = http.get(f"/v1/results/{rust['frame_id']}").json()
    assert stored["frame_id"] == rust["frame_id"] and stored["score"] == pytest.approx(
        rust["score"]
    )


def test_heatmap_on_request(service: Service, sample_dir: Path) -> None:
    with service.http() as http:
        response = http.post(
            "/v1/inspect",
            params={"line": "http-line", "product": "washer", "heatmap": "true"},
            content=sample_bytes(sample_dir)["crack"],
            headers={"content-type": "image/jpeg"},
        )
    picture = Image.open(io.BytesIO(base64.b64decode(response.json()["heatmap_png"])))
    assert picture.format == "PNG" and picture.size == (256, 256)


def test_raw_frames_over_msgpack(service: Service, sample_dir: Path) -> None:
    pixels = np.asarray(Image.open(sample_dir / "test" / "rust.jpg").convert("RGB"))
    message = msgpack.packb(
        {
            "line": "raw-line",
            "product": "washer",
            "encoding": "raw",
            "shape": list(pixels.shape),
            "dtype": "uint8",
            "image": pixels.tobytes(),
        },
        use_bin_type=True,
    )
    with service.http() as http:
        response = http.post(
            "/v1/inspect", content=message, headers={"content-type": "application/x-msgpack"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["anomalous"] is True


@pytest.mark.parametrize(
    ("params", "body", "status", "code"),
    [
        ({"line": "bad-line", "product": "washer"}, b"not an image", 422, "bad_image"),
        ({"line": "bad-line", "product": "no-such-product"}, None, 404, "unknown_product"),
        ({"line": "bad line!", "product": "washer"}, None, 400, "bad_message"),
    ],
)
def test_bad_frames_get_clear_errors(service, sample_dir, params, body, status, code) -> None:
    data = body if body is not None else normal_bytes(sample_dir)[0]
    with service.http() as http:
        response = http.post(
            "/v1/inspect", params=params, content=data, headers={"content-type": "image/jpeg"}
        )
        assert response.status_code == status
        assert response.json()["error_code"] == code and response.json()["status"] == "error"
        # The service keeps serving everyone else.
        ok = http.post(
            "/v1/inspect",
            params={"line": "bad-line", "product": "washer"},
            content=data if body is None else normal_bytes(sample_dir)[0],
            headers={"content-type": "image/jpeg"},
        )
        assert ok.status_code == 200


def test_oversize_frame_is_refused(service: Service) -> None:
    with service.http() as http:
        response = http.post(
            "/v1/inspect",
            params={"line": "bad-line", "product": "washer"},
            content=bytes(17 * 2**20),
            headers={"content-type": "image/jpeg"},
        )
    assert response.status_code == 413 and response.json()["error_code"] == "oversize"


def test_every_streamed_frame_gets_exactly_one_verdict(service: Service, sample_dir: Path) -> None:
    line = f"stream-{uuid.uuid4().hex[:6]}"
    images = sample_bytes(sample_dir)
    frames = [frame(line, images[name]) for name in [*images, *images]]
    corrupt = frame(line, b"\xff\xd8\xff truncated jpeg")
    for item in [*frames[:5], corrupt, *frames[5:]]:
        xadd_frame(service, item)
    service.client.xadd(f"{service.prefix}frames:{line}", {"frame": b"\x93not a map"})
    ids = {item.frame_id for item in frames} | {corrupt.frame_id}

    entries = wait_for_results(service, line, ids)
    verdicts = [frame_id for frame_id, kind, _ in entries if kind == "verdict"]
    wanted = [frame_id for frame_id in verdicts if frame_id in ids]
    assert sorted(wanted) == sorted(ids)  # every frame once, none twice
    by_id = {frame_id: result for frame_id, kind, result in entries if kind == "verdict"}
    assert by_id[corrupt.frame_id]["error_code"] == "bad_image"
    assert any(result["error_code"] == "bad_message" for result in by_id.values())
    scores = {item.frame_id: by_id[item.frame_id]["score"] for item in frames}
    names = [*images, *images]
    defect_scores = [
        scores[f.frame_id] for f, n in zip(frames, names, strict=False) if n in DEFECTS
    ]
    good_scores = [scores[f.frame_id] for f, n in zip(frames, names, strict=False) if n in GOOD]
    assert min(defect_scores) > max(good_scores)
    # Acknowledged frames leave the stream: nothing pending, nothing left.
    key = f"{service.prefix}frames:{line}"
    wait_for(lambda: service.client.xlen(key) == 0, 30, "acknowledged frames to be deleted")
    assert service.client.xpending(key, "defectscope")["pending"] == 0


def test_explanations_follow_their_verdicts(service: Service, sample_dir: Path) -> None:
    line = f"explain-{uuid.uuid4().hex[:6]}"
    images = sample_bytes(sample_dir)
    defective, good = frame(line, images["crack"]), frame(line, images["good_00"])
    always = frame(line, images["good_01"], explain="always")
    for item in (defective, good, always):
        xadd_frame(service, item)
    entries = wait_for_results(
        service, line, {defective.frame_id, always.frame_id}, ("verdict", "explanation")
    )
    order = [(frame_id, kind) for frame_id, kind, _ in entries]
    assert order.index((defective.frame_id, "verdict")) < order.index(
        (defective.frame_id, "explanation")
    )
    explained = {frame_id: result for frame_id, kind, result in entries if kind == "explanation"}
    assert explained[defective.frame_id]["explanation"] == "done"
    assert explained[defective.frame_id]["answer"].startswith(
        "Yes"
    )  # never contradicts the verdict
    assert explained[always.frame_id]["answer"].startswith("No")
    entries = wait_for_results(service, line, {good.frame_id})
    assert (good.frame_id, "explanation") not in [(f, k) for f, k, _ in entries]


def test_frames_of_a_dead_consumer_are_taken_over_once(service: Service, sample_dir: Path) -> None:
    from deployments.messages import Result
    from deployments.results import ResultStore

    line = f"takeover-{uuid.uuid4().hex[:6]}"
    key = f"{service.prefix}frames:{line}"
    images = sample_bytes(sample_dir)
    service.client.xgroup_create(key, "defectscope", id="0", mkstream=True)
    unfinished, finished = frame(line, images["rust"]), frame(line, images["good_02"])
    xadd_frame(service, unfinished)
    xadd_frame(service, finished)
    # A consumer reads both, writes the second's verdict, and dies before acknowledging either.
    service.client.xreadgroup("defectscope", "dead-consumer", {key: ">"}, count=2)

    async def write_verdict() -> None:
        from deployments.replica import async_client

        client = async_client(service.redis_url)
        store = ResultStore(client, service.prefix, 3600, 1000)
        now = time.time()
        await store.write_verdict(
            Result(
                finished.frame_id,
                line,
                "cam-1",
                "washer",
                now,
                now,
                now,
                score=0.01,
                anomalous=False,
                threshold=0.1,
            )
        )
        await client.aclose()

    asyncio.run(write_verdict())
    entries = wait_for_results(service, line, {unfinished.frame_id, finished.frame_id})
    verdicts = [frame_id for frame_id, kind, _ in entries if kind == "verdict"]
    assert sorted(verdicts) == sorted([unfinished.frame_id, finished.frame_id])
    pending = lambda: service.client.xpending(key, "defectscope")["pending"]  # noqa: E731
    wait_for(lambda: pending() == 0, 30, "the taken-over frames to be acknowledged")


def test_repeatedly_failing_frames_are_dead_lettered(service: Service, sample_dir: Path) -> None:
    line = f"deadletter-{uuid.uuid4().hex[:6]}"
    key = f"{service.prefix}frames:{line}"
    service.client.xgroup_create(key, "defectscope", id="0", mkstream=True)
    doomed = frame(line, sample_bytes(sample_dir)["chip"])
    xadd_frame(service, doomed)
    # Delivered (and failed) five times already, by consumers that are gone.
    ((_, [(entry_id, _)]),) = service.client.xreadgroup("defectscope", "gone", {key: ">"}, count=1)
    service.client.execute_command(
        "XCLAIM", key, "defectscope", "gone", 0, entry_id, "RETRYCOUNT", 5
    )

    entries = wait_for_results(service, line, {doomed.frame_id})
    (result,) = [r for f, k, r in entries if f == doomed.frame_id and k == "verdict"]
    assert result["status"] == "error" and result["error_code"] == "failed"
    letters = service.client.xrange(f"{service.prefix}deadletter:{line}")
    assert [fields[b"frame_id"].decode() for _, fields in letters] == [doomed.frame_id]
    assert b"deliveries" in letters[0][1][b"reason"]


def test_bank_published_while_frames_flow_is_picked_up(service: Service, sample_dir: Path) -> None:
    product = f"plate-{uuid.uuid4().hex[:6]}"
    normals = normal_bytes(sample_dir)
    first = add_normals(service, product, normals[:3])
    line = f"rollover-{uuid.uuid4().hex[:6]}"
    image = sample_bytes(sample_dir)["good_01"]
    early = [frame(line, image, product=product) for _ in range(3)]
    for item in early:
        xadd_frame(service, item)
    wait_for_results(service, line, {item.frame_id for item in early})
    second = add_normals(service, product, normals[3:])  # frames keep flowing meanwhile
    assert second["version"] > first["version"] and second["num_patches"][0] == 8 * 256
    # The matcher hears of the new version on its own (pub/sub, or its revision check).
    matcher = serve.get_deployment_handle("BankMatcher", app_name="defectscope")

    def switched() -> bool:
        return matcher.bank_versions.remote().result().get(product) == second["version"]

    wait_for(switched, 30, "the matcher to switch to the new bank version")
    late = [frame(line, image, product=product) for _ in range(3)]
    for item in late:
        xadd_frame(service, item)

    entries = wait_for_results(service, line, {item.frame_id for item in early + late})
    versions = {f: r["bank_version"] for f, k, r in entries if k == "verdict"}
    assert {versions[item.frame_id] for item in early} == {first["version"]}
    assert {versions[item.frame_id] for item in late} == {second["version"]}
    # The bigger bank knows this good part better: lower scores, no restart needed.
    scores = {f: r["score"] for f, k, r in entries if k == "verdict"}
    assert max(scores[item.frame_id] for item in late) < min(
        scores[item.frame_id] for item in early
    )


def test_bank_routes(service: Service) -> None:
    with service.admin() as http:
        listed = http.get("/v1/banks").json()
        assert "washer" in {product["product"] for product in listed}
        shown = http.get("/v1/banks/washer").json()
        assert shown["current"] >= 1 and shown["versions"][-1]["num_patches"] == [2048] * 4
        assert http.get("/v1/banks/no-such-product").status_code == 404
        assert (
            http.post(
                "/v1/banks/x/normals", content=b"{}", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )


def test_bank_delete(service: Service, sample_dir: Path) -> None:
    product = f"gone-{uuid.uuid4().hex[:6]}"
    add_normals(service, product, normal_bytes(sample_dir)[:2])
    with service.admin() as http:
        assert http.delete(f"/v1/banks/{product}").json()["deleted"] is True
        assert http.delete(f"/v1/banks/{product}").status_code == 404
    with service.http() as http:
        response = http.post(
            "/v1/inspect",
            params={"line": "x", "product": product},
            content=normal_bytes(sample_dir)[0],
            headers={"content-type": "image/jpeg"},
        )
    assert response.status_code == 404


def test_tokens_guard_the_api(service: Service, sample_dir: Path) -> None:
    image = normal_bytes(sample_dir)[0]
    params = {"line": "auth-line", "product": "washer"}
    with service.http(token=None) as http:
        assert http.post("/v1/inspect", params=params, content=image).status_code == 401
        health = http.get("/healthz")  # operations stay open
        assert health.status_code == 200 and health.json()["stream"]["consumer"].startswith(
            "consumer-"
        )
    with service.http(token="wrong") as http:
        assert http.post("/v1/inspect", params=params, content=image).status_code == 401
    with service.http() as http:  # the line token is not the admin token
        assert http.get("/v1/banks").status_code == 401
        assert http.post("/v1/inspect", params=params, content=image).status_code == 200


def test_push_backs_off_when_the_line_is_behind(service: Service, sample_dir: Path) -> None:
    image = normal_bytes(sample_dir)[0]
    statuses = []
    with service.http() as http:
        for _ in range(BACKLOG_LIMIT + 2):
            response = http.post(
                "/v1/frames",
                params={"line": PAUSED_LINE, "product": "washer"},
                content=image,
                headers={"content-type": "image/jpeg"},
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                break
    assert statuses[-1] == 429 and statuses.count(202) >= BACKLOG_LIMIT - 1


def test_metrics_parse_and_cover_the_pipeline(service: Service, sample_dir: Path) -> None:
    expected = {
        "defectscope_frames",
        "defectscope_anomalies",
        "defectscope_frame_latency_seconds",
        "defectscope_stage_latency_seconds",
        "defectscope_anomaly_score",
        "defectscope_bank_patches",
        "defectscope_bank_bytes",
        "defectscope_stream_pending",
        "defectscope_stream_lag",
        "defectscope_explanations",
        "defectscope_llm_tokens",
        "defectscope_batch_size",
    }
    families: dict = {}

    def scraped_all() -> bool:
        with service.http() as http:
            text = http.get("/metrics").text
        families.clear()
        families.update({family.name: family for family in text_string_to_metric_families(text)})
        return expected <= {name for name, family in families.items() if family.samples}

    with service.http() as http:
        rust = sample_bytes(sample_dir)["rust"]
        http.post("/v1/inspect", params={"line": "metrics-line", "product": "washer"}, content=rust)
        # And one through a stream, so the stream gauges have a line to report.
        http.post("/v1/frames", params={"line": "metrics-line", "product": "washer"}, content=rust)
    # Other replicas' snapshots arrive every few seconds.
    wait_for(scraped_all, 60, "every metric family to have samples", interval_s=0.5)
    with_samples = {name for name, family in families.items() if family.samples}
    assert expected <= with_samples, sorted(expected - with_samples)
    stages = {s.labels["stage"] for s in families["defectscope_stage_latency_seconds"].samples}
    assert {"decode", "encode", "match"} <= stages
    components = {s.labels["component"] for s in families["defectscope_frames"].samples}
    assert components <= {"ingress", "stream"}
    for family in families.values():
        for sample in family.samples:
            assert "frame_id" not in sample.labels
