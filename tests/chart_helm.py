"""Running the project's helm on the chart in charts/modeldeploy (helpers for the chart tests)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from modeldeploy_dev import build
from modeldeploy_dev.images import Image

CHART = Path(__file__).resolve().parents[1] / "charts" / "modeldeploy"


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [str(build.build_all().helm), *args]
    if kubeconfig is not None:
        command += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def image_values(images: dict[str, Image], pushed: dict[str, str]) -> dict[str, Any]:
    """The chart's image values for the images built here, as the local registry holds them
    (`pushed`: each target's reference there), namespaced: the operator watches what it is told."""
    registry = pushed["operator"].partition("/")[0]
    return {
        "image.repository": f"{registry}/{images['operator'].name}",
        "image.tag": images["operator"].tag,
        "runtimeImage.repository": f"{registry}/{images['runtime'].name}",
        "runtimeImage.tag": images["runtime"].tag,
        "rbac.scope": "namespace",
    }


def set_flags(values: dict[str, Any]) -> list[str]:
    """`--set-json` flags for nested values given as {"rbac.scope": "namespace", ...}."""
    return [
        f for key, value in values.items() for f in ("--set-json", f"{key}={json.dumps(value)}")
    ]


def template(
    values: dict[str, Any] | None = None,
    *,
    release: str = "md",
    namespace: str = "modeldeploy-system",
    extra: tuple[str, ...] = (),
) -> str:
    # Without a cluster helm assumes an old Kubernetes; render for the one the tests run.
    args = ["template", release, str(CHART), "--namespace", namespace]
    args += ["--kube-version", build.KUBERNETES_VERSION, *set_flags(values or {}), *extra]
    return helm(*args).stdout


def render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(template(values, **kwargs)) if doc]
