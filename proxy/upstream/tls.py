"""TLS to ``https://`` targets: one client context per upstream per (re)load, built from its ``tls`` policy.

The policy layer does no I/O, so the files a ``tls`` block names (``ca_file``, ``cert_file``, ``key_file``) are
read here, when the sidecar starts, when it reloads and when ``sidecar check`` runs. A file that is missing,
unreadable or not PEM is a config error at the line the key was written on (the loader keeps those positions),
and a reload with such an error keeps the running policy, as any other broken reload does.

Every (re)load reads the files again, so a reload picks up rotated certificates. When neither the policy nor
the bytes of its files changed, the running context is kept (with its pooled connections and TLS sessions).

Session resumption: asyncio's ``create_connection`` takes no ``ssl.SSLSession``, but both asyncio's and
uvloop's SSL transports create their ``SSLObject`` through ``SSLContext.wrap_bio``, which does. ``ClientContext``
offers each new client connection the session the pool last saved for that server name (TLS 1.3 tickets or a
TLS 1.2 session), so a new pooled connection resumes instead of paying for a full handshake.

Reading a session costs memory on some interpreters: before CPython's fix of gh-116810 (in 3.12.7, 3.13.1 and
3.14) every read of ``SSLObject.session`` leaks a serialized copy of the session (about 7 KiB with a
certificate), so reading it from every new connection grows the process without bound. There the context
reads one only for a connection that did not resume the saved session (``SSLObject.session_reused`` says so
without reading anything) and at most once per ``backoff`` for each name: 5 minutes, doubled by every read up
to an hour, back to 5 minutes whenever a connection resumes. A server whose tickets can be resumed until
they expire (nginx, OpenSSL's default) costs one read per ticket lifetime; a server that never resumes, or
whose tickets resume only once, one read per 5 minutes at most (about 2 MiB a day per server name).
"""

from __future__ import annotations

import hashlib
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proxy.policy.issues import ConfigIssue
from proxy.policy.loader import PolicyRead
from proxy.policy.model import SidecarConfig, TlsPolicy, UpstreamPolicy

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_MAX_SESSIONS = 64  # server names remembered per context
_LEAKY_BACKOFF = (300.0, 3600.0)  # where reading leaks, seconds between reads: shortest, longest


def session_read_leaks(release: tuple[int, ...]) -> bool:
    """Whether this CPython leaks a copy of the session on every read of ``SSLObject.session`` (gh-116810)."""
    return release < (3, 12, 7) or (3, 13, 0) <= release < (3, 13, 1)


SESSION_READ_LEAKS = session_read_leaks(sys.version_info[:3])


@dataclass
class SavedSession:
    """The session kept for one server name, and (where reading one leaks) when a new one may be read."""

    session: ssl.SSLSession | None = None  # (None: nothing to resume with yet)
    next_read: float = 0.0  # (loop time) no read before this
    backoff: float = _LEAKY_BACKOFF[0]  # the wait after the next read

    def read_again(self, resumed: bool, now: float) -> bool:
        """Where reading leaks: whether to read a new connection's session, given whether that connection
        resumed the one saved here (which keeps it, and shortens the wait to the least)."""
        if resumed:
            self.backoff = _LEAKY_BACKOFF[0]
            return False
        if now < self.next_read:
            return False
        self.next_read = now + self.backoff
        self.backoff = min(self.backoff * 2, _LEAKY_BACKOFF[1])
        return True


class ClientContext(ssl.SSLContext):
    """A client ``SSLContext`` that resumes sessions; it also carries the policy's ``server_name``."""

    server_name: str | None
    fingerprint: str
    sessions: dict[str, SavedSession]
    read_leaks: bool  # reading SSLObject.session leaks here: read as few as resumption needs
    session_reads: int  # reads of SSLObject.session

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side and isinstance(server_hostname, str):
            saved = self.sessions.get(server_hostname)
            session = saved.session if saved is not None else None
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def save_session(self, server_hostname: str, ssl_object: Any, now: float) -> None:
        """Keep a connection's session for the next connection to that name (once it holds something to resume
        with: in TLS 1.3 the tickets come after the handshake, with the first answer)."""
        if not isinstance(ssl_object, ssl.SSLObject) or ssl_object.context is not self:
            return  # (a session only resumes with the context it was made with)
        saved = self.sessions.get(server_hostname)
        if saved is None:
            if len(self.sessions) >= _MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
            saved = self.sessions[server_hostname] = SavedSession()
        if self.read_leaks and not saved.read_again(ssl_object.session_reused, now):
            return
        self.session_reads += 1
        session = ssl_object.session
        if session is not None and (session.has_ticket or session.id):
            saved.session = session


