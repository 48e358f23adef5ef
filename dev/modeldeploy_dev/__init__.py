"""Development tooling, never shipped: the local Kubernetes control plane (its build, PKI and
pod runner) and the generators of the CRD and the README's API reference.

Installed only by the development install (`make venv`), from a source checkout; the
`modeldeploy-dev` command drives it.
"""
