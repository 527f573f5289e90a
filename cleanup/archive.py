"""Copy a run's artifacts to cold storage and prove the copy is complete before anything is deleted.

Layout (mirrors MLflow's own ``<root>/<experiment_id>/<run_id>`` artifact layout)::

    <archive>/<experiment_id>/<run_id>/artifacts/...            the run's artifacts
    <archive>/<experiment_id>/<run_id>/models/<model_id>/...    its MLflow 3 logged models (checkpoints)
    <archive>/<experiment_id>/<run_id>/run.json                 params, metrics, tags (metadata may be purged)
    <archive>/<experiment_id>/<run_id>/manifest.json            path, size and SHA-256 of every file
    <archive>/<experiment_id>/<run_id>/deletion.json            the deletion journal (see cleanup.journal)

Files are first downloaded to a scratch directory (``<archive>/.incoming``), checked against the sizes
the server lists and hashed there; then copied into the archive, and finally every archived file is read
back and compared with the manifest. The hash is thus computed on one copy and verified on another, which
catches short writes and silent corruption on network file systems — the cases where deleting the original
would lose data. Any mismatch raises :class:`ArchiveVerificationError` and the caller must not delete the run.

The archive of a run is **append-only**. A later pass (after an interrupted deletion, the server may list
fewer files than before) merges into it: files it does not hold yet are added, files it holds are never
replaced or removed, and the manifest only grows. A file whose content changed on the server since it was
archived is added beside the old one (``<path>.~<sha256 prefix>``). The existing archive is verified before
the merge, so a damaged archive is never "repaired" by a smaller one.
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
RUN_SNAPSHOT_NAME = "run.json"
SCRATCH_NAME = ".incoming"
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
    model_name: str = ""  # a logged model's name, so a restore can recreate it under that name


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
        ArtifactTree(
            f"models/{model.model_id}", model.artifact_location, files.get(model.artifact_location, ()), model.name
        )
        for model in logged_models
    )
    return trees


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, or ``None`` when it has no archive yet."""
    path = run_dir / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        [ManifestEntry(**entry) for entry in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArchiveVerificationError(f"{path}: unreadable manifest: {error}") from error
    return manifest


def manifest_entries(manifest: Mapping[str, Any] | None) -> list[ManifestEntry]:
    return [] if manifest is None else [ManifestEntry(**entry) for entry in manifest["files"]]


def find_run_archive(root: Path, run_id: str) -> Path | None:
    """``<root>/<experiment_id>/<run_id>`` holding a manifest, whatever the experiment."""
    matches = [path.parent for path in root.glob(f"*/{run_id}/{MANIFEST_NAME}")]
    return matches[0] if len(matches) == 1 else None


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
        self.scratch_dir = scratch_dir or root / SCRATCH_NAME

    def run_dir(self, run: RunRecord) -> Path:
        return self.root / run.experiment_id / run.run_id

    def clean_scratch(self) -> int:
        """Remove what an interrupted pass left in the scratch directory; returns the bytes freed.

        Called at the start of a pass (one pass at a time: the scheduler never overlaps and the CronJob
        forbids concurrency), so nothing in there can belong to a download still in progress.
        """
        if not self.scratch_dir.is_dir():
            return 0
        freed = sum(path.stat().st_size for path in self.scratch_dir.rglob("*") if path.is_file())
        for entry in self.scratch_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for staging in self.root.glob("*/.*.partial"):  # staging directories of interrupted merges
            shutil.rmtree(staging, ignore_errors=True)
        return freed

    def archive(self, experiment: ExperimentRef, run: RunRecord, trees: Sequence[ArtifactTree]) -> Path:
        """Merge the trees into the run's archive and verify it all; raises ArchiveVerificationError."""
        final = self.run_dir(run)
        existing = read_manifest(final)
        if existing is not None:
            verify_archive(final)  # never build on (or hide) a damaged archive
        held = {entry.path: entry for entry in manifest_entries(existing)}
        held_hashes = {(entry.path, entry.sha256) for entry in held.values()}
        staging = final.with_name(f".{run.run_id}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        added: list[ManifestEntry] = []
        with tempfile.TemporaryDirectory(prefix=f"{run.run_id}-", dir=self.scratch_dir) as scratch:
            for entry in self._download_and_hash(Path(scratch), trees):
                target = _target_path(entry, held, held_hashes)
                if target is None:
                    continue  # already archived with this content
                (staging / target).parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(Path(scratch) / entry.path, staging / target)
                added.append(ManifestEntry(target, entry.size, entry.sha256))
                held[target] = added[-1]
                held_hashes.add((target, entry.sha256))
        _verify_entries(staging, added)  # a bad copy never enters the archive
        for entry in added:  # files first, manifest last: a crash in between leaves unlisted files only
            (final / entry.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / entry.path, final / entry.path)
        shutil.rmtree(staging, ignore_errors=True)
        final.mkdir(parents=True, exist_ok=True)
        write_json_atomically(final / RUN_SNAPSHOT_NAME, self.source.run_snapshot(run.run_id))
        now = datetime.now(UTC).isoformat()
        manifest = dict(existing or {"archived_at": now, "sources": {}, "files": []})
        model_names = {tree.archive_subdir: tree.model_name for tree in trees if tree.model_name}
        manifest.update(
            run_id=run.run_id,
            run_name=run.name,
            experiment_id=experiment.experiment_id,
            experiment_name=experiment.name,
            updated_at=now,
            sources={**manifest["sources"], **{tree.archive_subdir: tree.artifact_uri for tree in trees}},
            model_names={**manifest.get("model_names", {}), **model_names},
            files=[*manifest["files"], *(asdict(entry) for entry in added)],
        )
        write_json_atomically(final / MANIFEST_NAME, manifest)
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


def _target_path(
    entry: ManifestEntry, held: Mapping[str, ManifestEntry], held_hashes: set[tuple[str, str]]
) -> str | None:
    """Where a downloaded file goes in an append-only archive, or ``None`` if it is already there."""
    if entry.path not in held:
        return entry.path
    if held[entry.path].sha256 == entry.sha256:
        return None
    # Changed on the server since it was archived: keep both versions, the old one untouched.
    variant = f"{entry.path}.~{entry.sha256[:16]}"
    return None if (variant, entry.sha256) in held_hashes else variant


def verify_archive(run_dir: Path) -> list[ManifestEntry]:
    """Re-read every archived file and compare size and SHA-256 with the manifest beside them."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ArchiveVerificationError(f"{run_dir / MANIFEST_NAME}: no manifest")
    entries = manifest_entries(manifest)
    _verify_entries(run_dir, entries)
    return entries


def _verify_entries(directory: Path, entries: Sequence[ManifestEntry]) -> None:
    problems = []
    for entry in entries:
        archived = directory / entry.path
        if not archived.is_file():
            problems.append(f"{entry.path}: missing")
        elif (size := archived.stat().st_size) != entry.size:
            problems.append(f"{entry.path}: {size} bytes, manifest says {entry.size}")
        elif sha256_of(archived) != entry.sha256:
            problems.append(f"{entry.path}: SHA-256 differs from the manifest")
    if problems:
        raise ArchiveVerificationError(f"archive {directory} failed verification: " + "; ".join(problems))


def write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Write to a temporary sibling, fsync, rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
