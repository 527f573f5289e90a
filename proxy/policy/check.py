"""``sidecar check PATH…``: validate policy files the way the running sidecar would, and say all of it at once.

One line per problem, ``file:line:column: key.path: message``, so editors and CI annotate the exact spot; a valid
file gets one summary line. Exit 1 when any file has an error; warnings alone exit 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from proxy.policy.issues import ConfigIssue
from proxy.policy.loader import load_text
from proxy.policy.model import SidecarConfig

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass
class FileReport:
    path: str
    config: SidecarConfig | None
    issues: list[ConfigIssue] = field(default_factory=list)

    @property
    def errors(self) -> list[ConfigIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ConfigIssue]:
        return [i for i in self.issues if i.severity == "warning"]


def check_file(path: str, environ: Mapping[str, str] | None = None) -> FileReport:
    """Never raises for a bad file: unreadable, non-UTF-8 and broken YAML all become issues."""
    try:
        # Bytes decoded as-is, like the loader, so line numbers match what an editor shows.
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return FileReport(path, None, [ConfigIssue(path, 0, 0, "", "no such file")])
    except IsADirectoryError:
        return FileReport(path, None, [ConfigIssue(path, 0, 0, "", "is a directory")])
    except OSError as exc:
        return FileReport(path, None, [ConfigIssue(path, 0, 0, "", f"cannot read: {exc.strerror or exc}")])
    except UnicodeDecodeError as exc:
        return FileReport(path, None, [ConfigIssue(path, 0, 0, "", f"not UTF-8 text: {exc.reason}")])
    config, issues = load_text(text, path, environ)
    return FileReport(path, config, issues)


def expand(paths: Iterable[str]) -> list[str]:
    """Directories stand for the policy files directly inside them (sorted), so ``check config/services`` works."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())
            out.extend(found or [path])  # an empty directory is reported, not silently passed
        else:
            out.append(path)
    return out


def summary(report: FileReport) -> str:
    assert report.config is not None
    names = [u.name for u in report.config.upstreams]
    noun = "upstream" if len(names) == 1 else "upstreams"
    line = f"{report.path}: OK ({len(names)} {noun}: {', '.join(names)})"
    if report.warnings:
        count = len(report.warnings)
        line += f", {count} warning{'s' if count > 1 else ''}"
    return line


def check_command(paths: list[str], out: IO[str], environ: Mapping[str, str] | None = None) -> int:
    failed = False
    for path in expand(paths):
        report = check_file(path, environ)
        for issue in report.issues:  # already in file order: errors and warnings where they occur
            out.write(f"{issue}\n")
        if report.config is not None:
            out.write(summary(report) + "\n")
        else:
            failed = True
            count = len(report.errors)
            if count > 1:
                out.write(f"{path}: {count} errors\n")
    return 1 if failed else 0
