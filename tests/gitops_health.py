"""What GitOps tools make of a ModelDeployment, asked of the tools' own logic.

`argocd_health` runs the Argo CD health check (gitops/argocd/health.lua) in a real Lua
interpreter; `kstatus` runs Flux's status library (sigs.k8s.io/cli-utils/pkg/kstatus) through
the small Go program in tools/kstatus, built on first use into the local cluster's cache. Both
take any object as a dict, a live one read from the API server as well as a made-up one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeldeploy_dev import build

REPOSITORY = Path(__file__).resolve().parents[1]
HEALTH_LUA = REPOSITORY / "gitops" / "argocd" / "health.lua"
KSTATUS_MODULE = REPOSITORY / "tools" / "kstatus"
LUA = "lua5.4"


@dataclass(frozen=True)
class Health:
    status: str
    message: str


def lua_literal(value: Any) -> str:
    """`value` (JSON-like) as a Lua expression, the way Argo CD hands objects to Lua."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(map(_lua_char, value)) + '"'
    if isinstance(value, Mapping):
        # JSON null becomes an absent key: a Lua table cannot hold nil.
        fields = (
            f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items() if v is not None
        )
        return "{" + ", ".join(fields) + "}"
    if isinstance(value, list | tuple):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def _lua_char(char: str) -> str:
    if char.isascii() and char.isprintable() and char not in '"\\':
        return char
    return "".join(f"\\{byte:03d}" for byte in char.encode())


def argocd_health(obj: Mapping[str, Any]) -> Health:
    if shutil.which(LUA) is None:
        raise RuntimeError(f"no {LUA}: `make tools` installs it (apt-get install lua5.4)")
    harness = (
        f"obj = {lua_literal(obj)}\n"
        f"local hs = assert(loadfile({lua_literal(str(HEALTH_LUA))}))()\n"
        'io.write(hs.status, "\\n", hs.message or "")\n'
    )
    result = subprocess.run([LUA, "-"], input=harness, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"health.lua failed:\n{result.stderr}")
    status, _, message = result.stdout.partition("\n")
    return Health(status, message)


def _kstatus_binary() -> Path:
    """Built once per cli-utils version and source digest; a finished build is only renamed in."""
    go_mod = (KSTATUS_MODULE / "go.mod").read_text()
    match = re.search(r"sigs\.k8s\.io/cli-utils (v\S+)", go_mod)
    assert match, "tools/kstatus/go.mod requires no sigs.k8s.io/cli-utils"
    sources = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        sources.update((KSTATUS_MODULE / name).read_bytes())
    folder = build.cache_dir() / "bin" / f"kstatus-{match.group(1)}-{sources.hexdigest()[:12]}"
    binary = folder / "kstatus"
    if binary.is_file():
        return binary
    if shutil.which("go") is None:
        raise RuntimeError("the Go toolchain is needed to build tools/kstatus: no `go`")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    result = subprocess.run(
        ["go", "build", "-trimpath", "-mod=readonly", "-o", str(staging / "kstatus"), "."],
        cwd=KSTATUS_MODULE,
        env=dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false"),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building tools/kstatus failed:\n{result.stderr[-4000:]}")
    staging.rename(folder)
    return binary


def kstatus(obj: Mapping[str, Any]) -> Health:
    result = subprocess.run(
        [str(_kstatus_binary())],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kstatus failed:\n{result.stderr}")
    verdict = json.loads(result.stdout)
    return Health(verdict["status"], verdict["message"])
