"""Helm charts rendered and linted offline (helm-python-sdk: Helm's own Go code, no cluster, no `helm` binary) and
the manifests checked against the Kubernetes API schemas (kubernetes-validate). Used by tests/deploy/ and
scripts/check-immich-charts-values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

__all__ = ["KUBERNETES_VERSIONS", "Manifest", "find", "lint_findings", "render", "validate"]

Manifest = dict[str, Any]

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
"""The oldest release still common in clusters and the newest the installed schemas know."""


def render(chart: Path, values: dict[str, Any] | None = None, *, release: str = "immich") -> list[Manifest]:
    """Every manifest `helm template` would print for `chart` with `values`."""
    rendered = helm.Chart.load(chart).render(values, name=release, namespace="immich", is_install=True)
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def lint_findings(chart: Path, values: dict[str, Any] | None = None) -> list[str]:
    """`helm lint --strict`'s warnings and errors (its "info" notes, such as a missing icon, are left out)."""
    report = helm.lint(chart, values, strict=True)
    warnings = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return warnings + list(report["errors"])


def validate(manifests: list[Manifest]) -> None:
    """Raise kubernetes_validate.ValidationError naming the field when a manifest breaks an API schema (unknown
    fields included) of any version in KUBERNETES_VERSIONS."""
    for version in KUBERNETES_VERSIONS:
        for manifest in manifests:
            kubernetes_validate.validate(manifest, version, strict=True)


def find(manifests: list[Manifest], kind: str, name_part: str = "") -> Manifest:
    """The one manifest of `kind` whose name contains `name_part`."""
    found = [m for m in manifests if m["kind"] == kind and name_part in m["metadata"]["name"]]
    assert len(found) == 1, f"{len(found)} {kind} manifests named *{name_part}*: {[m['metadata'] for m in found]}"
    return found[0]
