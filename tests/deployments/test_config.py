"""The deployment files: serve_config.yaml, `serve build`, ray_cluster.yaml, option parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.app import DEPLOYMENTS, compose
from deployments.config import AppArgs, IngressOptions, MatcherOptions, StreamOptions, from_mapping
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_passes_serve_schema_validation() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "deployments.app:build_app"
    assert sorted(d.name for d in application.deployments) == sorted(DEPLOYMENTS)
    from_mapping(AppArgs, application.args, "args")  # the args are AppArgs, nothing else
    options = {
        "Ingress": IngressOptions,
        "BankMatcher": MatcherOptions,
        "StreamIngest": StreamOptions,
    }
    for deployment in application.deployments:
        if deployment.name in options and deployment.user_config:
            from_mapping(options[deployment.name], deployment.user_config, deployment.name)
        if deployment.max_ongoing_requests and deployment.user_config:
            batch = deployment.user_config.get("max_batch_size")
            assert batch is None or deployment.max_ongoing_requests >= batch, deployment.name


def test_serve_build_imports_the_application(tmp_path: Path) -> None:
    output = tmp_path / "built.yaml"
    serve = Path(sys.executable).with_name("serve")
    completed = subprocess.run(
        [str(serve), "build", "deployments.app:app", "-o", str(output)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    built = yaml.safe_load(output.read_text())
    names = {d["name"] for d in built["applications"][0]["deployments"]}
    assert names == set(DEPLOYMENTS)


def test_ray_cluster_config_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert any("pip install" in command for command in prepared["setup_commands"])
    assert any("--metrics-export-port" in c for c in prepared["head_start_ray_commands"])


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        from_mapping(MatcherOptions, {"max_batch": 4}, "BankMatcher user_config")
    with pytest.raises(ConfigError, match="sometimes"):
        from_mapping(IngressOptions, {"explain": "sometimes"}, "Ingress user_config")
    with pytest.raises(ConfigError, match="unknown deployments"):
        compose({}, {"Decoder": {}})


def test_policies_per_line_and_request() -> None:
    options = IngressOptions(explain="anomalous", line_explain={"line-9": "never"})
    assert options.policy_for("line-1").value == "anomalous"
    assert options.policy_for("line-9").value == "never"
    assert options.policy_for("line-9", "always").value == "always"


def test_dashboard_and_scrape_config_name_real_metrics() -> None:
    import json
    import re

    from deployments import metrics

    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    exposed = {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in suffixes}
    dashboard = json.loads((ROOT / "monitoring" / "grafana" / "defectscope.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"defectscope_[a-z_]+", expr)}
    assert used, "the dashboard queries no defectscope metrics"
    assert used <= exposed, sorted(used - exposed)
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["defectscope"]["metrics_path"] == "/metrics"
    assert "file_sd_configs" in jobs["ray"]
