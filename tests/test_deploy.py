"""deploy/: the Kubernetes manifests validate against the API schema (kubernetes-validate, strict), and they
agree with the server: its CLI takes the container's arguments, the probes ask grpc.health.v1 on the port it
serves, the headless Service selects the replicas. (No cluster or image build here: see README.)"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.main import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES_VERSION = "1.31.0"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def deployments() -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == "Deployment"]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_manifest_validates_against_the_kubernetes_schema(path):
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_the_container_runs_the_server_with_arguments_it_takes(deployment):
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = ["--host", "0.0.0.0", "--port", "50051"]
    assert '"musicgen-server", "--host", "0.0.0.0", "--port", "50051"' in dockerfile
    args = build_parser().parse_args(entrypoint + container["args"])
    port = container["ports"][0]["containerPort"]
    assert args.port == port and args.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port  # grpc.health.v1, which the server registers
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert container["resources"]["requests"]["cpu"]
    if args.device == "cuda":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_headless_service_selects_every_replica():
    (service,) = documents(DEPLOY / "k8s" / "service.yaml")
    assert service["spec"]["clusterIP"] == "None"
    for deployment in deployments():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(key) == value for key, value in service["spec"]["selector"].items())
        port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]
        assert port["name"] == service["spec"]["ports"][0]["targetPort"]


def test_the_image_pins_the_torch_of_the_project():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and '"torch==2.13.0"' in (DEPLOY.parent / "pyproject.toml").read_text()
