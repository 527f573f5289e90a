"""Everything that talks to MLflow: reads for planning, artifact and run deletion for the job.

Only APIs that ship in ``mlflow-skinny`` are used (``MlflowClient`` and the artifact repository registry),
so the container does not need the full server package. Artifacts are deleted through MLflow's artifact
repository for the run's ``artifact_uri``; for ``mlflow-artifacts:/`` URIs that is an HTTP DELETE on the
tracking server's artifact proxy, so the job needs no database or bucket credentials of its own.

Page tokens of MLflow's search APIs are offsets into a result set: a run created (or deleted) while
planning pages through thousands of runs shifts every later page, so offset paging can read a run twice or
miss one. Runs are therefore read with a keyset cursor on ``start_time`` (see :func:`keyset_pages`), and
everything is read to the end before anything is deleted (the planner runs on a complete snapshot).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from cleanup.model import ExperimentRef, LoggedModelRef, ModelVersionRef, RunRecord
from cleanup.policy import MetricMode, best_value

log = logging.getLogger(__name__)

# MLflow's SQL stores re-run the whole sorted query for every page (the token is an offset), so few big
# pages beat many small ones: 10,000 runs plan ~2x faster with 5,000 than with MLflow's default 1,000.
# Far below the 50,000 limit so one page stays well inside the HTTP timeout.
RUN_PAGE_SIZE = 5000
REGISTRY_PAGE_SIZE = 1000
# search_runs filters with one SQL IN clause per call; keep it a reasonable size.
EXPERIMENTS_PER_SEARCH = 100

T = TypeVar("T")
_OWN_FOLDER = re.compile(r"^(?P<folder>mlflow-artifacts:/.+/(?:[0-9a-f]{32}|models/m-[0-9a-f]+))/artifacts/?$")


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    path: str  # relative to the artifact root it was listed from
    size: int


def _paged(search: Callable[..., Any]) -> Iterator[Any]:
    """Call an MLflow ``search_*`` method page by page, following ``page_token`` to the last page."""
    token: str | None = None
    while True:
        page = search(page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def keyset_pages(
    search: Callable[..., Any], run_of: Callable[[Any], tuple[int | None, str]], page_size: int
) -> Iterator[Any]:
    """Every run exactly once, even while others are created or deleted: a keyset cursor on ``start_time``.

    ``search(filter_string=..., page_token=...)`` must order by ``start_time`` ascending (MLflow adds the run
    id as the tie-breaker). Each page starts strictly after the last start time fully read; the runs sharing
    the page's last start time are read as one bucket of their own (``start_time = T``, offset paging — only a
    run created with exactly that millisecond could shift it, and duplicates are dropped anyway). A run
    created meanwhile behind the cursor is not read: the plan is then of the runs as they were.

    MLflow sorts runs without a start time last, and a ``start_time`` filter never matches them (there is no
    ``IS NULL`` for attributes). A page ending on one finishes the search by offset; one that only exists
    beyond a page of timed runs is not read — and so never deleted. MLflow's client always sends a start
    time (``MlflowClient.create_run`` defaults it to now); a direct database write can leave it empty.
    """
    seen: set[str] = set()

    def fresh(runs: Iterable[Any]) -> Iterator[Any]:
        for run in runs:
            run_id = run_of(run)[1]
            if run_id not in seen:
                seen.add(run_id)
                yield run

    lower: int | None = None
    while True:
        after = "" if lower is None else f"attributes.start_time > {lower}"
        page = search(filter_string=after, page_token=None)
        if len(page) < page_size or not page.token:
            yield from fresh(page)
            return
        last = run_of(page[-1])[0]
        if last is None:  # runs without a start time cannot be keyed: finish this query by offset
            yield from fresh(_paged(partial(search, filter_string=after)))
            return
        yield from fresh(run for run in page if (start := run_of(run)[0]) is not None and start < last)
        yield from fresh(_paged(partial(search, filter_string=f"attributes.start_time = {last}")))
        lower = last


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _start_and_id(run: Any) -> tuple[int | None, str]:
    return run.info.start_time, run.info.run_id


def run_record(run: Any, metric: str, metric_value: float | None = None, *, use_value: bool = False) -> RunRecord:
    """``metric_value`` replaces the run's latest value when ``use_value`` (``--rank-by best``)."""
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        status=info.status,
        start_time_ms=info.start_time,
        metric=metric_value if use_value else data.metrics.get(metric),
        tags=dict(data.tags),
        name=info.run_name or "",
        end_time_ms=info.end_time,
        artifact_uri=info.artifact_uri or "",
        lifecycle_stage=info.lifecycle_stage or "active",
    )


