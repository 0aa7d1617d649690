"""The job-submission API (FastAPI). `create_app(config)` builds it; `tuneplane serve` runs it."""

from tuneplane.api.app import create_app

__all__ = ["create_app"]
