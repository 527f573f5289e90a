"""Config errors and warnings, each naming file, line, column and key path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int  # 1-based; 0 when unknown
    column: int
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        if not self.line and not self.path:  # about the file as a whole (missing, unreadable)
            return f"{self.file}: {prefix}{self.message}"
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path or '<root>'}: {prefix}{self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = [i for i in issues if i.severity == "error"]
        self.warnings = [i for i in issues if i.severity == "warning"]
        super().__init__("\n".join(str(i) for i in self.issues))
