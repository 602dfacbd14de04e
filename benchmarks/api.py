"""HTTP API benchmark: latency and throughput of predict and predict + heatmap under concurrent clients.

    python -m benchmarks.api                       # uvicorn 1 and 2 workers, Ray Serve 1 and 2 replicas (about 5 min)
    python -m benchmarks.api --quick --no-ray      # a smoke run, not figures

Every configuration runs on the same cores: uvicorn with one worker (the thread policy's
default: every core), uvicorn with two workers (one thread each), Ray Serve with one replica
(2 CPUs) and with two replicas (1 CPU each) on a local Ray given 2 CPUs. Each is started by the
benchmark, warmed up, and given predict and predict + heatmap (`?heatmap=gradcam`: Grad-CAM,
its ROAD faithfulness and the overlay PNG) requests from 1, 4 and 16 concurrent clients
(asyncio + httpx in this process), every request a different file (synthetic 512 x 512 head-CT
slices, PNG and DICOM in turn, which the head_ct model reads as in range; or the files of
`--images`). Printed per row: p50 / p95 latency, requests per second, errors (any answer but
200), and the server's peak resident memory. Beside them: the in-process per-image time of
`python -m core.predict` (`core.pipeline.predict_uploads`, batches of 16) and of one `analyse`
call, measured in this process on the same files.

Targets on 2 cores: predict p50 <= 40 ms at 1 client; at 16 clients the time per image
(1 / throughput) <= 2x the command line's per-image time and p95 <= 1 s; zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.memory import status_mb
from benchmarks.samples import ct_dicom, encode, synthetic_slice
from benchmarks.server import REPO, free_port, stop

CLIENTS = (1, 4, 16)
TARGETS = {"predict_p50_ms_1": 40.0, "per_image_ratio_16": 2.0, "predict_p95_ms_16": 1000.0}


@dataclass
class Running:
    """A started API: its base URL and the process ids whose memory counts."""

    url: str
    pids: list[int]
    label: str


def children(pid: int) -> list[int]:
    """Direct child processes of a process (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def processes_named(text: str) -> list[int]:
    """Process ids whose command line contains `text` (Ray names a replica's process after it)."""
    found = []
    for folder in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (folder / "cmdline").read_bytes():
                found.append(int(folder.name))
        except OSError:
            continue
    return found


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None, answering: int = 1) -> None:
    """Poll /readyz (a new connection each time) until `answering` different workers have answered 200.

    Raises:
        RuntimeError: If the process exits or the API is not ready in time.
    """
    deadline = time.monotonic() + timeout
    ready: set[str] = set()
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the API server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    ready.add(response.headers.get("x-secondlook-replica", ""))
                    if len(ready) >= answering:
                        return
                    time.sleep(0.02)
                    continue
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API was not ready within {timeout:.0f} s ({len(ready)} of {answering} workers ready)")


@contextlib.contextmanager
def uvicorn_server(models: str, workers: int = 1, env: dict[str, str] | None = None,
                   timeout: float = 180.0) -> Iterator[Running]:
    """`python -m api` on 127.0.0.1 and a free port, ready (models loaded); stopped on exit."""
    port = free_port()
    environment = {**os.environ, "SECONDLOOK_API_MODELS": models, **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "api", "--port", str(port), "--workers", str(workers),
                                "--log-level", "warning"], cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout, process, answering=workers)
        workers_pids = [pid for pid in children(process.pid) if b"resource_tracker" not in command_line(pid)]
        pids = [process.pid, *workers_pids]
        yield Running(url, pids, f"uvicorn, {workers} worker{'s' if workers > 1 else ''}")
    finally:
        stop(process, grace=30)


