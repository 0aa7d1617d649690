"""The model card: one Markdown page that says what a published model is, how it was made and how it scored.

It goes into the logged model and the run (MODEL_CARD.md) and is the registered version's description. Every
measured number in it is read from the run's final metrics or the data filter's figures, never recomputed:
what the card says is what MLflow holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneplane.publishing.gate import EVAL_LOSS, GateVerdict, base_number, fmt, headline, number
from tuneplane.spec import TuningSpec

_QUALITY = (
    ("records", "Records read"),
    ("exact_duplicates", "Exact duplicates"),
    ("near_duplicates", "Near duplicates"),
    ("contaminated", "Overlapping an eval set"),
    ("dropped", "Dropped in all"),
)


def render(
    spec: TuningSpec,
    job_id: str,
    final: dict[str, Any],
    verdict: GateVerdict,
    data_figures: dict[str, Any] | None,
    spec_hash: str,
    fingerprint: str,
    chat_template: str | None,
    model_uri: str | None = None,
    logged_uri: str | None = None,
    with_chat_template: bool = True,
) -> str:
    """The card. `model_uri` is the registered version (None: not registered), `logged_uri` the run's logged
    model; `with_chat_template=False` leaves the template's source out (a shorter card)."""
    parts = [
        _header(spec, job_id, final, spec_hash, fingerprint),
        _method(spec),
        _data(spec, final),
        _quality(spec, data_figures),
        _evaluation(final),
        _gate(verdict),
        _template(spec, chat_template if with_chat_template else None),
        _load(spec, verdict, model_uri, logged_uri),
    ]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def _header(spec: TuningSpec, job_id: str, final: dict[str, Any], spec_hash: str, fingerprint: str) -> str:
    title = spec.tracking.registered_model_name or spec.name
    steps, tokens = final.get("step"), final.get("tokens")
    rows = [
        ("Base model", f"`{spec.model.base}`"),
        *([("Tuned from", f"`{spec.model.adapter}`")] if spec.model.adapter else []),
        ("Method", spec.method.type),
        ("Trained", f"{steps} steps, {tokens} tokens"),
        ("Job", f"`{job_id}`"),
        ("Spec hash", f"`{spec_hash}`"),
        ("Dataset fingerprint", f"`{fingerprint}`"),
    ]
    return f"# {_cell(title)}\n\nTuned by Tuneplane.\n\n" + _table(("Property", "Value"), rows)


def _method(spec: TuningSpec) -> str:
    method = [(k, _value(v)) for k, v in spec.method.model_dump().items() if k != "type"]
    hyper = [(k, _value(v)) for k, v in spec.hyperparameters.model_dump().items()]
    out = f"## Method: {spec.method.type}\n\n"
    if method:
        out += _table(("Setting", "Value"), method) + "\n\n"
    return out + "### Hyper-parameters\n\n" + _table(("Setting", "Value"), hyper)


def _data(spec: TuningSpec, final: dict[str, Any]) -> str:
    """Each source's weight asked for next to the tokens it really trained (`source_tokens/<name>`)."""
    sources = spec.data.sources
    total_weight = sum(s.weight for s in sources)
    trained = {s.display_name: number(final, f"source_tokens/{s.display_name}") for s in sources}
    total_tokens = sum(t for t in trained.values() if t is not None)
    rows = []
    for s in sources:
        tokens = trained[s.display_name]
        rows.append(
            (
                f"`{s.display_name}`",
                s.format,
                _value(s.weight),
                f"{s.weight / total_weight:.1%}",
                "not measured" if tokens is None else str(int(tokens)),
                f"{tokens / total_tokens:.1%}" if tokens is not None and total_tokens else "",
            )
        )
    header = ("Source", "Format", "Weight", "Weight share", "Trained tokens", "Token share")
    return "## Data\n\n" + _table(header, rows)


