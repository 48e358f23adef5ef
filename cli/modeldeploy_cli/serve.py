"""`modeldeploy serve -f md.yaml`: one ModelDeployment's model on this machine, no cluster.

The spec becomes runtime settings through the same builder functions that make the pods'
container arguments, and the runtime runs them as it runs in a pod: fetch and verify each
artifact, then serve with the spec's quantization and batching settings. Only the listening
address, the ports and the folders are local choices. Needs the runtime extra only: nothing
here imports kopf, a Kubernetes client or the local cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pydantic
import yaml

from modeldeploy_contract import flags, paths
from modeldeploy_operator import builders
from modeldeploy_operator import spec as api
from modeldeploy_runtime import cli as runtime


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
        raise ServeError(f"invalid {api.KIND} in {path}: {api.problems(error)}") from error
    return str(md.get("metadata", {}).get("name") or "model"), spec


def _runtime(command: str, settings: dict[str, str], environment: dict[str, str]) -> int:
    """Runs `modeldeploy-runtime <command>` in this process with these settings, as a pod's
    container would: the ones with flags as arguments, the others in the environment."""
    os.environ.update({flags.env(field): value for field, value in environment.items()})
    return runtime.main(flags.argv(command, settings))


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
    workdir = workdir.resolve()
    local = {flags.PVC_ROOT: str(pvc_root.resolve())}
    # The pods' folders under /models, under the work folder here.
    for uri, sha256, folder in builders.artifacts(spec):
        dest = str(workdir / PurePosixPath(folder).relative_to(paths.MODELS_DIR))
        if _runtime(flags.FETCH, builders.fetch_settings(uri, sha256, dest), local) != 0:
            raise ServeError(f"fetching {uri} failed; the model is not served")
    settings = builders.serve_settings(owner, spec, str(workdir))
    settings |= {flags.HTTP_PORT: str(http_port), flags.GRPC_PORT: str(grpc_port)}
    local |= {flags.HOST: host, flags.CACHE_DIR: str(workdir / "cache")}
    print(
        f"serving {builders.model_name(owner, spec)} on http://{host}:{http_port} "
        f"and grpc {host}:{grpc_port}",
        file=sys.stderr,
        flush=True,
    )
    # The server drains in-flight requests on SIGTERM and Ctrl-C, as in a pod.
    return _runtime(flags.SERVE, settings, local)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeldeploy serve",
        description="Serve a ModelDeployment's model on this machine, no cluster needed.",
    )
    parser.add_argument("-f", "--file", type=Path, required=True, help="a ModelDeployment YAML")
    parser.add_argument("--name", help="which ModelDeployment, when the file holds several")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".modeldeploy"),
        help="where the model is fetched and cached (default ./.modeldeploy)",
    )
    parser.add_argument(
        "--pvc-root", type=Path, default=Path("."), help="pvc://<claim>/<path> reads <root>/<claim>"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return serve(
            args.file,
            name=args.name,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            workdir=args.workdir,
            pvc_root=args.pvc_root,
        )
    except ServeError as error:
        print(f"modeldeploy serve: {error}", file=sys.stderr)
        return 2
