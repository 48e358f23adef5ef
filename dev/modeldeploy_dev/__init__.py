"""Development tooling, never shipped: the local Kubernetes cluster (its build, PKI, pod network
and real node), the images and their registry, and the generators of the CRD and the README's API
reference.

Installed only by the development install (`make venv`), from a source checkout; the
`modeldeploy-dev` command drives it.
"""
