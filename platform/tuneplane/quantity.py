"""Kubernetes resource quantities (memory) as bytes: the one parser the config, admission and renderer share."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

# Binary (Ki..Ei) and decimal (k/K..E) suffixes Kubernetes accepts for memory; a plain number is bytes.
_FACTORS = {
    "": 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")
# The same rule for JSON Schema (`Field(json_schema_extra=...)`), so the chart's schema checks it at install.
QUANTITY_SCHEMA: dict[str, Any] = {"pattern": _QUANTITY.pattern}


def quantity_bytes(value: str) -> int:
    """Bytes of a memory quantity such as '80Gi', '1.5Ti' or '512M' (rounded up, as Kubernetes does).
    ValueError names the value when it is not one."""
    match = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"'{value}' is not a Kubernetes memory quantity such as '80Gi'")
    try:
        exact = Decimal(match.group(1)) * _FACTORS[match.group(2) or ""]
    except InvalidOperation:
        raise ValueError(f"'{value}' is not a Kubernetes memory quantity such as '80Gi'") from None
    return int(exact.to_integral_value(rounding="ROUND_CEILING"))


def check_quantity(value: str | None) -> str | None:
    """A pydantic field validator body: the value unchanged when it parses (None passes)."""
    if value is not None:
        quantity_bytes(value)
    return value


def bytes_quantity(count: int) -> str:
    """The shortest exact quantity for a number of bytes: 1280Gi, 768G, or plain bytes."""
    exact = [f"{count // factor}{suffix}" for suffix, factor in _FACTORS.items() if count % factor == 0]
    return min(exact, key=len)
