# syntax=docker/dockerfile:1
#
# Tuneplane training runtime: the image of every RayJob pod (Ray head, workers and the K8sJobMode submitter).
# Ray 2.60.0 + Python 3.11 + CUDA 12.8, torch 2.13.0 (CUDA build), DeepSpeed, PEFT, transformers, MLflow and the
# tuneplane package with its `train` extra, all at the versions in constraints.txt. Build from the repo root:
#
#   docker build -f images/runtime.Dockerfile -t ghcr.io/tuneplane/runtime:0.1.0 .
#
# and set the platform config's `kuberay.image` (the chart's runtimeImage.*) to the pushed tag or digest.
#
# No ENTRYPOINT and no CMD of our own: KubeRay sets each container's command itself (`ray start --head ...` on
# the head, `ray start --address=...` on the workers, `ray job submit ...` in the submitter), and an
# ENTRYPOINT would be prepended to those and break them. The job itself is the RayJob's entrypoint, fixed by
# the platform: `python -m tuneplane.train --spec /etc/tuneplane/spec/spec.yaml` (the spec is a ConfigMap
# mounted read-only there; nothing from the spec reaches a command line).

# Pinned base: the Ray release the platform config names (kuberay.ray_version / RayCluster rayVersion must
# match the Ray inside the image), Python 3.11, CUDA 12.8. Pin the digest too for reproducible builds:
#   ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128@sha256:<digest>
# The image runs as user `ray` (uid 1000, gid 100, home /home/ray), which is what the platform's pods expect
# (runAsUser 1000, runAsNonRoot), with Python in /home/ray/anaconda3.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# torch wheels carry their own CUDA libraries; this index must match the base image's CUDA major version and
# the GPU nodes' driver must support it (CUDA 12.8 needs driver >= 570 on the nodes; see docs/operations.md).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0

# DS_BUILD_OPS=0: install DeepSpeed without compiling its CUDA/C++ extensions (no nvcc in the image). The recipe
# uses torch's AdamW (also under ZeRO-Offload: zero_force_ds_cpu_optimizer is off), so no DeepSpeed op is ever
# built at run time either. DS_SKIP_CUDA_CHECK=1: no nvcc to compare torch's CUDA version with.
ENV DS_BUILD_OPS=0 \
    DS_SKIP_CUDA_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_DISABLE_TELEMETRY=1

USER ray
WORKDIR /home/ray/tuneplane

# 1. torch first, the CUDA build, so that nothing later resolves a different torch.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2. The package and its `train` extra (ray[train], deepspeed, transformers, tokenizers, peft, accelerate,
#    mlflow, safetensors) pinned by constraints.txt. `torch==2.13.0` there is satisfied by the CUDA build above
#    (local version labels such as +cu128 match), and `ray==2.60.0` by the Ray already in the image.
#    Not editable: the source folder is removed afterwards.
COPY --chown=1000:100 pyproject.toml setup.py README.md constraints.txt ./
COPY --chown=1000:100 platform ./platform
RUN pip install -c constraints.txt ".[train]" \
    && python -c "import torch, ray, deepspeed, peft, transformers, mlflow, tuneplane.train; \
assert ray.__version__ == '2.60.0', ray.__version__; assert torch.version.cuda, 'CPU-only torch'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)" \
    && cd /home/ray && rm -rf /home/ray/tuneplane

# flash-attn is optional: on a GPU the recipe uses it when importable, else PyTorch SDPA. It has no wheels on
# PyPI for every torch/CUDA pair; to add it, install a wheel built for exactly torch 2.13.0 + cu128 + cp311 here.

WORKDIR /home/ray
# Numeric user, as in the pods' securityContext (runAsUser: 1000).
USER 1000
