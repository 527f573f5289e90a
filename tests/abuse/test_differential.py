"""Differential: the corpus in ``differential.py`` replayed through the sidecar, nginx and HAProxy (issue #13).

Each proxy runs as a real process in front of its own recording upstream, which parses what it is sent with
llhttp and keeps every request with its boundary (method, target, head, body, trailers). Every vector goes out on
a fresh connection; all vectors run concurrently, and pooled upstream connections are fine because each request
carries its vector's tag. Then, for the sidecar, per vector:

1. nothing is forwarded that both peers refused — the sidecar may be stricter than both, never more lenient;
2. what is forwarded is a prefix of the requests the client wrote, each with its own method and body: bytes in
   a body never become a request, a body never swallows the next request, trailers never join the head;
3. each request gets one answer: the upstream's for what was forwarded, then at most one of the sidecar's own,
   after which the connection is closed; a request sent completely is never left unanswered.

nginx and HAProxy get head buffers as large as the sidecar's ``max_header_bytes`` (64 KiB), so that what is
compared is syntax, not buffer sizes. Run with ``-s`` for the per-vector table; ``#`` marks vectors where the
sidecar's answers or forwarding differ from both peers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.abuse.differential import (
    Answer,
    Outcome,
    Patience,
    Recorder,
    Seen,
    Upstream,
    Vector,
    attribute,
    check_answers,
    check_boundaries,
    check_not_more_lenient,
    corpus,
    exchange,
    haproxy_conf,
    naive_proxy,
    nginx_conf,
    parse_answers,
    table,
)
from tests.support.abuse import BackgroundLoop
from tests.support.eventually import eventually_sync
from tests.support.servers import stopping
from tests.support.sidecar import free_port, policy_listen, sidecar_process, write_policy

VECTORS = corpus()
PEERS = ("nginx", "haproxy")
PATIENCE = Patience(cap=4.0, quiet=1.0, grace=0.3)
CONCURRENCY = 48  # connections in flight per proxy

# Vectors where the sidecar is known to fail a check: each is an xfail(strict=True) naming the bug, so a fix
# turns it into a failure until it is removed from here. None at present.
KNOWN: dict[tuple[str, str], str] = {}


@dataclass
class Run:
    outcomes: dict[str, list[Outcome]]  # proxy → one Outcome per vector
    upstreams: dict[str, Upstream]
    strays: dict[str, list[Seen]]  # requests an upstream saw that carry no vector tag

    def peers(self, vid: int) -> dict[str, Outcome]:
        return {name: self.outcomes[name][vid] for name in PEERS}


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 10.0) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    eventually_sync(listening, timeout=timeout, interval=0.05, what=f"{what} listening")


@contextlib.contextmanager
def _spawn(argv: list[str], port: int, what: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    with stopping(proc):
        _wait_port(port, proc, what, log)
        yield


async def _replay(ports: dict[str, int]) -> dict[str, list[tuple[bytes, bool]]]:
    async def one(gate: asyncio.Semaphore, port: int, vid: int) -> tuple[bytes, bool]:
        async with gate:
            try:
                return await exchange(port, VECTORS[vid], vid, PATIENCE)
            except (OSError, TimeoutError) as exc:
                return f"<connect failed: {exc}>".encode(), True

    async def proxy(port: int) -> list[tuple[bytes, bool]]:
        gate = asyncio.Semaphore(CONCURRENCY)
        return list(await asyncio.gather(*(one(gate, port, vid) for vid in range(len(VECTORS)))))

    names = list(ports)
    results = await asyncio.gather(*(proxy(ports[name]) for name in names))
    return dict(zip(names, results, strict=True))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    nginx, haproxy = shutil.which("nginx"), shutil.which("haproxy")
    if nginx is None or haproxy is None:
        pytest.skip("nginx and haproxy are needed (Debian packages nginx-light and haproxy)")
    work = tmp_path_factory.mktemp("differential")
    work.chmod(0o755)
    background = BackgroundLoop()
    servers: list[asyncio.AbstractServer] = []
    upstreams = {name: Upstream(name, free_port()) for name in ("sidecar", *PEERS)}

    async def serve(upstream: Upstream) -> None:
        loop = asyncio.get_running_loop()
        servers.append(await loop.create_server(lambda: Recorder(upstream), "127.0.0.1", upstream.port))

    try:
        for upstream in upstreams.values():
            background.run(serve(upstream))
        policy = write_policy(
            work / "sidecar.yaml",
            {"svc": {"targets": [f"http://127.0.0.1:{upstreams['sidecar'].port}"]}},
            defaults={"breaker": {"failure_threshold": 100000}},
            http={"header_timeout": "10s"},
        )
        ports = {"sidecar": policy_listen(policy, "svc")[1], "nginx": free_port(), "haproxy": free_port()}
        prefix = work / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(nginx_conf(prefix, ports["nginx"], upstreams["nginx"].port))
        (work / "haproxy.cfg").write_text(haproxy_conf(ports["haproxy"], upstreams["haproxy"].port))
        nginx_argv = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        with (
            sidecar_process(policy, env={"SEAWALL_TEST_TOKEN": "differential"}),
            _spawn(nginx_argv, ports["nginx"], "nginx", work / "nginx.out"),
            _spawn(
                [haproxy, "-db", "-f", str(work / "haproxy.cfg")], ports["haproxy"], "haproxy", work / "haproxy.out"
            ),
        ):
            started = time.monotonic()
            replies = asyncio.run(_replay(ports))
            background.run(asyncio.sleep(0.2))  # let the recorders take in anything still in flight
            elapsed = time.monotonic() - started
            outcomes: dict[str, list[Outcome]] = {}
            strays: dict[str, list[Seen]] = {}
            for name, upstream in upstreams.items():
                per_vector, strays[name] = attribute(upstream, len(VECTORS))
                outcomes[name] = []
                for vid, (raw, closed) in enumerate(replies[name]):
                    answers, malformed = parse_answers(raw, VECTORS[vid].head_first)
                    outcomes[name].append(Outcome(raw, closed, answers, malformed, per_vector[vid]))
            result = Run(outcomes, upstreams, strays)
            flagged = {vid for vid in range(len(VECTORS)) if _differs(result, vid)}
            print(f"\n{len(VECTORS)} vectors through {', '.join(ports)} in {elapsed:.1f}s")
            for line in table(VECTORS, outcomes, flagged):
                print(line)
            yield result
    finally:
        for server in servers:
            background.loop.call_soon_threadsafe(server.close)
        with contextlib.suppress(Exception):
            background.stop()


def _shape(outcome: Outcome) -> tuple[object, ...]:
    """What the table compares: the status classes a client saw and the requests forwarded whole."""
    forwarded = tuple(s.tag() for s in outcome.forwarded if s.complete)
    return tuple(a.status // 100 for a in outcome.answers), forwarded


def _differs(run: Run, vid: int) -> bool:
    mine = _shape(run.outcomes["sidecar"][vid])
    return all(_shape(peer) != mine for peer in run.peers(vid).values())


def _params(check: str) -> list[object]:
    return [
        pytest.param(vid, id=v.name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[(check, v.name)])])
        if (check, v.name) in KNOWN
        else pytest.param(vid, id=v.name)
        for vid, v in enumerate(VECTORS)
    ]


def _vector_report(run: Run, vid: int) -> str:
    vector: Vector = VECTORS[vid]
    lines = [f"vector {vid} {vector.name}: {vector.data(vid)[:300]!r}"]
    for name, outcomes in run.outcomes.items():
        outcome = outcomes[vid]
        lines.append(f"  {name:8} {outcome.summary():24} answer bytes {outcome.raw[:160]!r}")
        for seen in outcome.forwarded:
            lines.append(
                f"  {'':8} upstream saw {seen.method!r} {seen.url[:80]!r} body={seen.body[:80]!r}"
                f"{'' if seen.complete else ' (cut off)'}"
            )
    return "\n".join(lines)


def test_corpus_is_large_and_its_names_unique() -> None:
    assert len(VECTORS) >= 150
    assert len({v.name for v in VECTORS}) == len(VECTORS)
    assert all(v.data(999).count(b"{{") == 0 for v in VECTORS)
    assert {name for _, name in KNOWN} <= {v.name for v in VECTORS}


def test_every_proxy_forwards_the_controls_whole(run: Run) -> None:
    """The harness itself: valid requests reach each upstream whole and come back answered, on all three."""
    for vid, vector in enumerate(VECTORS):
        if not vector.control:
            continue
        for name, outcomes in run.outcomes.items():
            outcome = outcomes[vid]
            bodies = [(s.tag(), s.method, s.body) for s in outcome.forwarded]
            want = [((vid, "r", i), r.method, vector.body(vid, i)) for i, r in enumerate(vector.requests)]
            assert bodies == want, f"{name}\n{_vector_report(run, vid)}"
            assert [a.status for a in outcome.answers] == [200] * len(want), f"{name}\n{_vector_report(run, vid)}"


def test_sidecar_upstream_saw_only_whole_tagged_requests(run: Run) -> None:
    upstream = run.upstreams["sidecar"]
    errors = [(c.error, bytes(c.raw[-300:])) for c in upstream.connections if c.error]
    assert not errors, f"the sidecar's upstream could not parse what it was sent: {errors}"
    assert not run.strays["sidecar"], [(s.method, s.url, s.headers) for s in run.strays["sidecar"]]


@pytest.mark.parametrize("vid", _params("lenient"))
def test_not_more_lenient_than_both_peers(run: Run, vid: int) -> None:
    problems = check_not_more_lenient(VECTORS[vid], run.outcomes["sidecar"][vid], run.peers(vid))
    assert not problems, "\n".join([*problems, _vector_report(run, vid)])


@pytest.mark.parametrize("vid", _params("boundaries"))
def test_upstream_sees_the_clients_request_boundaries(run: Run, vid: int) -> None:
    problems = check_boundaries(VECTORS[vid], run.outcomes["sidecar"][vid], run.peers(vid))
    assert not problems, "\n".join([*problems, _vector_report(run, vid)])


@pytest.mark.parametrize("vid", _params("answers"))
def test_each_request_gets_one_answer(run: Run, vid: int) -> None:
    problems = check_answers(VECTORS[vid], run.outcomes["sidecar"][vid])
    assert not problems, "\n".join([*problems, _vector_report(run, vid)])


# ------------------------------------------------------------------ the checks fail on the bugs they are for ----


def _seen(vid: int, kind: str, n: int, method: bytes = b"GET", body: bytes = b"") -> Seen:
    tag = b"v%03d%s%d" % (vid, kind.encode(), n)
    return Seen(method, b"/" + tag, [(b"x-vec", tag)], [], body, True)


def _ok(count: int = 1) -> list[Answer]:
    return [Answer(200, True)] * count


def test_checks_catch_a_body_read_as_a_request() -> None:
    vid = next(i for i, v in enumerate(VECTORS) if v.name == "get_cl_body_smuggle")
    vector = VECTORS[vid]
    honest = Outcome(b"", False, _ok(2), None, [_seen(vid, "r", 0, body=vector.body(vid, 0)), _seen(vid, "r", 1)])
    peers = {"nginx": honest, "haproxy": honest}
    assert not check_boundaries(vector, honest, peers)
    # the GET body ignored: its bytes become a request of their own, the real r0 goes out without a body
    smuggling = Outcome(b"", False, _ok(3), None, [_seen(vid, "r", 0), _seen(vid, "s", 0), _seen(vid, "r", 1)])
    problems = check_boundaries(vector, smuggling, peers)
    assert any("inside a body" in p for p in problems) and any("with body" in p for p in problems)
    assert any("3 answers to 2" in p for p in check_answers(vector, smuggling))


def test_checks_catch_a_swallowed_request_and_a_skipped_one() -> None:
    vid = next(i for i, v in enumerate(VECTORS) if v.name == "cl_dup_differ")
    vector = VECTORS[vid]
    rejected = Outcome(b"", True, [Answer(400, False)], None, [])
    peers = {"nginx": rejected, "haproxy": rejected}
    # the sentinel swallowed into the body (a 6-byte reading would take "hello" and one byte of the next request)
    merged = Outcome(b"", False, _ok(1), None, [_seen(vid, "r", 0, b"POST", b"helloG")])
    assert check_not_more_lenient(vector, merged, peers)
    assert any("with body" in p for p in check_boundaries(vector, merged, peers))
    skipped = Outcome(b"", False, _ok(1), None, [_seen(vid, "r", 1)])
    assert any("not a prefix" in p for p in check_boundaries(vector, skipped, peers))


def test_checks_catch_two_answers_and_none() -> None:
    vector = VECTORS[0]  # one GET
    assert not check_answers(vector, Outcome(b"", False, _ok(1), None, [_seen(0, "r", 0)]))
    assert check_answers(vector, Outcome(b"", False, [*_ok(1), Answer(501, False)], None, [_seen(0, "r", 0)]))
    assert check_answers(vector, Outcome(b"", True, [Answer(400, False)] * 2, None, []))
    assert check_answers(vector, Outcome(b"", True, [], None, []))  # closed without a word
    assert check_answers(vector, Outcome(b"", False, [], None, []))  # still waiting on a complete request
    assert check_answers(vector, Outcome(b"", False, [Answer(400, False)], None, []))  # 400 left open
    assert check_answers(vector, Outcome(b"", False, [], None, [_seen(0, "r", 0)]))  # forwarded, never answered


def test_the_checks_catch_a_real_smuggling_proxy(run: Run) -> None:
    """End to end through sockets and the recorder: a proxy that ignores the body of a GET/OPTIONS/DELETE
    (reading it as the next request) is caught by the boundary and answer checks; its valid traffic is not."""
    names = {"get_cl_body_smuggle", "options_cl_body_smuggle", "delete_cl_body_smuggle", "get+get", "post_cl+get"}
    chosen = [vid for vid, v in enumerate(VECTORS) if v.name in names]
    background = BackgroundLoop()
    upstream = Upstream("naive", free_port())
    port = free_port()

    async def start() -> list[asyncio.AbstractServer]:
        loop = asyncio.get_running_loop()
        return [
            await loop.create_server(lambda: Recorder(upstream), "127.0.0.1", upstream.port),
            await asyncio.start_server(lambda r, w: naive_proxy(r, w, upstream.port), "127.0.0.1", port),
        ]

    async def replay() -> list[tuple[bytes, bool]]:
        return list(await asyncio.gather(*(exchange(port, VECTORS[vid], vid, PATIENCE) for vid in chosen)))

    servers = background.run(start())
    try:
        replies = asyncio.run(replay())
        background.run(asyncio.sleep(0.1))
    finally:
        for server in servers:
            background.loop.call_soon_threadsafe(server.close)
        background.stop()
    per_vector, _ = attribute(upstream, len(VECTORS))
    for vid, (raw, closed) in zip(chosen, replies, strict=True):
        answers, malformed = parse_answers(raw, VECTORS[vid].head_first)
        naive = Outcome(raw, closed, answers, malformed, per_vector[vid])
        problems = check_boundaries(VECTORS[vid], naive, run.peers(vid)) + check_answers(VECTORS[vid], naive)
        if "smuggle" in VECTORS[vid].name:
            assert any("inside a body" in p for p in problems), (VECTORS[vid].name, naive.summary(), problems)
            assert any("answers to 2 request" in p for p in problems), (VECTORS[vid].name, problems)
        else:
            assert not problems, (VECTORS[vid].name, problems)
