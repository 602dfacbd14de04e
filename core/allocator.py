"""The C allocator of a serving process: fewer malloc arenas, and freed heap handed back to the system.

glibc's malloc gives each new thread its own arena (up to 8 per core) and keeps freed memory
in them for reuse. A Streamlit server runs every page run in a thread of its own and every
model computation allocates and frees tens of MB (activations, gradients, the ROAD imputer's
sparse system), so the server's resident set grew by what each arena had once held, not by
what it holds (`python -m benchmarks.memory --server`). Two calls of glibc, through ctypes:

- `limit_arenas`: `mallopt(M_ARENA_MAX, n)` before the server's threads make their arenas
  (the `MALLOC_ARENA_MAX` environment variable does the same before the process starts).
- `release_free_memory`: `malloc_trim(0)`, which returns the free pages of every arena.

Both do nothing where the C library is not glibc (macOS, musl): only memory is at stake.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from glibc's malloc.h


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.malloc_trim
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(count: int) -> bool:
    """Allow at most `count` malloc arenas from now on (arenas made before stay). True where applied."""
    libc = _glibc()
    if libc is None or count < 1:
        return False
    applied = bool(libc.mallopt(_M_ARENA_MAX, count))
    logger.info("malloc arenas limited to %d: %s", count, applied)
    return applied


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the system. True when some memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
