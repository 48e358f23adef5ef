"""`modeldeploy serve -f md.yaml`: one ModelDeployment's model on this machine, no cluster.

The pod is built by the same builder the operator uses and its containers run as local
processes (as the local cluster's pod runner does): fetch and verify, then serve with the spec's
quantization and batching settings. Only the listening address and ports are local choices.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import yaml

from modeldeploy_operator import builders
from modeldeploy_operator import spec as api
from modeldeploy_operator.localcluster import podrunner


class ServeError(RuntimeError):
    """A problem with the file or the model that the user has to fix."""


def load(path: Path, name: str | None = None) -> tuple[str, api.ModelDeploymentSpec]:
    """The (name, validated spec) of the ModelDeployment in a YAML file."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except (OSError, yaml.YAMLError) as error:
        raise ServeError(f"cannot read {path}: {error}") from error
    found = [
        d
        for d in documents
        if isinstance(d, dict)
        and d.get("kind") == api.KIND
        and (name is None or d.get("metadata", {}).get("name") == name)
    ]
    if len(found) != 1:
        what = f"a {api.KIND} named {name!r}" if name else f"exactly one {api.KIND}"
        raise ServeError(f"{path} must hold {what}; found {len(found)} (use --name to pick one)")
    md = found[0]
    try:
        spec = api.ModelDeploymentSpec.model_validate(md.get("spec") or {})
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
        )
        raise ServeError(f"invalid {api.KIND} in {path}: {problems}") from error
    return str(md.get("metadata", {}).get("name") or "model"), spec


def _with_ports(argv: list[str], http_port: int, grpc_port: int) -> list[str]:
    ports = {"--http-port": str(http_port), "--grpc-port": str(grpc_port)}
    return [ports.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)]


def serve(
    path: Path,
    *,
    name: str | None,
    host: str,
    http_port: int,
    grpc_port: int,
    workdir: Path,
    pvc_root: Path,
) -> int:
    md_name, spec = load(path, name)
    owner = builders.Owner(name=md_name, namespace="local", uid="local")
    deployment = builders.deployment(owner, spec, default_image="local")
    pod: dict[str, Any] = {
        "spec": deployment["spec"]["template"]["spec"],
        "status": {"podIP": host},
    }
    *init_steps, (serve_argv, serve_env) = podrunner.prepare(pod, workdir, pvc_root)
    for argv, env in init_steps:
        if subprocess.run(argv, env=os.environ | env).returncode != 0:
            raise ServeError(f"{' '.join(argv[1:3])} failed; the model is not served")
    print(
        f"serving {builders.model_name(owner, spec)} on http://{host}:{http_port} "
        f"and grpc {host}:{grpc_port}",
        file=sys.stderr,
        flush=True,
    )
    server = subprocess.Popen(
        _with_ports(serve_argv, http_port, grpc_port), env=os.environ | serve_env
    )
    # The server drains in-flight requests on SIGTERM: pass ours (and Ctrl-C) on to it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _: server.send_signal(received))
    return server.wait()
