"""Start the app's Streamlit server on a free local port, for the benchmarks and the browser tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """A running app server: its URL, process, and when it was spawned (time.monotonic)."""

    url: str
    process: subprocess.Popen
    spawned: float
    healthy_after: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll /_stcore/health every 50 ms until it answers 200.

    Raises:
        RuntimeError: If the process exits or the server does not answer in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the app server did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def serve(timeout: float = 60.0, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run `streamlit run app.py` headless on 127.0.0.1 and a free port; stop it on exit."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    spawned = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout)
        yield Server(url, process, spawned, time.monotonic() - spawned)
    finally:
        stop(process, grace=20)


def stop(process: subprocess.Popen, grace: float) -> None:
    """End a child server: ask it to stop, and kill it if it has not within `grace` seconds.

    Args:
        process: The child (already ended is fine: then nothing is sent).
        grace: Seconds it may take to shut down cleanly.
    """
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)  # reaped, so no zombie outlives the run
