"""Helpers the test modules share, importable as `tests.support.*`; pytest fixtures stay in tests/conftest.py.

- `config`: repository paths, API tokens and the platform config the control-plane tests run on.
- `manifests`: checks of rendered Kubernetes manifests (schemas, Pod Security), for the chart and KubeRay tests.
- `kube_api`: an in-process Kubernetes API (kmock) for the KubeRay backend's client path.
"""
