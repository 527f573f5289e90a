"""Which runs stand behind a registered model version (pure).

A version points at its run in up to four ways, and MLflow fills them in inconsistently across versions
and register paths, so all four count:

* ``run_id`` on the version;
* a ``runs:/<run_id>/<path>`` source (the MLflow 2 way of registering);
* a ``models:/<model_id>`` source (MLflow 3 logged models), resolved to the logged model's source run;
* a plain artifact URI that lies inside a run's artifact directory (older clients resolved ``runs:/``
  to the artifact location before storing it).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from cleanup.model import LoggedModelRef, ModelVersionRef, RunRecord

_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")


def version_label(version: ModelVersionRef) -> str:
    """``registered trader v4 @champion`` — the keep reason shown to users."""
    label = f"registered {version.model_name} v{version.version}"
    if version.aliases:
        label += " " + " ".join(f"@{alias}" for alias in version.aliases)
    return label


def logged_model_id_of(version: ModelVersionRef) -> str | None:
    if version.model_id:
        return version.model_id
    match = _LOGGED_MODEL_URI.match(version.source)
    return match.group("model_id") if match else None


def runs_behind_version(
    version: ModelVersionRef,
    logged_models: Mapping[str, LoggedModelRef],
    run_by_artifact_uri: Mapping[str, str],
) -> set[str]:
    run_ids: set[str] = set()
    if version.run_id:
        run_ids.add(version.run_id)
    if match := _RUNS_URI.match(version.source):
        run_ids.add(match.group("run_id"))
    model_id = logged_model_id_of(version)
    if model_id and (logged := logged_models.get(model_id)) and logged.source_run_id:
        run_ids.add(logged.source_run_id)
    # Walk the source's ancestors ("a/b/c", "a/b", "a") so the lookup stays O(len(source)) per version.
    prefix = version.source.rstrip("/")
    while prefix:
        if run_id := run_by_artifact_uri.get(prefix):
            run_ids.add(run_id)
        prefix = prefix.rpartition("/")[0]
    return run_ids


def registry_protections(
    versions: Iterable[ModelVersionRef],
    logged_models: Iterable[LoggedModelRef],
    runs: Iterable[RunRecord],
) -> dict[str, list[str]]:
    """Map run_id → keep reasons for every run that some registered model version depends on."""
    logged_by_id = {model.model_id: model for model in logged_models}
    run_by_artifact_uri = {run.artifact_uri.rstrip("/"): run.run_id for run in runs if run.artifact_uri}
    protections: dict[str, list[str]] = defaultdict(list)
    for version in versions:
        for run_id in sorted(runs_behind_version(version, logged_by_id, run_by_artifact_uri)):
            protections[run_id].append(version_label(version))
    return dict(protections)


def registered_logged_model_ids(versions: Iterable[ModelVersionRef]) -> set[str]:
    """Logged models a registered version uses: never deleted, whatever happens to their run."""
    return {model_id for version in versions if (model_id := logged_model_id_of(version))}
