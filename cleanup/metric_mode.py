"""Which way a metric ranks when ``--metric-mode`` is not given, and a warning when it looks wrong.

``--metric val_loss`` with the default ``max`` keeps the ten *worst* runs and deletes the best, silently.
A metric whose name says lower is better (loss, error, drawdown, ...) is therefore ranked ``min`` unless
the mode is given explicitly, with a warning either way so the choice is visible in the log and report.
"""

from __future__ import annotations

import re

from cleanup.policy import MetricMode

# Whole words (split on anything but letters and digits) that mean "lower is better".
_LOWER_IS_BETTER_WORDS = frozenset(
    {"loss", "error", "err", "mse", "rmse", "mae", "mape", "nll", "perplexity", "ppl", "wer", "cer", "drawdown",
     "regret", "latency", "cost"}
)  # fmt: skip
# Suffixes long enough to be unambiguous inside a camelCase or run-together name (valLoss, trainerror).
_LOWER_IS_BETTER_SUFFIXES = ("loss", "error", "drawdown", "perplexity", "latency", "regret")


def suggests_lower_is_better(metric: str) -> bool:
    words = [word for word in re.split(r"[^a-z0-9]+", metric.lower()) if word]
    return any(word in _LOWER_IS_BETTER_WORDS or word.endswith(_LOWER_IS_BETTER_SUFFIXES) for word in words)


def resolve_metric_mode(metric: str, explicit: MetricMode | None) -> tuple[MetricMode, str | None]:
    """The mode to rank with, and a warning to show (or ``None``)."""
    lower = suggests_lower_is_better(metric)
    if explicit is None:
        if lower:
            return "min", (
                f"--metric {metric} looks like lower is better: ranking with --metric-mode min "
                "(pass --metric-mode explicitly to silence this)"
            )
        return "max", None
    if explicit == "max" and lower:
        return "max", f"--metric-mode max keeps the runs with the highest {metric}; is lower better?"
    return explicit, None
