"""Sourced YAML → model dataclasses, reporting every bad key and value rather than stopping at the first."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from proxy.policy.model import model_fields, unwrap_optional
from proxy.policy.source import UNRESOLVED, Sourced, SourceReader
from proxy.policy.values import did_you_mean, parse_duration


def _key_hint(cls: type, key: str, known: typing.Iterable[str]) -> str:
    """A spelling hint, or else where the key belongs when it is a field of one of ``cls``'s sections."""
    hint = did_you_mean(key, known)
    if hint:
        return hint
    for f, tp in model_fields(cls):
        inner, _ = unwrap_optional(tp)
        if f.name in known and dataclasses.is_dataclass(inner):
            names = [g.name for g in dataclasses.fields(inner)]
            if key in names:
                return f" (it belongs under {f.name}: {f.name}.{key})"
    return ""


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class ModelBuilder:
    """Turns sourced YAML into dataclasses, reporting every bad key and value rather than stopping at the first.

    A field whose value is bad is left at its default so the rest of the section is still checked; ``failed``
    remembers it (by logical path, e.g. ``upstreams.api.timeouts.per_try``) so cross-field rules do not judge
    a stand-in default.
    """

    def __init__(self, reader: SourceReader) -> None:
        self.reader = reader
        self.failed: set[str] = set()

    def broken(self, where: str) -> bool:
        """True when ``where`` or any section containing it failed to convert."""
        parts = where.split(".")
        return any(".".join(parts[:n]) in self.failed for n in range(1, len(parts) + 1))

    def build(
        self, cls: type, node: Sourced, skip: tuple[str, ...] = (), where: str | None = None, **fixed: Any
    ) -> Any:
        where = node.path if where is None else where
        if not isinstance(node.value, dict):
            self.reader.error(node, node.path, "expected a mapping of keys")
            self.failed.add(where)
            return None
        known = {f.name for f in dataclasses.fields(cls)} - set(fixed) - set(skip)
        for key, child in node.value.items():
            if key not in known:
                self.reader.error(child, child.path, f"unknown key{_key_hint(cls, key, known)}")
        values: dict[str, Any] = dict(fixed)
        for f, tp in model_fields(cls):
            if f.name in fixed or f.name in skip:
                continue
            child = node.value.get(f.name)
            if child is None:
                continue  # dataclass default applies
            field_where = f"{where}.{f.name}" if where else f.name
            ok, value = self.convert(f, tp, child, field_where)
            if ok:
                values[f.name] = value
            else:
                self.failed.add(field_where)  # keep the default so the other keys are still checked
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:  # required: said here unless written (and then already reported as bad)
            for name in missing:
                if name not in node.value:
                    self.reader.error(node, f"{node.path}.{name}" if node.path else name, f"{name} is required")
            self.failed.add(where)
            return None
        return cls(**values)

    def convert(self, f: dataclasses.Field[Any], tp: Any, node: Sourced, where: str) -> tuple[bool, Any]:
        info = f.metadata
        tp, optional = unwrap_optional(tp)
        value = node.value
        if value is UNRESOLVED:
            return False, None
        if value is None:
            if optional:
                return True, None
            self.reader.error(node, node.path, "a value is required here")
            return False, None
        if dataclasses.is_dataclass(tp) and not info.get("parse"):
            return self._section(typing.cast(type, tp), info, node, where)
        if typing.get_origin(tp) is tuple:
            items = value if isinstance(value, list) else None
            if items is None:
                self.reader.error(node, node.path, "expected a list")
                return False, None
            item_type = typing.get_args(tp)[0]
            converted = []
            ok = True
            for index, item in enumerate(items):
                if dataclasses.is_dataclass(item_type) and not info.get("parse"):
                    good, item_value = self._section(typing.cast(type, item_type), info, item, f"{where}[{index}]")
                else:
                    good, item_value = self._scalar(info, item_type, item)
                ok &= good
                converted.append(item_value)
            return ok, tuple(converted)
        return self._scalar(info, tp, node)

    def _section(self, cls: type, info: Mapping[str, Any], node: Sourced, where: str) -> tuple[bool, Any]:
        """A nested mapping, or one of the words ``shorthand`` allows for it (``observe: standard``)."""
        shorthand = info.get("shorthand") or {}
        if shorthand and not isinstance(node.value, dict):
            if isinstance(node.value, str) and node.value in shorthand:
                return True, shorthand[node.value]
            words = " or ".join(repr(w) for w in shorthand)
            self.reader.error(node, node.path, f"expected a mapping of keys or {words}, got {node.value!r}")
            return False, None
        built = self.build(cls, node, where=where)
        return built is not None, built

    def _scalar(self, info: Mapping[str, Any], tp: Any, node: Sourced) -> tuple[bool, Any]:
        value = node.value
        if value is UNRESOLVED:
            return False, None
        if isinstance(value, dict | list):
            self.reader.error(
                node, node.path, "expected a single value, not a " + ("mapping" if isinstance(value, dict) else "list")
            )
            return False, None
        try:
            if info.get("parse"):
                result = info["parse"](value)
            elif info.get("duration"):
                result = parse_duration(value)
            elif tp is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
                result = value
            elif tp is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"expected an integer, got {value!r}")
                result = value
            elif tp is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"expected a number, got {value!r}")
                result = float(value)
            elif tp is str:
                if not isinstance(value, str):
                    raise ValueError(f"expected a string, got {value!r}")
                result = value
            else:
                raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
        except ValueError as exc:
            self.reader.error(node, node.path, str(exc))
            return False, None
        choices = info.get("choices")
        if choices and result not in choices:
            self.reader.error(
                node, node.path, f"must be one of {', '.join(choices)}{did_you_mean(str(result), choices)}"
            )
            return False, None
        if isinstance(result, int | float) and not isinstance(result, bool):
            low, high, above = info.get("minimum"), info.get("maximum"), info.get("exclusive_minimum")
            if low is not None and result < low:
                self.reader.error(node, node.path, f"must be ≥ {low:g}, got {value}")
                return False, None
            if above is not None and result <= above:
                self.reader.error(node, node.path, f"must be > {above:g}, got {value}")
                return False, None
            if high is not None and result > high:
                self.reader.error(node, node.path, f"must be ≤ {high:g}, got {value}")
                return False, None
        return True, result
