"""``checkpoint-cleanup restore RUN_ID --archive-path PATH``: put a deleted run's files back from its archive.

1. The archive is verified against its manifest first; a damaged archive restores nothing.
2. The run: a soft-deleted run is restored in place (same id). A purged run is recreated in its
   experiment from ``run.json`` (params, tags and the latest value of each metric; metric histories are not
   archived), tagged ``checkpoint_cleanup.restored_from=<old id>``.
3. Its artifacts are uploaded from the archive (exactly the manifest's files, copied out and re-hashed).
4. Each archived logged model becomes a **new** logged model of the run (MLflow cannot undelete one), with
   the same name and files; a logged model still on the server with files is left alone.
5. Everything uploaded is downloaded back and compared with the manifest (SHA-256).

The result (old → new run id, old → new logged model ids) is printed as JSON, and written with ``--report``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cleanup.archive import (
    MANIFEST_NAME,
    RUN_SNAPSHOT_NAME,
    ArchiveVerificationError,
    ManifestEntry,
    find_run_archive,
    read_manifest,
    sha256_of,
    verify_archive,
)
from cleanup.journal import DeletionJournal, JournalState

log = logging.getLogger(__name__)

RESTORED_FROM_TAG = "checkpoint_cleanup.restored_from"
# Tags MLflow sets itself on a new run, or that would point the copy at the old run's lineage wrongly.
_SKIPPED_TAGS = frozenset({"mlflow.runName", "mlflow.log-model.history"})


class RestoreError(Exception):
    pass


@dataclass(slots=True)
class RestoreResult:
    run_id: str
    restored_run_id: str
    how: str  # "restored in place" or "recreated"
    files: int
    logged_models: dict[str, str] = field(default_factory=dict)  # old model id → new model id
    skipped_models: dict[str, str] = field(default_factory=dict)  # old model id → why


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint-cleanup restore",
        description="Restore a run's artifacts and logged models from the cleanup archive, verified.",
    )
    parser.add_argument("run_id", metavar="RUN_ID", nargs="?")
    parser.add_argument("--archive-path", type=Path, required=True, help="the cleanup's --archive-path")
    parser.add_argument(
        "--list", action="store_true", help="list the archived runs (id, experiment, files, deletion state)"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--report", type=Path, metavar="FILE", help="also write the result as JSON")
    return parser


def restore_run(client: MlflowClient, archive_root: Path, run_id: str) -> RestoreResult:
    run_dir = find_run_archive(archive_root, run_id)
    if run_dir is None:
        raise RestoreError(f"no archive of run {run_id} under {archive_root}")
    entries = verify_archive(run_dir)
    manifest = read_manifest(run_dir) or {}
    snapshot = json.loads((run_dir / RUN_SNAPSHOT_NAME).read_text())
    target, how = _target_run(client, run_id, manifest["experiment_id"], snapshot)
    result = RestoreResult(run_id, target, how, files=0)
    with tempfile.TemporaryDirectory(prefix=f"restore-{run_id}-") as scratch:
        staged = _stage(run_dir, entries, Path(scratch))
        if (staged / "artifacts").is_dir():
            client.log_artifacts(target, str(staged / "artifacts"))
            result.files += sum(1 for e in entries if e.path.startswith("artifacts/"))
        models_dir = staged / "models"
        for model_dir in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
            old_id = model_dir.name
            if reason := _still_on_server(client, old_id):
                result.skipped_models[old_id] = reason
                continue
            name = manifest.get("model_names", {}).get(f"models/{old_id}") or f"restored-{old_id}"
            model = client.create_logged_model(
                experiment_id=_experiment_of(client, target), name=name, source_run_id=target,
                tags={RESTORED_FROM_TAG: old_id},
            )  # fmt: skip
            client.log_model_artifacts(model.model_id, str(model_dir))
            client.finalize_logged_model(model.model_id, "READY")
            result.logged_models[old_id] = model.model_id
            result.files += sum(1 for e in entries if e.path.startswith(f"models/{old_id}/"))
    _verify_uploaded(client, result, entries)
    return result


def _stage(run_dir: Path, entries: Sequence[ManifestEntry], scratch: Path) -> Path:
    """Copy exactly the manifest's files out of the archive, re-hashing each copy."""
    for entry in entries:
        destination = scratch / entry.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / entry.path, destination)
        if sha256_of(destination) != entry.sha256:
            raise ArchiveVerificationError(f"{entry.path}: the copy taken for the restore differs from the manifest")
    return scratch


def _target_run(client: MlflowClient, run_id: str, experiment_id: str, snapshot: dict[str, Any]) -> tuple[str, str]:
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        return _recreate(client, experiment_id, run_id, snapshot), "recreated"
    if run.info.lifecycle_stage == "deleted":
        client.restore_run(run_id)
    return run_id, "restored in place"


