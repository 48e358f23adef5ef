# syntax=docker/dockerfile:1.7
#
# The operator and runtime images, from one wheel:
#   docker build --target operator     -t modeldeploy-operator .
#   docker build --target runtime      -t modeldeploy-runtime .
#   docker build --target runtime-cuda -t modeldeploy-runtime:cuda .
# `modeldeploy-dev images build` builds the first two here with buildah, from a Python base image
# made of Debian bookworm's packages (`--build-arg PYTHON_IMAGE=localhost/modeldeploy-python:...`);
# tests/packaging/test_packaging_images.py runs them, and test_packaging_dockerfile.py lints this
# file with hadolint.

# Base images pinned by tag; pin by digest (`@sha256:...`) where the registry is reachable. Any
# image with Python 3.11+ as `python` (and its `venv` module) will do.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY contract/ contract/
COPY operator/ operator/
COPY runtime/ runtime/
COPY cli/ cli/
# pip from a virtualenv: the base image need not carry one of its own.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-deps --wheel-dir /dist .

# What every final image shares: no bytecode writes on a read-only root filesystem, no
# current-directory imports (PYTHONSAFEPATH), the virtualenv on PATH, a numeric non-root user
# (so that `runAsNonRoot` can verify it without an /etc/passwd entry).
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/modeldeploy \
    PATH=/opt/modeldeploy/bin:$PATH
LABEL org.opencontainers.image.source="https://github.com/modeldeploy/modeldeploy" \
      org.opencontainers.image.licenses="Apache-2.0"
# The images' user has a name: Python's getpass (kopf names its peers with it) looks it up.
RUN echo "modeldeploy:x:65532:65532:modeldeploy:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "modeldeploy:x:65532:" >> /etc/group

FROM python-base AS operator
# The wheel and the lock files are bind-mounted, not copied: they never land in a layer. The
# dependencies come from the lock, every one pinned with its hashes; then the wheel, without
# dependencies of its own. Nothing installs at run time: pip and setuptools leave the virtualenv,
# and so do the test suites the packages ship (numpy's, some 20 MB).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    --mount=type=bind,from=builder,source=/src/requirements,target=/requirements \
    set -- /dist/modeldeploy-*.whl \
    && python -m venv "$VIRTUAL_ENV" \
    && pip install --require-hashes -r /requirements/operator.txt \
    && pip install --no-deps "$1" \
    && pip uninstall --yes pip setuptools \
    && find "$VIRTUAL_ENV" -depth -type d -name tests -exec rm -rf {} +
LABEL org.opencontainers.image.title="modeldeploy-operator"
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["modeldeploy"]
CMD ["run"]

FROM python-base AS runtime
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    --mount=type=bind,from=builder,source=/src/requirements,target=/requirements \
    set -- /dist/modeldeploy-*.whl \
    && python -m venv "$VIRTUAL_ENV" \
    && pip install --require-hashes -r /requirements/runtime.txt \
    && pip install --no-deps "$1" \
    && pip uninstall --yes pip setuptools \
    && find "$VIRTUAL_ENV" -depth -type d -name tests -exec rm -rf {} +
LABEL org.opencontainers.image.title="modeldeploy-runtime"
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["modeldeploy-runtime"]
CMD ["serve"]

FROM ${CUDA_IMAGE} AS runtime-cuda
ARG ONNXRUNTIME_GPU_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/modeldeploy \
    PATH=/opt/modeldeploy/bin:$PATH
# Ubuntu's own python3 (3.12 on 24.04): the distribution pins its versions for the base tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# onnxruntime and onnxruntime-gpu ship the same `onnxruntime` module: the CPU build that the
# runtime lock pins is swapped for the GPU build in the same layer.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    --mount=type=bind,from=builder,source=/src/requirements,target=/requirements \
    set -- /dist/modeldeploy-*.whl \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --require-hashes -r /requirements/runtime.txt \
    && pip install --no-deps "$1" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"
LABEL org.opencontainers.image.source="https://github.com/modeldeploy/modeldeploy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.title="modeldeploy-runtime-cuda"
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["modeldeploy-runtime"]
CMD ["serve"]