def _artifact_repository(artifact_uri: str) -> Any:
    # MLflow's repository classes are partly untyped; keep the Any in one place.
    return get_artifact_repository(artifact_uri)


def _is_not_found(error: MlflowException) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


class MlflowStore:
    """A thin, typed facade over ``MlflowClient`` for the cleanup job."""

    def __init__(
        self, client: MlflowClient, page_size: int = RUN_PAGE_SIZE, *, best_of: MetricMode | None = None
    ) -> None:
        """``best_of``: rank by the best value of each run's metric history in that direction (one
        ``get_metric_history`` call per run) instead of the latest value that searches return."""
        self.client = client
        self.page_size = page_size
        self.best_of = best_of

    def _record(self, run: Any, metric: str) -> RunRecord:
        if self.best_of is None:
            return run_record(run, metric)
        history = [m.value for m in self.client.get_metric_history(run.info.run_id, metric)]
        best = best_value(history, self.best_of)
        return run_record(run, metric, best if best is not None else run.data.metrics.get(metric), use_value=True)

    # ---- reads for planning -------------------------------------------------------------------------

    def experiments(self, only: Sequence[str] = ()) -> list[ExperimentRef]:
        """Every active experiment, or those whose id or name is in ``only``."""
        found = [
            ExperimentRef(exp.experiment_id, exp.name)
            for exp in _paged(
                partial(
                    self.client.search_experiments,
                    view_type=ViewType.ACTIVE_ONLY,
                    max_results=REGISTRY_PAGE_SIZE,
                )
            )
        ]
        if not only:
            return found
        wanted = set(only)
        selected = [exp for exp in found if exp.experiment_id in wanted or exp.name in wanted]
        unknown = wanted - {exp.experiment_id for exp in selected} - {exp.name for exp in selected}
        if unknown:
            raise LookupError(f"no active experiment with id or name: {', '.join(sorted(unknown))}")
        return selected

    def deleted_experiments(self) -> list[ExperimentRef]:
        """Experiments a user deleted (their runs are freed only with ``--include-deleted``)."""
        return [
            ExperimentRef(exp.experiment_id, exp.name)
            for exp in _paged(
                partial(
                    self.client.search_experiments,
                    view_type=ViewType.DELETED_ONLY,
                    max_results=REGISTRY_PAGE_SIZE,
                )
            )
        ]

    def deleted_runs(
        self, active_experiment_ids: Sequence[str], deleted_experiment_ids: Sequence[str], metric: str
    ) -> Iterator[RunRecord]:
        """Runs users deleted in active experiments, and every run of deleted experiments."""
        yield from self.runs(active_experiment_ids, metric, view=ViewType.DELETED_ONLY)
        yield from self.runs(deleted_experiment_ids, metric, view=ViewType.ALL)

    def runs(self, experiment_ids: Sequence[str], metric: str, view: int = ViewType.ACTIVE_ONLY) -> Iterator[RunRecord]:
        for chunk in _chunks(list(experiment_ids), EXPERIMENTS_PER_SEARCH):
            search = partial(
                self.client.search_runs,
                experiment_ids=list(chunk),
                run_view_type=view,
                max_results=self.page_size,
                order_by=["attributes.start_time ASC"],
            )
            for run in keyset_pages(search, _start_and_id, self.page_size):
                yield self._record(run, metric)

    def model_versions(self) -> list[ModelVersionRef]:
        """Every registered model version, with the aliases of its registered model attached.

        ``search_model_versions`` returns versions without aliases, so aliases are read from
        ``search_registered_models`` and joined here.
        """
        aliases: dict[tuple[str, str], list[str]] = {}
        for model in _paged(partial(self.client.search_registered_models, max_results=REGISTRY_PAGE_SIZE)):
            for alias, version in (model.aliases or {}).items():
                aliases.setdefault((model.name, str(version)), []).append(alias)
        versions: dict[tuple[str, str], ModelVersionRef] = {}  # offset pages can repeat an entry
        for mv in _paged(partial(self.client.search_model_versions, max_results=REGISTRY_PAGE_SIZE)):
            key = (mv.name, str(mv.version))
            versions[key] = ModelVersionRef(
                model_name=mv.name,
                version=str(mv.version),
                source=mv.source or "",
                run_id=mv.run_id or None,
                model_id=getattr(mv, "model_id", None) or None,
                aliases=tuple(sorted(aliases.get(key, []))),
            )
        return list(versions.values())

    def versions_of_run(self, run_id: str, model_ids: Sequence[str] = ()) -> list[str]:
        """``name vN`` of every version registered from this run or from one of its logged models.

        The re-check just before each destructive step. MLflow sets a version's ``run_id`` when it is
        registered from ``models:/<model_id>`` too, but older clients may not, hence the source filter.
        """
        filters = [f"run_id = '{run_id}'", *(f"source_path = 'models:/{model_id}'" for model_id in model_ids)]
        found = {
            (mv.name, int(mv.version))
            for filter_string in filters
            for mv in self.client.search_model_versions(filter_string=filter_string)
        }
        return [f"{name} v{version}" for name, version in sorted(found)]

    def logged_models(self, experiment_ids: Sequence[str]) -> list[LoggedModelRef]:
        models: dict[str, LoggedModelRef] = {}  # offset pages can repeat an entry
        for chunk in _chunks(list(experiment_ids), EXPERIMENTS_PER_SEARCH):
            search = partial(self.client.search_logged_models, experiment_ids=list(chunk), max_results=100)
            for model in _paged(search):
                models[model.model_id] = LoggedModelRef(
                    model_id=model.model_id,
                    experiment_id=model.experiment_id,
                    name=model.name,
                    source_run_id=model.source_run_id or None,
                    artifact_location=model.artifact_location,
                )
        return list(models.values())

    def get_run(self, run_id: str, metric: str, *, deleted_too: bool = False) -> RunRecord | None:
        """The run as it is now, or ``None`` if it is gone or (unless ``deleted_too``) deleted."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if _is_not_found(error):
                return None
            raise
        if run.info.lifecycle_stage != "active" and not deleted_too:
            return None
        return self._record(run, metric)

    def run_snapshot(self, run_id: str) -> dict[str, Any]:
        """Params, metrics and tags of a run, for the archive (deleted metadata may later be purged)."""
        snapshot: dict[str, Any] = self.client.get_run(run_id).to_dictionary()
        return snapshot

    # ---- artifacts ----------------------------------------------------------------------------------

    def list_files(self, artifact_uri: str) -> list[ArtifactFile]:
        """Every file under ``artifact_uri``, recursively, with its size."""
        repo = _artifact_repository(artifact_uri)
        files: list[ArtifactFile] = []
        pending: list[str | None] = [None]
        while pending:
            directory = pending.pop()
            for info in repo.list_artifacts(directory):
                if info.is_dir:
                    pending.append(info.path)
                else:
                    files.append(ArtifactFile(info.path, int(info.file_size or 0)))
        return sorted(files, key=lambda f: f.path)

    def download_tree(self, artifact_uri: str, destination_dir: Path) -> None:
        """Download every file under ``artifact_uri`` into ``destination_dir``, keeping relative paths."""
        destination_dir.mkdir(parents=True, exist_ok=True)
        _artifact_repository(artifact_uri).download_artifacts("", dst_path=str(destination_dir))

    def delete_artifacts(self, artifact_uri: str) -> None:
        _artifact_repository(artifact_uri).delete_artifacts()
        self._remove_empty_folder(artifact_uri)

    def _remove_empty_folder(self, artifact_uri: str) -> None:
        """The server's proxy removes ``<run_id>/artifacts`` but leaves an empty ``<run_id>/`` folder (and
        ``models/<model_id>/``) behind; remove it too, only if it really is empty. Only for proxied
        ``mlflow-artifacts:/`` URIs, where that folder holds nothing but the artifacts (in a file store's
        ``mlruns`` the run folder also holds the run's metadata)."""
        match = _OWN_FOLDER.match(artifact_uri)
        if not match:
            return
        try:
            folder = _artifact_repository(match.group("folder"))
            if not folder.list_artifacts():
                folder.delete_artifacts()
        except Exception as error:  # cosmetic: the bytes are already freed
            log.debug("could not remove the empty folder of %s: %s", artifact_uri, error)

    # ---- metadata -----------------------------------------------------------------------------------

    def delete_logged_model(self, model_id: str) -> None:
        try:
            self.client.delete_logged_model(model_id)
        except MlflowException as error:
            if not _is_not_found(error):
                raise

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)
