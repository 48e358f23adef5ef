"""The ModelDeployment CRD, generated from the pydantic models in `spec`.

`python -m modeldeploy_operator.crd` rewrites `crds/modeldeploy.io_modeldeployments.yaml`;
a unit test fails when that file is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from modeldeploy_operator import spec

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{spec.GROUP}_{spec.PLURAL}.yaml"

# The OpenAPI keywords a structural schema may carry; pydantic's others (title, ...) are dropped.
_KEPT_KEYWORDS = (
    "description",
    "type",
    "format",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "maxItems",
    "pattern",
)

_PRINTER_COLUMNS = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Replicas", "type": "string", "jsonPath": ".status.replicaSummary"},
    {"name": "Version", "type": "string", "jsonPath": ".status.model.version"},
    {"name": "URL", "type": "string", "jsonPath": ".status.url"},
    {"name": "RPS", "type": "number", "jsonPath": ".status.metrics.requestsPerSecond"},
    {
        "name": "P99",
        "type": "number",
        "jsonPath": ".status.metrics.latencyP99Ms",
        "description": "99th percentile latency in milliseconds",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translates one pydantic JSON-schema node into a Kubernetes structural schema node."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        # A field's own description and default win over the referenced model's.
        return _structural({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if {v.get("type") for v in variants} == {"integer", "string"}:
            return {**_keep(rest), "x-kubernetes-int-or-string": True}
        (variant,) = variants  # only `X | None` and int-or-string are used in spec.py
        return _structural({**variant, **rest}, defs)

    out = _keep(node)
    if "const" in node:
        out["enum"] = [node["const"]]
    extensions = {k: v for k, v in node.items() if k.startswith("x-kubernetes-")}
    out.update(extensions)
    if node.get("type") == "object":
        additional = node.get("additionalProperties")
        if "properties" in node:
            required = set(node.get("required", []))
            out["properties"] = {
                name: _structural(prop, defs) for name, prop in node["properties"].items()
            }
            if required:
                out["required"] = sorted(required)
        elif additional in (None, True, {}):
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out["additionalProperties"] = _structural(additional, defs)
    if node.get("type") == "array":
        out["items"] = _structural(node["items"], defs)
        if "maxItems" in node:
            out["maxItems"] = node["maxItems"]
    if "default" in node and node["default"] is not None:
        # Nested objects default to {} so that the API server fills in their own defaults.
        out["default"] = {} if isinstance(node["default"], dict) else node["default"]
        if out["default"] in ({}, []) and "properties" not in out:
            del out["default"]
    return out


def _keep(node: dict[str, Any]) -> dict[str, Any]:
    return {k: node[k] for k in _KEPT_KEYWORDS if k in node}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    return _structural(raw, raw.get("$defs", {}))


def build() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    root = {
        "type": "object",
        "description": "A model served by modeldeploy's runtime, with its Deployment, Service "
        "and optional Ingress, autoscaler, disruption budget and network policy.",
        "properties": {
            "apiVersion": {"type": "string", "description": "modeldeploy.io/v1alpha1"},
            "kind": {"type": "string", "description": "ModelDeployment"},
            "metadata": {"type": "object"},
            "spec": schema_of(spec.ModelDeploymentSpec),
            "status": schema_of(spec.ModelDeploymentStatus),
        },
        "required": ["spec"],
        # Every child is named after the ModelDeployment, and a Service name is a DNS-1035 label.
        "x-kubernetes-validations": [
            {
                "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1035 label (at most 63 characters, "
                "lowercase letters, digits and '-', starting with a letter): it names the Service",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{spec.PLURAL}.{spec.GROUP}"},
        "spec": {
            "group": spec.GROUP,
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.KIND.lower(),
                "shortNames": [spec.SHORT_NAME],
                "categories": ["all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": spec.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                        },
                    },
                    "additionalPrinterColumns": _PRINTER_COLUMNS,
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m modeldeploy_operator.crd` from spec.py; do not edit.\n"
    return header + yaml.safe_dump(build(), sort_keys=False, width=100)


def main() -> int:
    CRD_PATH.parent.mkdir(parents=True, exist_ok=True)
    CRD_PATH.write_text(render())
    print(CRD_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
