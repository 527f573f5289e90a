"""``sidecar schema``: the policy file's JSON Schema (draft 2020-12), generated from the model in ``proxy.config``.

Nothing here is written by hand per field: each dataclass field's type and ``meta`` (doc, default, duration,
bounds, choices, parse) becomes one schema property, so the schema cannot drift from the loader. What JSON
Schema cannot say (cross-field rules such as ``per_try ≤ total``) stays with ``sidecar check``.

Any scalar may be written as an environment reference (``${VAR:-default}``): the loader substitutes it before
typing the value, so wherever a number, boolean, duration or address is expected the schema also accepts a
string containing such a reference.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from typing import IO, Any

from proxy.policy import model, rate_model
from proxy.policy.model import TOP_LEVEL, UPSTREAM_ONLY, model_fields, unwrap_optional
from proxy.policy.source import ENV_REF_PATTERN
from proxy.policy.values import (
    ADDRESS_PATTERN,
    DURATION_PATTERN,
    HEADER_NAME_PATTERN,
    HTTP_TARGET_PATTERN,
    METHOD_PATTERN,
    REDIS_URL_PATTERN,
    RETRY_KINDS,
    ROUTE_PATH_PATTERN,
    SHARED_KEY_PATTERN,
    STATUS_GROUPS,
    UPSTREAM_NAME_PATTERN,
    Address,
    Target,
    format_duration,
    parse_address,
    parse_cooldown_status,
    parse_grpc_failure_on,
    parse_grpc_retry_on,
    parse_header_name,
    parse_method,
    parse_redis_url,
    parse_retry_on,
    parse_route_name,
    parse_route_path,
    parse_shared_key,
    parse_target,
)
from proxy.resilience.grpc import RETRYABLE, GrpcStatus

SCHEMA_ID = "https://seawall.dev/schemas/sidecar.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


_ENV_REF: dict[str, Any] = {
    "type": "string",
    "pattern": ENV_REF_PATTERN,
    "description": "An environment reference: ${VAR}, ${VAR:-default} or ${VAR-default}.",
}


def _or_env(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _ENV_REF]}


def _retry_on_item() -> dict[str, Any]:
    kinds = [*RETRY_KINDS, *STATUS_GROUPS]
    return _or_env(
        {
            "anyOf": [
                {"type": "integer", "minimum": 100, "maximum": 599},
                {"type": "string", "enum": kinds},
                {"type": "string", "pattern": r"^[1-5]\d\d$"},
            ]
        }
    )


def _grpc_status_item(statuses: list[GrpcStatus]) -> dict[str, Any]:
    """A gRPC status by name (lower-case) or number; the loader also reads upper-case names."""
    return {
        "anyOf": [
            {"type": "string", "enum": [s.word for s in statuses]},
            {"type": "integer", "enum": [int(s) for s in statuses]},
        ]
    }


# Values with a ``parse`` function: the JSON shape each accepts.
_PARSED: dict[Callable[[object], Any], Callable[[], dict[str, Any]]] = {
    parse_address: lambda: _or_env({"type": "string", "pattern": ADDRESS_PATTERN}),
    parse_target: lambda: _or_env(
        {
            "type": "string",
            "anyOf": [{"pattern": HTTP_TARGET_PATTERN}, {"pattern": ADDRESS_PATTERN}],
        }
    ),
    parse_method: lambda: {"type": "string", "pattern": METHOD_PATTERN},
    parse_retry_on: _retry_on_item,
    parse_route_path: lambda: {"type": "string", "pattern": ROUTE_PATH_PATTERN},
    parse_grpc_retry_on: lambda: _grpc_status_item(sorted(RETRYABLE)),
    parse_grpc_failure_on: lambda: _grpc_status_item([s for s in GrpcStatus if s is not GrpcStatus.OK]),
    parse_route_name: lambda: {"type": "string", "pattern": UPSTREAM_NAME_PATTERN},
    parse_cooldown_status: lambda: _or_env(
        {"anyOf": [{"type": "integer", "minimum": 400, "maximum": 599}, {"type": "string", "pattern": r"^[45]\d\d$"}]}
    ),
    parse_header_name: lambda: _or_env({"type": "string", "pattern": HEADER_NAME_PATTERN}),
    parse_redis_url: lambda: _or_env({"type": "string", "pattern": REDIS_URL_PATTERN}),
    parse_shared_key: lambda: {"type": "string", "pattern": SHARED_KEY_PATTERN},
}


def to_plain(value: Any, info: typing.Mapping[str, Any] | None = None) -> Any:
    """A model value as the YAML/JSON an operator would write (durations as ``"250ms"``, addresses as text)."""
    if isinstance(value, Address | Target):  # dataclasses too, but written as text
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_plain(getattr(value, f.name), f.metadata)
            for f, _ in model_fields(type(value))
            if f.name != "name"
        }
    if isinstance(value, tuple):
        return [to_plain(item, info) for item in value]
    if info and info.get("duration") and isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(float(value))
    return value


def _bounds(info: typing.Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in (("minimum", "minimum"), ("maximum", "maximum"), ("exclusive_minimum", "exclusiveMinimum")):
        if info.get(key) is not None:
            out[name] = info[key]
    return out


def _scalar_schema(tp: Any, info: typing.Mapping[str, Any]) -> dict[str, Any]:
    if info.get("schema"):
        return dict(info["schema"])
    parse = info.get("parse")
    if parse is not None:
        if parse in _PARSED:
            return _PARSED[parse]()
        return {}  # an unknown parser: accept anything, the loader decides
    if info.get("duration"):
        return {
            "anyOf": [
                {"type": "number", **({"minimum": 0} | _bounds(info))},
                {"type": "string", "pattern": DURATION_PATTERN},
                _ENV_REF,
            ]
        }
    if info.get("choices"):
        return _or_env({"type": "string", "enum": list(info["choices"])})
    if tp is bool:
        return _or_env({"type": "boolean"})
    if tp is int:
        return _or_env({"type": "integer", **_bounds(info)})
    if tp is float:
        return _or_env({"type": "number", **_bounds(info)})
    if tp is str:
        return {"type": "string"}
    raise TypeError(f"no schema for {tp!r}")


def _field_schema(f: dataclasses.Field[Any], tp: Any, refs: dict[type, str]) -> dict[str, Any]:
    info = f.metadata
    inner, optional = unwrap_optional(tp)
    if dataclasses.is_dataclass(inner) and not info.get("parse"):
        body: dict[str, Any] = {"$ref": f"#/$defs/{refs[typing.cast(type, inner)]}"}
        if info.get("shorthand"):
            body = {"anyOf": [body, {"type": "string", "enum": list(info["shorthand"])}]}
    elif typing.get_origin(inner) is tuple:
        item_type = typing.get_args(inner)[0]
        if dataclasses.is_dataclass(item_type) and not info.get("parse") and not info.get("schema"):
            items: dict[str, Any] = {"$ref": f"#/$defs/{refs[typing.cast(type, item_type)]}"}
        else:
            items = _scalar_schema(item_type, info)
        body = {"type": "array", "items": items}
    else:
        body = _scalar_schema(inner, info)
    if optional:
        body = {"anyOf": [body, {"type": "null"}]}
    return body


def _default(f: dataclasses.Field[Any]) -> tuple[bool, Any]:
    if f.default is not dataclasses.MISSING:
        return True, to_plain(f.default, f.metadata)
    if f.default_factory is not dataclasses.MISSING:
        return True, to_plain(f.default_factory(), f.metadata)
    return False, None


def object_schema(
    cls: type, refs: dict[type, str], skip: tuple[str, ...] = (), required: tuple[str, ...] = ()
) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    # Fields without a default are required (an upstream's name is its mapping key, skipped).
    required = (
        *required,
        *(f.name for f, _ in model_fields(cls) if f.name not in skip and f.name not in required and not _default(f)[0]),
    )
    for f, tp in model_fields(cls):
        if f.name in skip or "doc" not in f.metadata:
            continue
        prop = _field_schema(f, tp, refs)
        prop["description"] = f.metadata["doc"]
        has_default, default = _default(f)
        if has_default and f.name not in required:
            prop["default"] = default
        properties[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring
        schema["description"] = doc.splitlines()[0]
    return schema


_SECTIONS: tuple[type, ...] = (
    model.Timeouts,
    model.BreakerPolicy,
    model.RetryPolicy,
    model.RetryBudgetPolicy,
    model.GrpcPolicy,
    model.HealthPolicy,
    model.FallbackPolicy,
    model.LimitsPolicy,
    model.OutlierPolicy,
    model.TlsPolicy,
    rate_model.RateLimitWindow,
    rate_model.RateLimitObserve,
    rate_model.SharedRateLimit,
    rate_model.RateLimitPolicy,
    rate_model.RouteRateLimit,
    model.RouteMatch,
    model.AdminPolicy,
    model.HttpServerPolicy,
    model.LoggingPolicy,
)


def build_schema() -> dict[str, Any]:
    refs = {cls: cls.__name__ for cls in _SECTIONS}
    defs: dict[str, Any] = {refs[cls]: object_schema(cls, refs) for cls in _SECTIONS}
    # Upstream names are mapping keys, not a field an operator writes.
    defs["Upstream"] = object_schema(model.UpstreamPolicy, refs, skip=("name",), required=("listen", "targets"))
    defs["Upstream"]["description"] = "One dependency: a listener on 127.0.0.1 and the targets it forwards to."
    defs["Defaults"] = object_schema(model.UpstreamPolicy, refs, skip=UPSTREAM_ONLY)
    defs["Defaults"]["description"] = TOP_LEVEL["defaults"]
    # A route: its match, and the timeouts and retry keys it overrides (the retry budget stays the upstream's).
    defs["RouteMatch"]["oneOf"] = [
        {"required": [key], "properties": {key: {"type": "string"}}} for key in ("path", "path_prefix")
    ]
    defs["RouteMatch"]["properties"]["methods"]["anyOf"][0]["minItems"] = 1
    defs["Route"] = object_schema(model.RoutePolicy, refs, required=("match",))
    defs["Route"]["description"] = "One entry of an upstream's routes: first match wins."
    defs["Route"]["properties"]["retry"]["$ref"] = "#/$defs/RouteRetry"
    for key in ("timeouts", "retry"):
        defs["Route"]["properties"][key]["default"] = {}  # nothing overridden: the upstream's own values
    defs["RouteRetry"] = object_schema(model.RetryPolicy, refs, skip=("budget",))
    defs["RouteRetry"]["description"] = "A route's retry overrides (no budget: that is the upstream's)."

    default_admin = model.AdminPolicy()
    properties: dict[str, Any] = {
        "admin": {"$ref": "#/$defs/AdminPolicy", "description": TOP_LEVEL["admin"], "default": to_plain(default_admin)},
        "http": {
            "$ref": "#/$defs/HttpServerPolicy",
            "description": TOP_LEVEL["http"],
            "default": to_plain(model.HttpServerPolicy()),
        },
        "logging": {
            "$ref": "#/$defs/LoggingPolicy",
            "description": TOP_LEVEL["logging"],
            "default": to_plain(model.LoggingPolicy()),
        },
        "defaults": {"$ref": "#/$defs/Defaults", "description": TOP_LEVEL["defaults"], "default": {}},
        "upstreams": {
            "type": "object",
            "description": TOP_LEVEL["upstreams"],
            "minProperties": 1,
            "patternProperties": {UPSTREAM_NAME_PATTERN: {"$ref": "#/$defs/Upstream"}},
            "additionalProperties": False,
        },
        "allow_non_loopback": {
            **_or_env({"type": "boolean"}),
            "description": TOP_LEVEL["allow_non_loopback"],
            "default": False,
        },
    }
    missing = set(TOP_LEVEL) - set(properties)
    if missing:  # a new top-level key in config.py must be given a schema here
        raise RuntimeError(f"top-level keys without a schema: {sorted(missing)}")
    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": "Seawall sidecar policy",
        "description": (
            'Circuit breakers, retries, timeouts and limits per upstream. Durations are "250ms", "1s", '
            '"2m", "1h" or a number of seconds; any value may be an environment reference ${VAR:-default}. '
            "Validate fully (including cross-field rules) with `sidecar check FILE`."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["upstreams"],
        "properties": properties,
        "$defs": defs,
    }


def render_schema() -> str:
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def schema_command(out: IO[str]) -> int:
    out.write(render_schema())
    return 0
