"""deploy/helm: our chart for several replicas renders, lints and validates, and its probes, stop timing, cache
claim and user agree with the image; the values for upstream's immich-charts agree with it too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.containerfile import image_facts
from tests.deploy.manifests import Manifest, find, lint_findings, render, validate

HELM = Path(__file__).resolve().parents[2] / "deploy" / "helm"
CHART = HELM / "immich-ml"


def _container(deployment: Manifest) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


def test_chart_lints_renders_and_validates() -> None:
    assert lint_findings(CHART) == []
    manifests = render(CHART)
    validate(manifests)
    assert sorted(m["kind"] for m in manifests) == ["Deployment", "PersistentVolumeClaim", "Service"]


def test_replicas_share_one_cache_claim_behind_one_service() -> None:
    manifests = render(CHART, {"replicaCount": 3})
    deployment, service, claim = (find(manifests, kind) for kind in ("Deployment", "Service", "PersistentVolumeClaim"))
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 3
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    [volume] = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert _container(deployment)["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in _container(deployment)["ports"]}
    assert _container(deployment)["ports"][0]["containerPort"] == image_facts().port


def test_an_existing_claim_replaces_the_chart_s_own() -> None:
    manifests = render(CHART, {"cache": {"existingClaim": "models"}})
    assert [m["kind"] for m in manifests if m["kind"] == "PersistentVolumeClaim"] == []
    [volume] = find(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "models"


def test_readiness_follows_warm_up_and_drain() -> None:
    container = _container(find(render(CHART), "Deployment"))
    assert _env(container)["MACHINE_LEARNING_PING_REQUIRES_READY"] == "true"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["startupProbe"]["httpGet"]["path"] == "/ping"
    liveness = container["livenessProbe"]
    assert liveness["httpGet"]["path"] == "/health"  # 503 with a stuck inference, and while draining:
    drain = float(_env(container)["MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S"])
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain  # never during a drain


def test_grace_period_covers_pre_stop_and_drain() -> None:
    for drain in (25, 50):
        deployment = find(render(CHART, {"shutdown": {"drainSeconds": drain}}), "Deployment")
        container = _container(deployment)
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        shutdown = float(_env(container)["MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S"])
        assert shutdown == drain
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 1


def test_pods_run_as_the_image_user() -> None:
    context = find(render(CHART), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsUser"] == context["fsGroup"] == image_facts().uid


def test_immich_charts_values_agree_with_the_image() -> None:
    """The values for upstream's chart (rendered against the real chart by scripts/check-immich-charts-values,
    which CI cannot fetch): same probes, stop timing and user as our chart."""
    values = yaml.safe_load((HELM / "immich-charts-values.yaml").read_text())["machine-learning"]
    controller = values["controllers"]["main"]
    container = controller["containers"]["main"]
    assert container["probes"]["readiness"]["spec"]["httpGet"]["path"] == "/ping"
    assert container["env"]["MACHINE_LEARNING_PING_REQUIRES_READY"] == "true"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    shutdown = float(container["env"]["MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S"])
    assert controller["pod"]["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 1
    assert controller["pod"]["securityContext"]["runAsUser"] == image_facts().uid
    assert values["persistence"]["cache"]["type"] == "persistentVolumeClaim"
