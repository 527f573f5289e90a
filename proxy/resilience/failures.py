"""The ways an attempt can fail, named once.

``FailureKind`` is what ``x-sidecar-reason`` reports for a failure the sidecar detected itself, what
``retry_on`` accepts besides status codes, and the ``kind`` label of ``sidecar_upstream_failures_total``. It is
a ``StrEnum``, so a kind compares equal to (and formats as) its wire name: ``FailureKind.RESET == "reset"``.

An answer that did come but with a status of 500 or more is not a kind of failure in this sense (the upstream
spoke, and ``retry_on`` names such answers by status); it is counted under ``FAILED_ANSWER``.
"""

from __future__ import annotations

import enum
from typing import Final


class FailureKind(enum.StrEnum):
    CONNECT_ERROR = "connect_error"  # no connection: refused, unreachable, DNS, or connect timeout
    TIMEOUT = "timeout"  # no response head within per_try, a body stalled, or total ran out
    RESET = "reset"  # the connection was lost before the response completed
    BAD_RESPONSE = "bad_response"  # the upstream spoke broken HTTP


FAILED_ANSWER: Final = "5xx"
"""The failure label of an answer with a status ≥ 500 (metrics, outlier ejection reasons)."""
