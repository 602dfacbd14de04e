"""Load test: many concurrent browser-less sessions against a local app server.

    python -m benchmarks.load --sessions 10 --seconds 60
    python -m benchmarks.load --sessions 10 --seconds 60 --images ../shared/data/brain_mri/train/glioma

Each session speaks Streamlit's websocket protocol (`benchmarks.session`): it opens the page,
then, until the time is up, uploads a new scan (PNG and DICOM in turn, every one different,
so nothing is served from a session's cache), waits for the prediction and the heatmap image,
and starts again. Synthetic scans are flagged by the wrong-input guard, so a session then ticks
"show anyway", as a reader would, and the time to result includes that step. Prints p50/p95
of the time until the heatmap is on screen and until the page has finished (its last work is
the heatmap's ROAD faithfulness line), results per second and every error; exits 1 if any
session saw an error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.proc import status_mb
from benchmarks.samples import ct_dicom, encode, synthetic_slice
from benchmarks.server import serve
from benchmarks.session import AppSession, RunResult, SessionError

RESULT_TEXT = "Model output:"
FLAGGED_TEXT = "Not classified"
OVERRIDE_LABEL = "Show the model's output anyway"


def uploads(images: Path | None, start: int) -> Iterator[tuple[str, bytes]]:
    """Endless (name, bytes): files of a folder in turn, or synthetic PNG and DICOM scans, each different."""
    if images is not None:
        files = sorted(p for p in images.rglob("*") if p.is_file())
        if not files:
            raise SystemExit(f"no files under {images}")
        return ((p.name, p.read_bytes()) for p in itertools.islice(itertools.cycle(files), start, None))
    return ((f"scan{i}.png", encode(synthetic_slice(512, seed=i))) if i % 2 == 0 else (f"slice{i}.dcm", ct_dicom(512, seed=i))
            for i in itertools.count(start))


async def one_result(session: AppSession, page: str, uploader: str, name: str, data: bytes) -> tuple[float, float]:
    """Upload one scan and wait until the page has finished (the heatmap's faithfulness line is its
    last work); returns the seconds until the heatmap was on screen and until the page finished."""
    started = time.monotonic()
    result: RunResult = await session.upload(page, name, data, uploader)
    if not result.says(RESULT_TEXT) and result.says(FLAGGED_TEXT):
        override = next((i for label, i in result.widgets.items() if label.startswith(OVERRIDE_LABEL)), None)
        if override is None:
            raise SessionError("flagged scan without the 'show anyway' box")
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        result = await session.run(page, [session.last_upload_state, WidgetState(id=override, bool_value=True)])
    if result.exceptions:
        raise SessionError("; ".join(result.exceptions))
    if not result.says(RESULT_TEXT):
        raise SessionError(f"no result for {name}: " + " | ".join(t[:80] for t in result.texts[-3:]))
    if len(result.image_urls) + len(result.inline_images) < 2:
        raise SessionError(f"no heatmap for {name}")
    finished = time.monotonic()
    return (result.heatmap_at or finished) - started, finished - started


async def run_session(url: str, page: str, index: int, seconds: float, images: Path | None,
                      times: list[tuple[float, float]], errors: list[str]) -> None:
    source = uploads(images, start=index * 1000)
    try:
        async with AppSession(url) as session:
            opened = await session.run(page)
            if not opened.uploader_ids:
                raise SessionError(f"page {page!r} shows no file uploader")
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                name, data = next(source)
                times.append(await one_result(session, page, opened.uploader_ids[0], name, data))
    except Exception as exc:  # noqa: BLE001 - any failure (protocol, network, app error) is a reported error
        errors.append(f"session {index}: {type(exc).__name__}: {exc}")


async def load(url: str, page: str, sessions: int, seconds: float, images: Path | None) -> dict:
    """Run the sessions concurrently; return the figures."""
    times: list[tuple[float, float]] = []
    errors: list[str] = []
    started = time.monotonic()
    await asyncio.gather(*(run_session(url, page, i, seconds, images, times, errors) for i in range(sessions)))
    wall = time.monotonic() - started

    def quantiles(values: list[float]) -> tuple[float, float]:
        ordered = sorted(values)
        if not ordered:
            return float("nan"), float("nan")
        return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]

    heatmap_p50, heatmap_p95 = quantiles([t[0] for t in times])
    p50, p95 = quantiles([t[1] for t in times])
    return {"sessions": sessions, "seconds": round(wall, 1), "results": len(times), "errors": errors,
            "heatmap_p50_s": heatmap_p50, "heatmap_p95_s": heatmap_p95, "p50_s": p50, "p95_s": p95,
            "results_per_s": len(times) / wall if wall else 0.0}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Concurrent sessions against the app (Streamlit websocket protocol).")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each session keeps uploading")
    parser.add_argument("--page", default="brain-mri", help="page URL path")
    parser.add_argument("--images", type=Path, default=None, help="upload these files in turn (default: synthetic scans)")
    parser.add_argument("--url", default=None, help="an already running app (default: start one)")
    return parser


def server_memory(pid: int) -> dict:
    """The server's resident memory now and at its peak, in MB (Linux /proc)."""
    return {"server_rss_mb": status_mb("VmRSS", pid), "server_peak_mb": status_mb("VmHWM", pid)}


def report(figures: dict) -> str:
    lines = [f"load test: {figures['sessions']} concurrent sessions for {figures['seconds']} s: "
             f"{figures['results']} results ({figures['results_per_s']:.2f}/s), "
             f"heatmap on screen p50 {figures['heatmap_p50_s']:.2f} s, p95 {figures['heatmap_p95_s']:.2f} s; "
             f"page finished (faithfulness line included) p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s; "
             f"errors {len(figures['errors'])}"]
    if figures.get("server_peak_mb"):
        lines.append(f"  server memory: {figures['server_rss_mb']:.0f} MB resident 2 s after the run, peak "
                     f"{figures['server_peak_mb']:.0f} MB")
    lines += [f"  error: {e}" for e in figures["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.url:
        figures = asyncio.run(load(args.url, args.page, args.sessions, args.seconds, args.images))
    else:
        with serve() as server:
            figures = asyncio.run(load(server.url, args.page, args.sessions, args.seconds, args.images))
            time.sleep(2.0)  # the server hands freed memory back once idle for a second (core.threads)
            figures.update(server_memory(server.process.pid))
    print(report(figures))
    return 1 if figures["errors"] or not figures["results"] else 0


if __name__ == "__main__":
    sys.exit(main())
