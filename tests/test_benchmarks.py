"""The benchmark command runs and prints its figures; ten concurrent sessions get results without errors.

Timings are not asserted here (a loaded CI machine is not a benchmark); `python -m benchmarks`
prints them against the targets, and the README records a run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.load import load
from benchmarks.server import serve
from core.tasks import TASKS
from tests.conftest import REPO


def test_benchmark_command_prints_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--models", "ct_covid", "--no-server",
                             "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "| ct_covid |" in text and "| baseline ResNet-50 |" in text
    assert f"peak resident memory, {len(TASKS)} models" in text and "targets: predict p50 <= 40 ms" in text
    figures = json.loads(out.read_text())
    model = figures["models"]["ct_covid"]
    assert set(model["cam_ms"]) == {"Grad-CAM", "Grad-CAM++", "HiResCAM", "XGradCAM", "LayerCAM", "EigenCAM"}
    assert model["throughput_model"] > 0 and model["throughput_files"] > 0
    assert 0 < model["predict_png_ms"][0] <= model["predict_png_ms"][1]
    assert figures["memory"]["peak_rss_mb"] >= max(figures["memory"]["stages_mb"].values()) - 1


def test_ten_concurrent_sessions_get_results_without_errors() -> None:
    """Ten websocket sessions upload PNG and DICOM scans at once; every one gets a prediction and a heatmap."""
    with serve(timeout=90) as server:
        figures = asyncio.run(load(server.url, "brain-mri", sessions=10, seconds=5, images=None))
    assert figures["errors"] == []
    assert figures["results"] >= 10  # each session finished at least one upload -> result
    assert figures["p50_s"] <= figures["p95_s"]
    assert figures["heatmap_p50_s"] <= figures["p50_s"]  # the heatmap shows before the page's last work ends


def test_conditions_benchmark_measures_ours_and_the_baseline_idle_and_beside_a_neighbour(tmp_path: Path) -> None:
    """`python -m benchmarks.conditions`: each subject in its own process, idle and beside a busy process the benchmark
    starts and stops; the neighbour is gone afterwards. (Timings are not asserted: a smoke run.)"""
    import os
    import signal

    env = {**os.environ, "SECONDLOOK_BENCH_MIN_CALLS": "2", "SECONDLOOK_BENCH_BATCH": "2"}
    before = set(os.listdir("/proc"))
    runs = {}
    for name, extra in (("idle", ["--conditions", "idle"]), ("busy", ["--conditions", "neighbour", "--no-baseline"])):
        out = tmp_path / f"{name}.json"
        result = subprocess.run([sys.executable, "-m", "benchmarks.conditions", "--models", "ct_covid", "--seconds", "0.3",
                                 *extra, "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600,
                                env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (json.loads(out.read_text())["conditions"], result.stdout)
    idle, busy = runs["idle"][0]["idle"], runs["busy"][0]["neighbour"]
    for f in (idle["ct_covid"], idle["baseline"], busy["ct_covid"]):
        assert 0 < f["predict_ms"][0] <= f["predict_ms"][1] and 0 < f["cam_ms"][1] and f["throughput"] > 0
    assert "baseline" not in busy
    assert idle["ct_covid"]["wait_policy"] == "PASSIVE" and idle["baseline"]["wait_policy"] == "default"
    assert "| idle | baseline |" in runs["idle"][1] and "| neighbour | ct_covid |" in runs["busy"][1]
    leftover = [pid for pid in set(os.listdir("/proc")) - before if pid.isdigit()
                and "time.time() <" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")]
    for pid in leftover:
        os.kill(int(pid), signal.SIGKILL)
    assert not leftover, "the neighbour process outlived the benchmark"


def test_concurrent_clients_share_the_work_and_count_every_request() -> None:
    """The concurrency condition's driver: N threads back to back for a while, every request timed."""
    import threading
    import time

    from benchmarks.conditions import concurrent

    seen: set[int] = set()

    def request() -> None:
        seen.add(threading.get_ident())
        time.sleep(0.01)

    figures = concurrent(request, clients=4, seconds=0.3)
    assert len(seen) >= 4 and figures["requests"] >= 4 * 10
    assert 10 <= figures["request_ms"][0] <= figures["request_ms"][1] < 200 and figures["requests_per_s"] > 100
