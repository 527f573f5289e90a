"""Keep credentials out of logs and reports (stdlib only, so the CLI can import it without mlflow)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
_SECRET_PARAMS = re.compile(r"(?i)\b(password|passwd|pwd|token|secret|access_key|sig)=[^&\s;'\"]+")


def redact_uri(uri: str) -> str:
    """Drop user:password and the query string, where credentials hide (``?password=``, tokens)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query:
        return uri  # nothing secret; also keeps sqlite:///relative.db exactly as given
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Mask credentials inside free text, e.g. URLs that MLflow puts into its error messages."""
    return _SECRET_PARAMS.sub(r"\1=***", _USERINFO.sub("***@", text))