def refused_tls13(ssl_object: object) -> bool:
    """Whether a new TLS 1.3 connection that closed before a byte of answer was refused by the server: it sent
    no session ticket, which a TLS 1.3 server does once it has accepted the handshake (and judged the client's
    certificate). A resumed handshake judges no certificate. This error path is the only one that reads the
    session of every such connection where the read leaks (above)."""
    if not isinstance(ssl_object, ssl.SSLObject) or ssl_object.version() != "TLSv1.3" or ssl_object.session_reused:
        return False
    session = ssl_object.session
    return session is None or not session.has_ticket


class TlsFileError(Exception):
    """What is wrong with a ``tls`` block's files: (key, message) for each bad one."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load (never an interactive prompt)


def client_context(tls: TlsPolicy, base: Path, alpn: tuple[str, ...] = ("http/1.1",)) -> ClientContext:
    """The context for one upstream's policy; ``TlsFileError`` names each key whose file is wrong.

    ``alpn``: the protocols offered, ``("h2",)`` for HTTP/2 upstreams (gRPC), which then require the server to
    select ``h2`` (``proxy.upstream.h2pool`` checks)."""
    files: dict[str, Path] = {}
    problems: list[tuple[str, str]] = []
    digest = hashlib.sha256(repr((tls, alpn)).encode())
    for key in ("ca_file", "cert_file", "key_file"):
        name = getattr(tls, key)
        if name is None:
            continue
        path = base / name
        try:
            digest.update(path.read_bytes())
            files[key] = path
        except OSError as exc:
            problems.append((key, f"cannot read {name}: {exc.strerror or exc}"))
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.server_name = tls.server_name
    ctx.fingerprint = digest.hexdigest()
    ctx.sessions = {}
    ctx.read_leaks = SESSION_READ_LEAKS
    ctx.session_reads = 0
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_alpn_protocols(list(alpn))
    if "ca_file" in files:
        try:
            ctx.load_verify_locations(cafile=str(files["ca_file"]))  # replaces the system trust store
        except ssl.SSLError as exc:
            problems.append(("ca_file", f"{tls.ca_file} holds no PEM certificate: {exc.reason or exc}"))
    elif tls.verify and tls.ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    key_path = files.get("key_file")
    if "cert_file" in files and (tls.key_file is None or key_path is not None):
        try:
            ctx.load_cert_chain(str(files["cert_file"]), str(key_path) if key_path else None, password=_no_password)
        except ssl.SSLError as exc:
            mismatch = "KEY_VALUES_MISMATCH" in str(exc.reason)
            key = "key_file" if key_path is not None and mismatch else "cert_file"
            what = "does not match cert_file" if mismatch else "is not a PEM certificate and (unencrypted) key"
            written = tls.key_file if key == "key_file" else tls.cert_file
            problems.append((key, f"{written} {what}: {exc.reason or exc}"))
    if problems:
        raise TlsFileError(problems)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _base(config: SidecarConfig) -> Path:
    source = Path(config.source)
    return source.parent if config.source != "<string>" else Path()


def build_contexts(
    config: SidecarConfig, previous: Mapping[str, ClientContext] | None = None
) -> tuple[dict[str, ClientContext], list[ConfigIssue]]:
    """A context for every upstream with an https target, and the problems with their files.

    A context whose policy and files are unchanged since ``previous`` is kept as it was."""
    contexts: dict[str, ClientContext] = {}
    issues: list[ConfigIssue] = []
    base = _base(config)
    for up in config.upstreams:
        if not _uses_tls(up):
            continue
        try:
            ctx = client_context(up.tls, base, ("h2",) if up.protocol == "grpc" else ("http/1.1",))
        except TlsFileError as exc:
            where = f"upstreams.{up.name}.tls"
            for key, message in exc.problems:
                line, column, path = config.positions.get(
                    f"{where}.{key}", config.positions.get(where, (0, 0, f"{where}.{key}"))
                )
                issue = ConfigIssue(config.source, line, column, path, message)
                if issue not in issues:  # a defaults' file shared by several upstreams: said once
                    issues.append(issue)
            continue
        old = previous.get(up.name) if previous is not None else None
        contexts[up.name] = old if old is not None and old.fingerprint == ctx.fingerprint else ctx
    return contexts, issues


def _uses_tls(up: UpstreamPolicy) -> bool:
    return up.protocol != "tcp" and any(t.is_tls for t in up.targets)


def checked(
    read: PolicyRead, previous: Mapping[str, ClientContext] | None = None
) -> tuple[PolicyRead, dict[str, ClientContext]]:
    """A policy read with its TLS files judged too: a bad file makes it an error like any other."""
    if read.config is None:
        return read, {}
    contexts, issues = build_contexts(read.config, previous)
    if not issues:
        return read, contexts
    everything = sorted([*read.issues, *issues], key=lambda i: (i.line, i.column))
    return replace(read, config=None, issues=everything), {}
