"""Tuneplane: instruction tuning of LLMs on Kubernetes (Ray Train + DeepSpeed ZeRO + PEFT + MLflow)."""

__version__ = "0.1.0"
