"""The C allocator of a serving process: freed heap handed back to the system.

glibc's malloc keeps freed memory in its arenas (one per thread that allocated, up to 8 per
core) for reuse. A Streamlit server runs every page run in a thread of its own, and every model
computation allocates and frees tens of MB (activations, gradients, the ROAD imputer's sparse
system), so the server's resident set grew by what each arena had once held, not by what it
holds. `release_free_memory` calls glibc's `malloc_trim(0)`, which returns the free pages of
every arena; `core.threads` calls it once no model computation has run for a second.

Measured with `python -m benchmarks.memory --server` (one result per task page) and
`python -m benchmarks.load --sessions 10 --seconds 20`. Limiting the arenas as well
(`MALLOC_ARENA_MAX=2`) saved 10 MB more for one session but held 0.8 GB more and was slower
with ten, so it is not done.

Does nothing where the C library is not glibc (macOS, musl): only memory is at stake.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the system. True when some memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
