# syntax=docker/dockerfile:1
#
# Tuneplane API image: the job-submission API and its reconciler (`tuneplane serve`). No torch, no Ray: the
# control plane never trains, it only talks to the database, Kubernetes (KubeRay RayJobs), MLflow and object
# storage. Build from the repository root:
#
#   docker build -f images/api.Dockerfile -t ghcr.io/tuneplane/api:0.1.0 .
#
# Runs as uid 1000 with a read-only root filesystem: the only writes go to $TUNEPLANE_HOME (the Helm chart
# mounts an emptyDir there) and /tmp ($HOME, also an emptyDir in the chart). Nothing secret is baked in: the
# database URL, the token digests and storage credentials arrive at run time from Kubernetes Secrets.

# Pinned base. For reproducible builds also pin the digest, e.g.
#   ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.11-slim-bookworm` prints it). Both stages must use the same
# image: the virtual environment is copied and keeps pointing at /usr/local/bin/python3.11.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Packages for the data preflight of POST /v1/validate (it loads the job's tokenizer; transformers can do that
# without torch). About 160 MB. Build with --build-arg PREFLIGHT_PACKAGES="" for a smaller image whose
# /v1/validate then reports `model: ModuleNotFoundError: No module named 'transformers'` instead of a preflight;
# everything else (submit, queue, follow, cancel, logs, metrics, models) works without them.
ARG PREFLIGHT_PACKAGES="transformers tokenizers"

# ---- build: a virtual environment with the package and its `server` extra, versions from constraints.txt ----
FROM ${PYTHON_IMAGE} AS build
ARG PREFLIGHT_PACKAGES
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the package build needs (README.md is the project's readme in pyproject.toml).
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY platform ./platform
# Not editable: the package is copied into site-packages (with its Alembic migrations as package data), so the
# runtime stage needs no source tree. Building it fetches the console's npm libraries at their pinned integrity
# (setup.py's build hook, platform/tuneplane/console/vendor.json): the build needs registry.npmjs.org. The `train` extra (torch, Ray, DeepSpeed, ...) is deliberately left out.
RUN pip install -c constraints.txt ".[server]" ${PREFLIGHT_PACKAGES} \
    && python -c "import tuneplane.api, tuneplane.backends.kuberay" \
    && ! python -c "import torch" 2>/dev/null

# ---- runtime ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tuneplane-api" \
      org.opencontainers.image.description="Tuneplane job-submission API and reconciler (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 1000, numeric in USER below so the kubelet can verify runAsNonRoot. No login shell, no home of its
# own: HOME is /tmp, writable under readOnlyRootFilesystem once /tmp is a volume.
RUN groupadd --gid 1000 tuneplane \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tuneplane \
    && mkdir -p /var/lib/tuneplane \
    && chown 1000:1000 /var/lib/tuneplane
COPY --from=build /opt/venv /opt/venv
# PYTHONDONTWRITEBYTECODE: no .pyc writes at run time (read-only root; pip compiled the bytecode at build time).
# TUNEPLANE_HOME: the embedded default's database, runs and logs, and where the API keeps its local state; the
# chart mounts an emptyDir there (config.home) and a cluster install keeps its jobs in PostgreSQL.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TUNEPLANE_HOME=/var/lib/tuneplane \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /tmp
USER 1000:1000
EXPOSE 8421
# Probes: GET /healthz (liveness) and GET /readyz (database reachable and migrated); Kubernetes runs them, so
# there is no Docker HEALTHCHECK. Configuration: TUNEPLANE_CONFIG (file), TUNEPLANE_DATABASE_URL (Secret).
ENTRYPOINT ["tuneplane"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8421"]
