"""Keep large buffers in glibc's heap instead of giving them back to the kernel after each use (issue #19).

glibc serves blocks above its mmap threshold with a fresh ``mmap`` and trims the heap's free top above its trim
threshold, so a proxy that reads 1 MiB bodies faults every buffer in page by page (~260 minor faults per 1 MiB
answer) and unmaps it again at free: most of a large answer's time was spent in the kernel. ``tune_malloc`` raises
both thresholds with ``mallopt`` once, first thing in ``sidecar run`` (it applies to allocations after the call;
setting the mmap threshold also switches off glibc's dynamic adjustment of it, which is the point).

The price is memory: the pages of the most buffers ever live at once stay resident (about +40 MiB after 50
connections of 1 MiB answers), free but inside the heap where the trim threshold does not reach them.
``give_back`` returns them with ``malloc_trim(0)`` every ``GIVE_BACK_EVERY`` seconds: a busy sidecar faults
them in again once per period instead of once per answer, an idle one drops back to its idle size.

Left alone: ``SIDECAR_MALLOC=off``; a user's own malloc settings (``GLIBC_TUNABLES`` naming ``glibc.malloc.*``, or
the ``MALLOC_*_`` variables); a C library that is not glibc (musl has no such thresholds).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass

OFF_ENV = "SIDECAR_MALLOC"
OFF_VALUES = frozenset({"off", "0", "false", "no"})

# Blocks up to 32 MiB (glibc's own ceiling for its dynamic threshold on 64-bit) come from the heap, and up to
# 128 MiB of free heap top is kept; the heap still shrinks below that.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20

GIVE_BACK_EVERY = 30.0  # seconds between malloc_trim(0) calls while tuned

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# glibc's environment aliases of the malloc tunables (a user who sets one has chosen).
USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _users_own(environ: Mapping[str, str]) -> str | None:
    """The user's own malloc setting, if any: then the sidecar changes nothing."""
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return next((name for name in USER_MALLOC_ENV if name in environ), None)


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # no such name on this platform (musl, macOS)
        return False


@dataclass(frozen=True)
class Tuning:
    applied: bool  # the thresholds were raised (then ``give_back`` should run)
    note: str  # one line for the start-up log


def tune_malloc(environ: Mapping[str, str]) -> Tuning:
    """Raise glibc's mmap and trim thresholds unless told not to."""
    if environ.get(OFF_ENV, "").strip().lower() in OFF_VALUES:
        return Tuning(False, f"malloc: glibc defaults kept ({OFF_ENV}={environ[OFF_ENV]})")
    if (own := _users_own(environ)) is not None:
        return Tuning(False, f"malloc: left as {own} sets it")
    if not _glibc():
        return Tuning(False, "malloc: not glibc, left alone")
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 when it refuses a value.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return Tuning(False, "malloc: glibc refused the thresholds, defaults kept")
    return Tuning(
        True,
        f"malloc: mmap_threshold={MMAP_THRESHOLD}, trim_threshold={TRIM_THRESHOLD}, free pages given back every "
        f"{GIVE_BACK_EVERY:g}s ({OFF_ENV}=off keeps glibc's defaults)",
    )


async def give_back(every: float = GIVE_BACK_EVERY) -> None:
    """Return the heap's free pages to the kernel every ``every`` seconds, until cancelled (glibc only).

    One call takes well under a millisecond with little to return and ~15 ms for 50 MiB, on the loop: rare
    enough to be cheaper than a thread hop and a lock.
    """
    malloc_trim = ctypes.CDLL(None).malloc_trim
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    while True:
        await asyncio.sleep(every)
        malloc_trim(0)
