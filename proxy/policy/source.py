"""The policy file as YAML nodes that remember where they were written, after ${ENV} substitution."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.policy.issues import ConfigIssue


@dataclass(slots=True)
class Sourced:
    """A YAML value with where it was written: its mark and its key path."""

    value: Any  # scalar, dict[str, Sourced] or list[Sourced]
    line: int
    column: int
    path: str


# ${VAR}, ${VAR:-default}, ${VAR-default}; unanchored: a reference may sit inside a longer value.
ENV_REF_PATTERN = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}"
_ENV_REF = re.compile(r"\$\$|" + ENV_REF_PATTERN)


def substitute_env(text: str, environ: Mapping[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` (default when unset or empty), ``${VAR-default}`` (when unset), ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1), match.group(2), match.group(3)
        value = environ.get(name)
        if op == ":-" and not value:
            return default or ""
        if op == "-" and value is None:
            return default or ""
        if value is None:
            raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} to give one)")
        return value

    return _ENV_REF.sub(replace, text)


class _Unresolved:
    """A value whose environment reference could not be resolved: already reported, judged no further."""

    def __repr__(self) -> str:
        return "<unresolved>"


UNRESOLVED: Any = _Unresolved()


class SourceReader:
    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        self._constructor = yaml.SafeLoader("")
        self._resolver = yaml.resolver.Resolver()

    def error(self, node: Sourced | None, path: str, message: str, severity: str = "error") -> None:
        line, column = (node.line, node.column) if node else (0, 0)
        issue = ConfigIssue(self.file, line, column, path, message, severity)
        if issue not in self.issues:
            self.issues.append(issue)

    def read(self, text: str) -> Sourced | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = " ".join(filter(None, [exc.context, exc.problem])) or str(exc)
            line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
            self.issues.append(ConfigIssue(self.file, line, column, "", f"invalid YAML: {problem}"))
            return None
        except yaml.YAMLError as exc:
            self.issues.append(ConfigIssue(self.file, 0, 0, "", f"invalid YAML: {exc}"))
            return None
        if root is None:
            return Sourced({}, 1, 1, "")
        return self._node(root, "")

    def _node(self, node: yaml.Node, path: str) -> Sourced:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if isinstance(node, yaml.MappingNode):
            children: dict[str, Sourced] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child_path = f"{path}.{key}" if path else key
                if key in children:
                    self.issues.append(
                        ConfigIssue(
                            self.file,
                            key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1,
                            child_path,
                            "duplicate key",
                        )
                    )
                    continue
                child = self._node(value_node, child_path)
                # Point at the key, not the value: that is where an editor's eye goes.
                child.line, child.column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                children[key] = child
            return Sourced(children, line, column, path)
        if isinstance(node, yaml.SequenceNode):
            items = [self._node(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            return Sourced(items, line, column, path)
        assert isinstance(node, yaml.ScalarNode)
        return Sourced(self._scalar(node, path, line, column), line, column, path)

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int, column: int) -> Any:
        raw = node.value
        if "$" in raw:
            try:
                substituted = substitute_env(raw, self.environ)
            except ValueError as exc:
                self.issues.append(ConfigIssue(self.file, line, column, path, str(exc)))
                return UNRESOLVED
            if substituted != raw:
                if node.style is None:  # plain scalar: resolve the result as YAML would have ("3" → 3)
                    tag = self._resolver.resolve(yaml.ScalarNode, substituted, (True, False))  # type: ignore[no-untyped-call]
                    return self._constructor.construct_object(yaml.ScalarNode(tag, substituted))
                return substituted
        return self._constructor.construct_object(node)


def merge(base: Sourced, override: Sourced) -> Sourced:
    """Defaults under an upstream: mappings merge key by key, anything else is replaced."""
    if not (isinstance(base.value, dict) and isinstance(override.value, dict)):
        return override
    merged = dict(base.value)
    for key, value in override.value.items():
        merged[key] = merge(merged[key], value) if key in merged else value
    return Sourced(merged, override.line, override.column, override.path)