def _quality(spec: TuningSpec, figures: dict[str, Any] | None) -> str:
    data = spec.data
    settings = f"dedup: `{data.dedup}`, decontaminate: `{str(data.decontaminate).lower()}`"
    if not figures:
        return f"### Duplicates and contamination\n\n{settings}; figures not computed."
    rows = [(label, str(figures[key])) for key, label in _QUALITY if key in figures]
    out = f"### Duplicates and contamination\n\n{settings}\n\n" + _table(("Training records", "Count"), rows)
    eval_sets = figures.get("eval_sets") or {}
    if eval_sets:
        sets = [
            (f"`{name}`", str(f.get("examples", "")), str(f.get("contaminated", "")))
            for name, f in sorted(eval_sets.items())
        ]
        out += "\n\n" + _table(("Eval set", "Examples", "Overlapping training data"), sets)
    return out


def _evaluation(final: dict[str, Any]) -> str:
    """Base model before, tuned model after; a lower eval loss and a higher task score are better."""
    rows = []
    for key, tuned in headline(final).items():
        base = base_number(final, key)
        change = "" if base is None else fmt(tuned - base)
        rows.append((f"`{key}`", "—" if base is None else fmt(base), fmt(tuned), change))
    if not rows:
        return "## Evaluation\n\nNothing was evaluated."
    note = "" if EVAL_LOSS in headline(final) else " No eval loss: the job had no eval data."
    intro = (
        f"Base model before training, tuned model after. Lower eval loss is better, higher scores are.{note}"
    )
    return f"## Evaluation\n\n{intro}\n\n" + _table(("Metric", "Base", "Tuned", "Change"), rows)


def _gate(verdict: GateVerdict) -> str:
    if not verdict.gated:
        return "## Gate: none\n\nThe spec sets no `eval.gate`."
    rows = [
        (
            _cell(c.condition),
            "—" if c.value is None else fmt(c.value),
            "—" if c.base is None else fmt(c.base),
            "—" if c.threshold is None else fmt(c.threshold),
            "pass" if c.passed else "FAIL",
        )
        for c in verdict.checks
    ]
    out = f"## Gate: {verdict.status}\n\n" + _table(
        ("Condition", "Value", "Base", "Threshold", "Result"), rows
    )
    failures = verdict.failures()
    return out + ("\n\n" + "\n".join(f"- {_cell(f)}" for f in failures) if failures else "")


def _template(spec: TuningSpec, chat_template: str | None) -> str:
    system = spec.data.system_prompt
    out = f"## Prompt template: `{spec.data.template}`\n\n"
    out += f"System prompt: {_cell(system)}\n\n" if system else ""
    out += (
        "The tokenizer carries it as its chat template, so `tokenizer.apply_chat_template(messages, "
        "add_generation_prompt=True)` prompts the model as training did"
    )
    if spec.data.template == "alpaca":
        out += " (an alpaca `input` goes in a user message's `input` key)"
    if chat_template is None:
        return out + "."
    fence = "`" * max(3, _longest_run(chat_template, "`") + 1)
    return out + f":\n\n{fence}jinja\n{chat_template}\n{fence}"


def _load(spec: TuningSpec, verdict: GateVerdict, model_uri: str | None, logged_uri: str | None) -> str:
    out = "## How to load\n\n"
    if model_uri is None:
        why = "the gate failed" if not verdict.passed else "the spec sets no `tracking.registered_model_name`"
        out += f"Not registered: {why}."
        if logged_uri is None:
            return out
        out += " The run's logged model, for inspection:\n\n"
    uri = model_uri or logged_uri
    return out + (
        "```python\nimport mlflow\n\n"
        f'model = mlflow.pyfunc.load_model("{uri}")\n'
        'model.predict(["Your instruction"])  # or a DataFrame with instruction (and input) columns\n```'
    )


# -- Markdown ---------------------------------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text that cannot break a table row or a list item."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(value: Any) -> str:
    if isinstance(value, list):
        return _cell(", ".join(map(str, value))) or "[]"
    return _cell(str(value))


def _longest_run(text: str, char: str) -> int:
    longest = run = 0
    for c in text:
        run = run + 1 if c == char else 0
        longest = max(longest, run)
    return longest
