"""The base of every config model: unknown keys are refused (a typo is an error, not a silent default)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