@contextlib.contextmanager
def ray_server(models: str, replicas: int, cpus: int, ray_cpus: int = 2, timeout: float = 300.0) -> Iterator[Running]:
    """A local Ray (`ray_cpus` CPUs) serving `api.serve` with a fixed number of replicas; shut down on exit.

    Raises:
        RuntimeError: If Ray or the deployment cannot start (the message says why).
    """
    import ray
    from ray import serve

    from api.serve import DEPLOYMENT, build

    port = free_port()
    ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"models": models, "replicas": str(replicas), "cpus": str(cpus)}), name="secondlook",
                  route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout)
        pids = processes_named(f"ServeReplica:secondlook:{DEPLOYMENT}")
        yield Running(url, pids, f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''} x {cpus} CPU")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def sample_files(count: int, images: Path | None = None) -> list[tuple[str, bytes]]:
    """`count` different files: the files of a folder in turn, or synthetic head-CT-like PNG and DICOM slices."""
    if images is not None:
        paths = sorted(p for p in images.rglob("*") if p.is_file())
        if not paths:
            raise SystemExit(f"no files under {images}")
        return [(p.name, p.read_bytes()) for p in itertools.islice(itertools.cycle(paths), count)]
    return [(f"scan{i}.png", encode(synthetic_slice(512, seed=i))) if i % 2 == 0 else
            (f"slice{i}.dcm", ct_dicom(512, seed=i)) for i in range(count)]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def load(url: str, path: str, files: list[tuple[str, bytes]], clients: int, requests: int,
               headers: dict[str, str] | None = None) -> dict:
    """`requests` POSTs of `path` by `clients` concurrent clients, each file in turn; latency and throughput."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    counter = itertools.count()

    async def client(session: httpx.AsyncClient) -> None:
        while (i := next(counter)) < requests:
            name, data = files[i % len(files)]
            started = time.perf_counter()
            try:
                response = await session.post(url + path, files={"file": (name, data)}, headers=headers)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:120]}")
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "requests": requests, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * quantile(latencies, 0.95), "per_s": requests / wall, "errors": errors}


def in_process(key: str, files: list[tuple[str, bytes]]) -> tuple[dict, set[str]]:
    """Per-image time of the command line's path (batched) and of one `analyse` call, in this process; and the
    names of the files the model answers (status ok: neither the reader nor the guard refused them)."""
    from core import threads
    from core.models import load_model
    from core.pipeline import analyse, predict_uploads, result_row
    from core.tasks import get_task

    threads.configure("serve")
    classifier = load_model(get_task(key))
    list(predict_uploads(classifier, files[:16]))  # warm-up
    started = time.perf_counter()
    rows = list(predict_uploads(classifier, files))
    cli = (time.perf_counter() - started) / len(rows)
    accepted = {name for name, outcome in rows if result_row(name, outcome)["status"] == "ok"}
    single = []
    for name, data in files[:40]:
        started = time.perf_counter()
        analyse(classifier, data, name)
        single.append(time.perf_counter() - started)
    return {"cli_ms_per_image": 1000 * cli, "analyse_p50_ms": 1000 * statistics.median(single)}, accepted


def bench(running: Running, key: str, files: list[tuple[str, bytes]], quick: bool) -> list[dict]:
    """Every (operation, clients) row for one running configuration."""
    rows = []
    asyncio.run(load(running.url, f"/v1/predict/{key}?heatmap=gradcam", files, 2, 8))  # warm-up, replicas included
    for operation, query, per_client, least in (("predict", "", 10, 40), ("predict+heatmap", "?heatmap=gradcam", 3, 12)):
        for clients in CLIENTS:
            requests = max(least, per_client * clients) // (4 if quick else 1)
            print(f"  {running.label}: {operation}, {clients} clients, {requests} requests", file=sys.stderr, flush=True)
            figures = asyncio.run(load(running.url, f"/v1/predict/{key}{query}", files, clients, requests))
            rows.append({"config": running.label, "operation": operation, **figures})
    peak = 0.0
    for pid in running.pids:
        with contextlib.suppress(OSError, KeyError):
            peak += status_mb("VmHWM", pid)
    for row in rows:
        row["server_peak_mb"] = peak
    return rows


def report(rows: list[dict], reference: dict) -> str:
    lines = [f"in-process: python -m core.predict {reference['cli_ms_per_image']:.1f} ms per image (batches of 16); "
             f"one analyse() call p50 {reference['analyse_p50_ms']:.1f} ms",
             "",
             "| configuration | request | clients | p50 ms | p95 ms | req/s | ms per image | vs CLI | errors | server peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        per_image = 1000 / row["per_s"] if row["per_s"] else float("nan")
        lines.append(f"| {row['config']} | {row['operation']} | {row['clients']} | {row['p50_ms']:.0f} | "
                     f"{row['p95_ms']:.0f} | {row['per_s']:.1f} | {per_image:.1f} | "
                     f"{per_image / reference['cli_ms_per_image']:.1f}x | {len(row['errors'])} | "
                     f"{row['server_peak_mb']:.0f} |")
    for row in rows:
        for error in row["errors"][:3]:
            lines.append(f"  error ({row['config']}, {row['operation']}, {row['clients']} clients): {error}")
    return "\n".join(lines)


def check_targets(rows: list[dict], reference: dict) -> list[str]:
    """Targets missed, in words (empty: all met)."""
    missed = []
    for row in rows:
        where = f"{row['config']}, {row['operation']}, {row['clients']} clients"
        if row["errors"]:
            missed.append(f"{where}: {len(row['errors'])} errors")
        if row["operation"] != "predict":
            continue
        if row["clients"] == 1 and row["p50_ms"] > TARGETS["predict_p50_ms_1"]:
            missed.append(f"{where}: p50 {row['p50_ms']:.0f} ms > {TARGETS['predict_p50_ms_1']:.0f} ms")
        if row["clients"] == 16:
            ratio = 1000 / row["per_s"] / reference["cli_ms_per_image"]
            if ratio > TARGETS["per_image_ratio_16"]:
                missed.append(f"{where}: {ratio:.1f}x the command line's per-image time")
            if row["p95_ms"] > TARGETS["predict_p95_ms_16"]:
                missed.append(f"{where}: p95 {row['p95_ms']:.0f} ms > {TARGETS['predict_p95_ms_16']:.0f} ms")
    return missed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Latency and throughput of the HTTP API (uvicorn and Ray Serve).")
    parser.add_argument("--model", default="head_ct", help="registry key (default head_ct: reads the synthetic "
                                                             "slices as in range)")
    parser.add_argument("--images", type=Path, default=None, help="upload these files in turn (default: synthetic)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests: a smoke run, not figures")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve configurations")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    files = sample_files(64, args.images)
    print("in-process reference...", file=sys.stderr, flush=True)
    reference, accepted = in_process(args.model, files)
    # Only files the model answers (in process) are sent, so that "errors" counts failures, not refusals:
    # the guard refuses some synthetic slices, and a refusal is the right answer for them.
    refused = [name for name, _ in files if name not in accepted]
    files = [(name, data) for name, data in files if name in accepted]
    if refused:
        print(f"{len(refused)} of {len(refused) + len(files)} files are not answered in process (guard or reader); "
              f"left out: {', '.join(refused[:8])}{' ...' if len(refused) > 8 else ''}")
    if not files:
        raise SystemExit("no file is answered by the model in process; nothing to benchmark")
    rows: list[dict] = []
    configurations = [lambda: uvicorn_server(args.model, 1), lambda: uvicorn_server(args.model, 2)]
    if not args.no_ray:
        configurations += [lambda: ray_server(args.model, 1, 2), lambda: ray_server(args.model, 2, 1)]
    load_before = os.getloadavg()
    for start in configurations:
        with start() as running:
            rows += bench(running, args.model, files, args.quick)
    print("in-process reference again...", file=sys.stderr, flush=True)
    again, _ = in_process(args.model, files)
    load_after = os.getloadavg()
    # the stricter of the two: the lower per-image time of the command line
    reference = {key: min(reference[key], again[key]) for key in reference}
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; the command line measured "
          f"before and after the servers, the lower figure kept")
    print(report(rows, reference))
    missed = check_targets(rows, reference)
    for line in missed:
        print(f"target missed: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
