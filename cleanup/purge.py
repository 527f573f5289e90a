"""``--purge``: hard-delete the metadata of runs the job has just soft-deleted.

The tracking REST API can only soft-delete, so purging needs direct access to the backend store, exactly
like ``mlflow gc`` (whose hard-delete hooks this reuses). That is the one place the job needs database
credentials, and it is opt-in. Database backends need SQLAlchemy, which ``mlflow-skinny`` does not
bring: the import is therefore deferred until ``--purge`` is actually used.
"""

from __future__ import annotations

from typing import Any


class PurgeUnavailableError(RuntimeError):
    pass


class Purger:
    def __init__(self, backend_store_uri: str) -> None:
        try:
            from mlflow.tracking import _get_store  # deferred, see module docstring
        except ImportError as error:  # pragma: no cover - depends on the installed mlflow flavour
            raise PurgeUnavailableError(f"--purge needs the MLflow tracking store: {error}") from error
        try:
            self._store: Any = _get_store(backend_store_uri)  # type: ignore[no-untyped-call]
        except Exception as error:
            raise PurgeUnavailableError(
                f"cannot open the backend store for --purge ({type(error).__name__}); database stores "
                "need SQLAlchemy and the database driver installed (pip install sqlalchemy alembic, "
                "or full mlflow)"
            ) from error
        if not hasattr(self._store, "_hard_delete_run"):
            raise PurgeUnavailableError("this backend store cannot hard-delete runs")

    def purge_run(self, run_id: str) -> None:
        self._store._hard_delete_run(run_id)

    def purge_logged_model(self, model_id: str) -> None:
        if hasattr(self._store, "_hard_delete_logged_model"):
            self._store._hard_delete_logged_model(model_id)
