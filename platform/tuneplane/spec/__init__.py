"""The tuning spec: what a team asks the platform to train, as typed, validated data.

A spec says *what* to train (model, data, method, hyper-parameters, scale); it never says *how to run*:
no shell command, entrypoint, environment or secret. The platform builds those itself, so the same spec
runs on a laptop, in CI and on a GPU cluster.

The parts live in one module each (`model`, `data`, `method`, `run`); `tuning` assembles them and owns
parsing. Import from here: `from tuneplane.spec import TuningSpec, load_spec`.
"""

from tuneplane.spec._fields import (
    MAX_SOURCES,
    MAX_SPEC_BYTES,
    MAX_STEPS,
    MAX_TEXT,
    MAX_URI,
    SPEC_VERSION,
    DataKind,
    FormatName,
    LocationKind,
    TemplateName,
    format_kind,
    is_local_path,
    model_location_kind,
    static_prefix,
)
from tuneplane.spec.data import DataSpec, InstructionTemplate, SourceSpec
from tuneplane.spec.evaluation import EvalSpec, GateSpec, LmEvalSpec, TaskGate
from tuneplane.spec.method import (
    METHOD_CLASSES,
    METHOD_TYPES,
    DpoMethod,
    FullMethod,
    LoraMethod,
    Method,
    Objective,
    OrpoMethod,
    PartialMethod,
    ReferenceKind,
    WeightMethod,
)
from tuneplane.spec.model import ModelSpec, adapter_is_job_id, registered_team
from tuneplane.spec.run import (
    CheckpointSpec,
    DistributedSpec,
    HyperParameters,
    TrackingSpec,
    effective_zero_stage,
)
from tuneplane.spec.tuning import (
    BoundedYamlLoader,
    TuningSpec,
    json_schema,
    load_spec,
    parse_spec,
    parse_spec_text,
    resolve_paths,
    spec_hash,
)

__all__ = [
    "MAX_SOURCES",
    "MAX_SPEC_BYTES",
    "MAX_STEPS",
    "MAX_TEXT",
    "MAX_URI",
    "METHOD_CLASSES",
    "METHOD_TYPES",
    "SPEC_VERSION",
    "BoundedYamlLoader",
    "CheckpointSpec",
    "DataKind",
    "DataSpec",
    "DistributedSpec",
    "DpoMethod",
    "EvalSpec",
    "FormatName",
    "FullMethod",
    "GateSpec",
    "HyperParameters",
    "InstructionTemplate",
    "LmEvalSpec",
    "LocationKind",
    "LoraMethod",
    "Method",
    "ModelSpec",
    "Objective",
    "OrpoMethod",
    "PartialMethod",
    "ReferenceKind",
    "SourceSpec",
    "TaskGate",
    "TemplateName",
    "TrackingSpec",
    "TuningSpec",
    "WeightMethod",
    "adapter_is_job_id",
    "effective_zero_stage",
    "format_kind",
    "is_local_path",
    "json_schema",
    "load_spec",
    "model_location_kind",
    "parse_spec",
    "parse_spec_text",
    "registered_team",
    "resolve_paths",
    "spec_hash",
    "static_prefix",
]
