"""The thread policy: how many cores each model computation uses, and how many run at once.

Measured on a 2-core machine with one CPU-bound neighbour (`python -m benchmarks.conditions`):
torch's default OpenMP threads spin-wait at every barrier for a core the neighbour holds, and a
MobileNetV2 forward pass goes from about 28 ms to over 1 s. So:

- OpenMP waits passively (`OMP_WAIT_POLICY=PASSIVE`): a waiting thread sleeps instead of spinning.
  OpenMP reads this once, when torch loads it, so `core/__init__.py` sets it (unless the user did)
  before any module of the project imports torch.
- Concurrent requests (Streamlit sessions, API requests, the study runner) do not each ask for every
  core: a bounded number of model computations run at once (`slot`), each on its share of the
  cores (intra-op threads set per computation thread: OpenMP keeps the count per thread). One
  computation alone gets every core, so the idle latency stays what it was.
- Inter-op parallelism is not used by these models; one inter-op thread keeps the pool small.

Every setting can be overridden by the environment (read once, `policy()`):

| variable | default | meaning |
|---|---|---|
| `SECONDLOOK_THREADS` | the cores this process may use | intra-op threads of one computation alone |
| `SECONDLOOK_CONCURRENCY` | the same number | model computations at once (more wait in line) |
| `SECONDLOOK_INTEROP_THREADS` | 1 | torch inter-op threads |
| `OMP_WAIT_POLICY` | PASSIVE | OpenMP's wait policy (read when torch loads) |

Once no computation has run for a second, the allocator's free pages go back to the system
(`core.allocator.release_free_memory`): a serving process then holds what it uses, not what its
busiest moment needed (`python -m benchmarks.memory --server`, `python -m benchmarks.load`).

Training is alone by design and uses every core it is given (`core.lab.train` calls `configure("train")`
in a single-process run; under torchrun each rank keeps the launcher's OMP_NUM_THREADS), with the same
variables exposed. Run it as a background job with `train/run_all.py`, which also lowers its
scheduler autogroup so that `nice` takes effect beside an interactive session.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from core import allocator

logger = logging.getLogger(__name__)

ENV_THREADS = "SECONDLOOK_THREADS"
ENV_CONCURRENCY = "SECONDLOOK_CONCURRENCY"
ENV_INTEROP = "SECONDLOOK_INTEROP_THREADS"
RELEASE_AFTER_S = 1.0  # idle time before freed memory goes back to the system (see `_Slots`)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system says, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be at least 1, got {number}")
    return number


@dataclass(frozen=True)
class ThreadPolicy:
    """How model computations share the cores.

    Attributes:
        threads: Intra-op threads of one computation running alone.
        concurrency: Computations allowed at once; further ones wait for a slot.
        interop: torch inter-op threads.
        wait_policy: OpenMP wait policy in force ("PASSIVE" or "ACTIVE"; as set when torch loaded).
    """

    threads: int
    concurrency: int
    interop: int
    wait_policy: str

    def threads_for(self, running: int) -> int:
        """Intra-op threads for a computation that starts while `running` computations (itself included) run."""
        return max(1, self.threads // max(1, running))


@lru_cache(maxsize=1)
def policy() -> ThreadPolicy:
    """The process's policy, from the environment (read once).

    Raises:
        ValueError: If a variable is not a positive whole number.
    """
    cores = available_cores()
    threads = _env_int(ENV_THREADS, cores)
    return ThreadPolicy(threads=threads, concurrency=_env_int(ENV_CONCURRENCY, threads),
                        interop=_env_int(ENV_INTEROP, 1), wait_policy=os.environ.get("OMP_WAIT_POLICY", "ACTIVE").upper())


_configured: set[str] = set()
_lock = threading.Lock()


def configure(role: str = "serve") -> ThreadPolicy:
    """Apply the policy to torch once per process: intra-op and inter-op threads.

    Args:
        role: "serve" (the app, the API, the command lines: computations share the cores through
            `slot`) or "train" (alone: every core, no slots).

    Returns:
        The policy in force.
    """
    if role not in ("serve", "train"):
        raise ValueError(f"unknown role {role!r}; one of serve, train")
    import torch

    chosen = policy()
    with _lock:
        if role not in _configured:
            torch.set_num_threads(chosen.threads)
            try:
                torch.set_num_interop_threads(chosen.interop)
            except RuntimeError:  # only allowed before the first parallel work; keep what is set
                pass
            _configured.add(role)
            logger.info("thread policy (%s): %s", role, chosen)
    return chosen


class _Slots:
    """A counting gate in front of model computations that also knows how many are running.

    Once none has run for `RELEASE_AFTER_S`, the allocator's free pages go back to the system: not
    at every pause (a page's prediction, heatmap and faithfulness come a few milliseconds apart,
    and memory handed back is faulted in again by the next computation).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.running = 0
        self._release: threading.Timer | None = None

    @contextmanager
    def acquire(self, limit: int) -> Iterator[int]:
        with self._condition:
            while self.running >= limit:
                self._condition.wait()
            self.running += 1
            running = self.running
            if self._release is not None:
                self._release.cancel()
                self._release = None
        try:
            yield running
        finally:
            with self._condition:
                self.running -= 1
                if self.running == 0:
                    self._release = threading.Timer(RELEASE_AFTER_S, self._release_if_idle)
                    self._release.daemon = True
                    self._release.start()
                self._condition.notify()

    def _release_if_idle(self) -> None:
        with self._condition:
            if self.running:
                return
            self._release = None
        allocator.release_free_memory()


_SLOTS = _Slots()


@contextmanager
def slot() -> Iterator[int]:
    """Hold one of the policy's computation slots; inside it, torch uses this computation's share of the cores.

    The intra-op thread count is set on the calling thread (OpenMP keeps it per thread), to the
    policy's threads divided by the computations running when this one starts.

    Yields:
        The intra-op threads this computation uses.
    """
    import torch

    chosen = configure("serve")
    with _SLOTS.acquire(chosen.concurrency) as running:
        threads = chosen.threads_for(running)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        yield threads
