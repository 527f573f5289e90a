"""``sidecar run`` keeps large buffers in glibc's heap (issue #19), and leaves malloc alone when told to.

Checked by behaviour, not by reading settings back: minor page faults (/proc/PID/stat) while 1 MiB buffers are
allocated and freed. glibc's defaults give each such buffer back to the kernel and fault it in again (~256
faults per MiB); with the raised thresholds the pages stay mapped.
"""

from __future__ import annotations

import http.client
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.allocator import OFF_ENV, Tuning, tune_malloc
from tests.support.sidecar import policy_listen, sidecar_process, write_policy

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
    reason="glibc's malloc and /proc",
)

# Allocates and frees 8 live 1 MiB buffers at a time (as 8 connections would), after tune_malloc when asked;
# prints what tune_malloc said and the minor faults per buffer.
PROBE = """
import os, sys
from proxy.allocator import tune_malloc

def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

note = tune_malloc(os.environ).note
before = faults()
for _ in range(40):
    buffers = [b"x" * (1 << 20) for _ in range(8)]
    del buffers
print(note)
print((faults() - before) / 320)
"""


def probe(env: dict[str, str]) -> tuple[str, float]:
    clean = {
        k: v for k, v in os.environ.items() if k not in (OFF_ENV, "GLIBC_TUNABLES") and not k.startswith("MALLOC_")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=60, check=True
    )
    note, per_buffer = out.stdout.strip().splitlines()
    return note, float(per_buffer)


def test_raised_thresholds_keep_freed_buffers_mapped() -> None:
    note, per_buffer = probe({})
    assert note.startswith("malloc: mmap_threshold=33554432, trim_threshold=134217728")
    assert per_buffer < 30  # the first round's pages, spread over all 40 rounds


@pytest.mark.parametrize("value", ["off", "0", "OFF"])
def test_off_switch_keeps_glibc_defaults(value: str) -> None:
    note, per_buffer = probe({OFF_ENV: value})
    assert note == f"malloc: glibc defaults kept ({OFF_ENV}={value})"
    assert per_buffer > 150  # every buffer faulted in again


@pytest.mark.parametrize(
    ("env", "who"),
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, "GLIBC_TUNABLES"),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "MALLOC_MMAP_THRESHOLD_"),
    ],
)
def test_users_own_malloc_settings_win(env: dict[str, str], who: str) -> None:
    # The user pinned a 128 KiB threshold: had the sidecar raised it, the buffers would stay mapped.
    note, per_buffer = probe(env)
    assert note == f"malloc: left as {who} sets it"
    assert per_buffer > 150


def test_tunables_for_something_else_do_not_count_as_a_malloc_choice() -> None:
    note, _ = probe({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"})
    assert note.startswith("malloc: mmap_threshold=")


# 50 live 1 MiB buffers with small objects allocated after them (as a busy listener would), all freed; then
# give_back runs for a few periods. Prints RSS in MiB: after the burst, after give_back.
GIVE_BACK_PROBE = """
import asyncio, os
from proxy.allocator import give_back, tune_malloc

def rss():
    return int([line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]) // 1024

assert tune_malloc(os.environ).applied
keep = []
for _ in range(10):
    buffers = [b"x" * (1 << 20) for _ in range(50)]
    keep.append([bytes(600) for _ in range(100)])
    del buffers
print(rss())

async def main():
    task = asyncio.get_running_loop().create_task(give_back(every=0.05))
    await asyncio.sleep(0.3)
    task.cancel()

asyncio.run(main())
print(rss())
"""


def test_give_back_returns_the_free_pages_the_thresholds_keep() -> None:
    clean = {
        k: v for k, v in os.environ.items() if k not in (OFF_ENV, "GLIBC_TUNABLES") and not k.startswith("MALLOC_")
    }
    out = subprocess.run(
        [sys.executable, "-c", GIVE_BACK_PROBE], env=clean, capture_output=True, text=True, timeout=60, check=True
    )
    after_burst, after_give_back = (int(line) for line in out.stdout.split())
    assert after_burst - after_give_back > 35, (after_burst, after_give_back)  # most of the 50 MiB


def test_not_glibc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_name(name: str) -> str | None:
        raise ValueError(f"unrecognized configuration name: {name}")  # what musl's and macOS's Pythons say

    monkeypatch.setattr(os, "confstr", no_such_name)
    assert tune_malloc({}) == Tuning(False, "malloc: not glibc, left alone")


class _Big(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"m" * MiB

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def big_upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _fetch(host: str, port: int, count: int) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(count):
            conn.request("GET", "/big")
            response = conn.getresponse()
            assert response.status == 200, (response.status, response.getheaders())
            assert len(response.read()) == MiB
    finally:
        conn.close()
    return count


def faults_per_answer(tmp_path: Path, upstream: str, env: dict[str, str]) -> tuple[float, str]:
    """Minor faults of a real ``sidecar run`` per 1 MiB answer, 8 connections at once; and its log."""
    # Generous timeouts: a shared test machine may be slow to move 8 MiB at once through a threaded upstream.
    timeouts = {"timeouts": {"connect": "2s", "per_try": "20s", "total": "30s"}}
    policy = write_policy(tmp_path / "policy.yaml", {"big": {"targets": [upstream]}}, defaults=timeouts)
    clean = {OFF_ENV: "", "GLIBC_TUNABLES": "", **env}
    with sidecar_process(policy, "--log-level", "debug", env=clean) as sidecar:
        host, port = policy_listen(policy, "big")
        _fetch(host, port, 2)  # warm: pools, first buffers
        before = _minor_faults(sidecar.proc.pid)
        with ThreadPoolExecutor(8) as pool:
            answers = sum(pool.map(lambda _: _fetch(host, port, 6), range(8)))
        return (_minor_faults(sidecar.proc.pid) - before) / answers, sidecar.log()


def test_sidecar_run_applies_it_and_the_off_switch_works(tmp_path: Path, big_upstream: str) -> None:
    tuned, log = faults_per_answer(tmp_path, big_upstream, {})
    assert "malloc: mmap_threshold=33554432" in log
    off, log = faults_per_answer(tmp_path, big_upstream, {OFF_ENV: "off"})
    assert f"malloc: glibc defaults kept ({OFF_ENV}=off)" in log
    assert off > 100, off  # glibc's defaults: ~1 MiB faulted in per answer
    assert tuned < off / 4, (tuned, off)
