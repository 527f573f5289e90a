"""Copy a run's artifacts to cold storage and prove the copy is complete before anything is deleted.

Layout (mirrors MLflow's own ``<root>/<experiment_id>/<run_id>`` artifact layout)::

    <archive>/<experiment_id>/<run_id>/artifacts/...            the run's artifacts
    <archive>/<experiment_id>/<run_id>/models/<model_id>/...    its MLflow 3 logged models (checkpoints)
    <archive>/<experiment_id>/<run_id>/run.json                 params, metrics, tags (metadata may be purged)
    <archive>/<experiment_id>/<run_id>/manifest.json            path, size and SHA-256 of every file

Files are first downloaded to a scratch directory (``<archive>/.incoming``), checked against the sizes
the server lists and hashed there; then copied into the archive, and finally every archived file is read
back and compared with the manifest. The hash is thus computed on one copy and verified on another, which catches short
writes and silent corruption on network file systems — the cases where deleting the original would lose
data. Any mismatch raises :class:`ArchiveVerificationError` and the caller must not delete the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cleanup.model import ExperimentRef, LoggedModelRef, RunRecord
from cleanup.store import ArtifactFile

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20

CopyFile = Callable[[Path, Path], None]


class ArchiveVerificationError(Exception):
    """The archived copy does not match what the server holds; the run must not be deleted."""


class ArtifactSource(Protocol):
    def download_tree(self, artifact_uri: str, destination_dir: Path) -> None: ...

    def run_snapshot(self, run_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    path: str  # relative to the run's archive directory
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ArtifactTree:
    """One artifact root to archive: the run's own, or one logged model's."""

    archive_subdir: str  # "artifacts" or "models/<model_id>"
    artifact_uri: str
    files: Sequence[ArtifactFile]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_and_sync(source: Path, destination: Path) -> None:
    """Copy one file and fsync it, so verification reads what is really on the archive's disk."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    with destination.open("rb+") as handle:
        os.fsync(handle.fileno())


def trees_for(
    run: RunRecord, logged_models: Sequence[LoggedModelRef], files: Mapping[str, Sequence[ArtifactFile]]
) -> list[ArtifactTree]:
    """The run's artifact root and each logged model's, with the files listed for each (by URI)."""
    trees = [ArtifactTree("artifacts", run.artifact_uri, files.get(run.artifact_uri, ()))]
    trees.extend(
        ArtifactTree(f"models/{model.model_id}", model.artifact_location, files.get(model.artifact_location, ()))
        for model in logged_models
    )
    return trees


class Archiver:
    def __init__(
        self,
        root: Path,
        source: ArtifactSource,
        *,
        copy_file: CopyFile = copy_and_sync,
        scratch_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.source = source
        self.copy_file = copy_file
        # Scratch space on the archive's own volume by default: checkpoints can be far bigger than a
        # container's /tmp (often a RAM-backed tmpfs).
        self.scratch_dir = scratch_dir or root / ".incoming"

    def run_dir(self, run: RunRecord) -> Path:
        return self.root / run.experiment_id / run.run_id

    def archive(self, experiment: ExperimentRef, run: RunRecord, trees: Sequence[ArtifactTree]) -> Path:
        """Archive and verify; returns the run's archive directory or raises ArchiveVerificationError."""
        final = self.run_dir(run)
        staging = final.with_name(f".{run.run_id}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{run.run_id}-", dir=self.scratch_dir) as scratch:
            entries = self._download_and_hash(Path(scratch), trees)
            for entry in entries:
                (staging / entry.path).parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(Path(scratch) / entry.path, staging / entry.path)
        staging.mkdir(parents=True, exist_ok=True)
        _write_json(staging / "run.json", self.source.run_snapshot(run.run_id))
        manifest = {
            "run_id": run.run_id,
            "run_name": run.name,
            "experiment_id": experiment.experiment_id,
            "experiment_name": experiment.name,
            "archived_at": datetime.now(UTC).isoformat(),
            "sources": {tree.archive_subdir: tree.artifact_uri for tree in trees},
            "files": [asdict(entry) for entry in entries],
        }
        _write_json(staging / MANIFEST_NAME, manifest)
        # A previous attempt may have left a complete archive whose deletion then failed: replace it.
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        verify_archive(final)
        return final

    def _download_and_hash(self, scratch: Path, trees: Sequence[ArtifactTree]) -> list[ManifestEntry]:
        entries: list[ManifestEntry] = []
        for tree in trees:
            if not tree.files:
                continue
            self.source.download_tree(tree.artifact_uri, scratch / tree.archive_subdir)
            for listed in tree.files:
                relative = f"{tree.archive_subdir}/{listed.path}"
                local = scratch / relative
                if not local.is_file():
                    raise ArchiveVerificationError(f"{relative}: listed by the server but not downloaded")
                size = local.stat().st_size
                if size != listed.size:
                    raise ArchiveVerificationError(
                        f"{relative}: downloaded {size} bytes, the server lists {listed.size}"
                    )
                entries.append(ManifestEntry(relative, size, sha256_of(local)))
        return entries


def verify_archive(run_dir: Path) -> list[ManifestEntry]:
    """Re-read every archived file and compare size and SHA-256 with the manifest beside them."""
    try:
        manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
        entries = [ManifestEntry(**entry) for entry in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArchiveVerificationError(f"{run_dir / MANIFEST_NAME}: unreadable manifest: {error}") from error
    problems = []
    for entry in entries:
        archived = run_dir / entry.path
        if not archived.is_file():
            problems.append(f"{entry.path}: missing")
        elif (size := archived.stat().st_size) != entry.size:
            problems.append(f"{entry.path}: {size} bytes, manifest says {entry.size}")
        elif sha256_of(archived) != entry.sha256:
            problems.append(f"{entry.path}: SHA-256 differs from the manifest")
    if problems:
        raise ArchiveVerificationError(f"archive {run_dir} failed verification: " + "; ".join(problems))
    return entries


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