def _recreate(client: MlflowClient, experiment_id: str, run_id: str, snapshot: dict[str, Any]) -> str:
    info, data = snapshot.get("info", {}), snapshot.get("data", {})
    tags = {k: v for k, v in data.get("tags", {}).items() if k not in _SKIPPED_TAGS}
    tags[RESTORED_FROM_TAG] = run_id
    run = client.create_run(
        experiment_id, start_time=info.get("start_time"), tags=tags, run_name=info.get("run_name") or None
    )
    new_id: str = run.info.run_id
    timestamp = info.get("end_time") or info.get("start_time") or 0
    client.log_batch(
        new_id,
        metrics=[Metric(key, value, timestamp, 0) for key, value in data.get("metrics", {}).items()],
        params=[Param(key, str(value)) for key, value in data.get("params", {}).items()],
        tags=[RunTag(key, value) for key, value in tags.items()],
    )
    client.set_terminated(new_id, info.get("status") or "FINISHED", end_time=info.get("end_time"))
    return new_id


def _experiment_of(client: MlflowClient, run_id: str) -> str:
    experiment_id: str = client.get_run(run_id).info.experiment_id
    return experiment_id


def _still_on_server(client: MlflowClient, model_id: str) -> str | None:
    try:
        client.get_logged_model(model_id)
    except MlflowException:
        return None
    if client.list_logged_model_artifacts(model_id):
        return "still on the server with its files"
    return None


def _verify_uploaded(client: MlflowClient, result: RestoreResult, entries: Sequence[ManifestEntry]) -> None:
    """Download what was uploaded and compare it with the manifest."""
    with tempfile.TemporaryDirectory(prefix="restore-check-") as scratch:
        expected: dict[Path, str] = {}
        if any(e.path.startswith("artifacts/") for e in entries):
            local = Path(client.download_artifacts(result.restored_run_id, "", dst_path=f"{scratch}/artifacts"))
            expected.update(_under(local, "artifacts/", entries))
        for old_id, new_id in result.logged_models.items():
            local = Path(download_artifacts(f"models:/{new_id}", dst_path=f"{scratch}/models/{old_id}"))
            expected.update(_under(local, f"models/{old_id}/", entries))
        bad = [str(path) for path, digest in expected.items() if not path.is_file() or sha256_of(path) != digest]
        if bad:
            raise ArchiveVerificationError(f"restored files differ from the manifest: {', '.join(bad)}")


def _under(local: Path, prefix: str, entries: Sequence[ManifestEntry]) -> dict[Path, str]:
    return {local / e.path.removeprefix(prefix): e.sha256 for e in entries if e.path.startswith(prefix)}


def archived_runs(archive_root: Path) -> list[dict[str, Any]]:
    """One line per run in the archive, newest first: what an operator needs to pick a RUN_ID."""
    rows = []
    for manifest_path in archive_root.glob(f"*/*/{MANIFEST_NAME}"):
        manifest = json.loads(manifest_path.read_text())
        journal = DeletionJournal(manifest_path.parent).load()
        rows.append(
            {
                "run_id": manifest["run_id"],
                "run_name": manifest.get("run_name", ""),
                "experiment": f"{manifest.get('experiment_name', '')} ({manifest['experiment_id']})",
                "archived_at": manifest.get("updated_at") or manifest.get("archived_at", ""),
                "files": len(manifest["files"]),
                "bytes": sum(entry["size"] for entry in manifest["files"]),
                "deletion": _deletion_state(journal),
            }
        )
    return sorted(rows, key=lambda row: row["archived_at"], reverse=True)


def _deletion_state(journal: JournalState | None) -> str:
    if journal is None:
        return "none"
    if journal.aborted:
        return "aborted"
    return "done" if journal.completed_at else "pending"


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for row in archived_runs(args.archive_path):
            print(
                "  ".join(
                    str(row[key])
                    for key in ("run_id", "archived_at", "files", "bytes", "deletion", "experiment", "run_name")
                )
            )
        return 0
    if not args.run_id:
        parser.error("RUN_ID is required (or --list)")
    import mlflow

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)  # mlflow-artifacts:/ URIs resolve against it
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    try:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links; stdout is for the result
            result = restore_run(client, args.archive_path, args.run_id)
    except (RestoreError, ArchiveVerificationError, MlflowException, OSError) as error:
        log.error("restore of %s failed: %s", args.run_id, error)
        return 1
    document = json.dumps(asdict(result), indent=2)
    print(document)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(document + "\n")
    log.info(
        "restored run %s as %s (%s): %d files, logged models %s",
        result.run_id, result.restored_run_id, result.how, result.files, result.logged_models or "none",
    )  # fmt: skip
    return 0
