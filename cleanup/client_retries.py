"""How hard MLflow's HTTP client retries, set explicitly for the cleanup job.

MLflow's defaults (7 retries, back-off factor 2, 120 s timeout) are tuned to ride out rate limiting: a
request to a server that has gone away takes about 4 minutes to fail, so a pass with hundreds of runs left
would take most of a day before it reported anything. The job sets shorter values unless the environment
already sets them; together with :class:`cleanup.budget.FailureBudget` a dead server ends the pass within a
minute. MLflow reads these variables at every request (``mlflow.environment_variables``), so setting them
before the first call is enough.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CLIENT_RETRY_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # MLflow: 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow: 2 (seconds, doubled per retry)
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",  # MLflow: 1.0
    # One search page of 5,000 runs takes seconds even on a busy server; 60 s leaves a wide margin.
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # MLflow: 120
}


def configure_client_retries(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Fill in the job's defaults where the environment sets nothing; returns the values in effect."""
    for name, value in CLIENT_RETRY_DEFAULTS.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in CLIENT_RETRY_DEFAULTS}
