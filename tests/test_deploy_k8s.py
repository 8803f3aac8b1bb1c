"""deploy/: every Kubernetes manifest against the API's JSON schemas (offline, kubernetes-validate), the
manifests against each other and the app, and the Dockerfiles' essentials (non-root, health check, command)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import kubernetes_validate as kv
except ImportError:  # the Dockerfile and cross-reference checks still run
    kv = None
needs_schemas = pytest.mark.skipif(kv is None, reason="kubernetes-validate is not installed (the schemas)")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes still commonly run, and the newest the package knows.
VERSIONS = ["1.29.0", kv.latest_version() if kv else "latest"]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return doc


@needs_schemas
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kv.validate(doc, version, strict=True)  # strict: unknown fields are errors too


def test_kustomization_lists_every_manifest():
    kustomization = load("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifests())


@needs_schemas
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_output_matches_the_schema():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(docs) == len(manifests())
    for doc in docs:
        kv.validate(doc, VERSIONS[-1], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "realtime"


def test_deployment_gpu_probes_drain_and_storage():
    dep = load("deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env and all(name.startswith("RT_") for name in env)
    assert c["ports"][0]["containerPort"] == int(env["RT_PORT"])
    # The pod outlives the drain: preStop, then the drain deadline, then the drain's close handshakes (5 s).
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + float(env["RT_DRAIN_SECONDS"]) + 5
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {load("pvc.yaml")["metadata"]["name"]}
    assert "ReadWriteMany" in load("pvc.yaml")["spec"]["accessModes"]


def test_service_ingress_and_hpa_point_at_the_deployment():
    dep, svc, ing, hpa = load("deployment.yaml"), load("service.yaml"), load("ingress.yaml"), load("hpa.yaml")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]
    notes = ing["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}


def test_hpa_scales_on_a_metric_the_server_exports():
    from prometheus_client import generate_latest

    from realtime.metrics import Metrics

    hpa = load("hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert f"\n{name} ".encode() in b"\n" + generate_latest(Metrics().registry)
    env = {e["name"]: e.get("value") for e in load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["env"]}
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target <= int(env["RT_CAPACITY"])  # a target above the session slots would never be reached


# ------------------------------------------------------------------ Dockerfiles
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("name,base", [("Dockerfile", "nvidia/cuda:"), ("Dockerfile.cpu", "python:3.11-slim")])
def test_dockerfile_runs_the_server_as_non_root_with_a_health_check(name: str, base: str):
    ins = instructions(ROOT / "deploy" / name)
    first_from = next(rest for word, rest in ins if word == "FROM")
    for arg in [a for word, a in ins if word == "ARG" and "=" in a]:  # resolve ARG defaults used in FROM
        key, _, default = arg.partition("=")
        first_from = first_from.replace(f"${{{key}}}", default.strip('"'))
    assert first_from.startswith(base), first_from
    stage = final_stage(ins)
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    (health,) = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD" in health
    (cmd,) = [rest for word, rest in stage if word == "CMD"]
    assert json.loads(cmd) == ["python", "-m", "realtime", "serve", "--host", "0.0.0.0"]
    assert "8000" in [rest for word, rest in stage if word == "EXPOSE"]


def test_dockerignore_keeps_what_the_build_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for needed in ("pyproject.toml", "README.md", "realtime", "speech", "web", "deploy"):
        assert needed not in ignored
