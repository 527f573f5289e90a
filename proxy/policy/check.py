"""``sidecar check PATH…``: validate policy files the way the running sidecar would, and say all of it at once.

One line per problem, ``file:line:column: key.path: message``, so editors and CI annotate the exact spot; a valid
file gets one summary line. Exit 1 when any file has an error; warnings alone exit 0.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

from proxy.policy.issues import ConfigIssue
from proxy.policy.loader import PolicyRead, read_policy

POLICY_SUFFIXES = (".yaml", ".yml")


Judge = Callable[[PolicyRead], PolicyRead]


def check_file(path: str, environ: Mapping[str, str] | None = None, judge: Judge | None = None) -> PolicyRead:
    """The policy file judged as the sidecar would judge it; an unreadable file is said in a few words.

    ``judge`` adds what this I/O-free layer cannot check itself: the caller's reading of the TLS files."""
    read = read_policy(path, environ)
    if judge is not None:
        read = judge(read)
    if isinstance(read.os_error, FileNotFoundError | IsADirectoryError):
        message = "no such file" if isinstance(read.os_error, FileNotFoundError) else "is a directory"
        return dataclasses.replace(read, issues=[ConfigIssue(path, 0, 0, "", message)])
    return read


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


def summary(report: PolicyRead) -> str:
    assert report.config is not None
    names = [u.name for u in report.config.upstreams]
    noun = "upstream" if len(names) == 1 else "upstreams"
    line = f"{report.path}: OK ({len(names)} {noun}: {', '.join(names)})"
    if report.warnings:
        count = len(report.warnings)
        line += f", {count} warning{'s' if count > 1 else ''}"
    return line


def check_command(
    paths: list[str], out: IO[str], environ: Mapping[str, str] | None = None, judge: Judge | None = None
) -> int:
    failed = False
    for path in expand(paths):
        report = check_file(path, environ, judge)
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
