"""The fields of the policy model: ``meta`` carries what the schema, the validator and ``explain`` need to know."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any


def meta(
    doc: str,
    *,
    default: Any = dataclasses.MISSING,
    factory: Callable[[], Any] | None = None,
    duration: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[object], Any] | None = None,
    schema: dict[str, Any] | None = None,
    shorthand: Mapping[str, Any] | None = None,
) -> Any:
    """``shorthand``: words a section (a dataclass field) may be written as instead of a mapping."""
    info = {
        "doc": doc,
        "duration": duration,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "choices": choices,
        "parse": parse,
        "schema": schema,
        "shorthand": shorthand,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=info)
    return field(default=default, metadata=info)
