"""The API as real servers: `python -m api` under uvicorn (one and two workers) and a local Ray Serve with two replicas.

Each server gets concurrent clients sending different files to different models; every answer
must equal the in-process pipeline's answer for the same file (`core.pipeline.result_row`), with
no error, and the server's memory must stay bounded.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from benchmarks.api import ray_server, uvicorn_server
from benchmarks.memory import status_mb
from core.pipeline import analyse, result_row
from core.threads import RELEASE_AFTER_S
from tests.conftest import encode, head_ct_dicom, synthetic_slice
from tests.dicom_study import bundled_model, synthetic_series

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123"
ROW_FIELDS = ("file", "status", "reason", "prediction", "call", "uncertain")


def workload() -> list[tuple[str, str, bytes, str | None]]:
    """(model, file name, bytes, heatmap target or None): in-range head CT slices (two with a heatmap), scans the
    brain model refuses, files no model reads."""
    cases = [("head_ct", f"slice{i}.dcm", data, None) for i, data in enumerate(synthetic_series(8))]
    cases += [("head_ct", "phantom.dcm", head_ct_dicom(), "hemorrhage"),
              ("head_ct", "bleed.dcm", head_ct_dicom("BRAIN"), "sdh")]
    cases += [("head_ct", f"scan{i}.png", encode(synthetic_slice(256, seed=i)), None) for i in range(3)]
    cases += [("brain_mri", f"photo{i}.png", encode(synthetic_slice(200, seed=10 + i)), None) for i in range(4)]
    cases += [("brain_mri", "clip.gif", b"GIF89a" + bytes(64), None), ("head_ct", "empty.png", b"", None)]
    return cases


def expected_answers(cases: list[tuple[str, str, bytes, str | None]]) -> list[dict]:
    """The pipeline's row for each case, in this process; with the ROAD score where a heatmap is asked for."""
    answers = []
    for key, name, data, target in cases:
        outcome = analyse(bundled_model(key), data, name)
        row = result_row(name, outcome)
        if target is not None:
            row["faithfulness"] = outcome.faithfulness(target, "Grad-CAM").score
        answers.append(row)
    return answers


def status_for(row: dict) -> set[int]:
    if row["status"] == "ok":
        return {200}
    if row["guard"] is not None:
        return {422}
    return {400, 413, 415}


def check(answer: httpx.Response, expected: dict) -> None:
    assert answer.status_code in status_for(expected), (expected["file"], answer.status_code, answer.text[:200])
    body = answer.json()
    for field in ROW_FIELDS:
        assert body[field] == expected[field], (expected["file"], field)
    for field in ("probabilities", "findings"):
        if expected.get(field) is not None:
            assert body[field] == pytest.approx(expected[field], abs=1e-5), (expected["file"], field)
    if expected["guard"] is not None:
        assert body["guard"]["outcome"] == expected["guard"]["outcome"]
        assert body["guard"]["score"] == pytest.approx(expected["guard"]["score"], abs=1e-5)
    if "faithfulness" in expected:
        assert body["heatmap"]["faithfulness"]["score"] == pytest.approx(expected["faithfulness"], abs=1e-3)


def run_clients(url: str, cases: list, rounds: int, clients: int = 8, headers: dict | None = None) -> list[tuple]:
    """`rounds` passes over the cases by `clients` concurrent clients; (case index, response) in completion order."""
    jobs = [i for _ in range(rounds) for i in range(len(cases))]

    def one(i: int) -> tuple[int, httpx.Response]:
        key, name, data, target = cases[i]
        params = {"heatmap": "gradcam", "target": target} if target else None
        with httpx.Client(timeout=120) as client:
            return i, client.post(f"{url}/v1/predict/{key}", files={"file": (name, data)}, params=params, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, jobs))


def idle_rss_mb(pid: int) -> float:
    """The server's resident set once it has been idle long enough to hand freed memory back
    (`core.threads` trims the allocator after RELEASE_AFTER_S without model work): what it holds, not
    what its malloc arenas last touched, so a reading right after a burst does not pass for a leak."""
    time.sleep(RELEASE_AFTER_S + 1.5)
    return status_mb("VmRSS", pid)


def test_uvicorn_with_eight_concurrent_clients_answers_as_in_process() -> None:
    cases = workload()
    expected = expected_answers(cases)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with uvicorn_server("head_ct,brain_mri", env={"SECONDLOOK_API_TOKEN": TOKEN}) as server:
        pid = server.pids[0]
        for i, answer in run_clients(server.url, cases, 1, headers=headers):  # warm-up round, checked too
            check(answer, expected[i])
        settled = idle_rss_mb(pid)
        for i, answer in run_clients(server.url, cases, 3, headers=headers):
            check(answer, expected[i])
        grown = idle_rss_mb(pid) - settled
        peak = status_mb("VmHWM", pid)
        assert grown < 150, f"resident memory grew by {grown:.0f} MB over 3 more rounds"
        assert peak < 1500, f"peak resident memory {peak:.0f} MB"
        assert httpx.post(f"{server.url}/v1/predict/head_ct", files={"file": ("a.dcm", cases[0][2])}).status_code == 401
        metrics = httpx.get(f"{server.url}/metrics", headers=headers).text
        line = next(l for l in metrics.splitlines()
                    if l.startswith('secondlook_api_request_seconds_count{endpoint="/v1/predict/{key}",model="head_ct"}'))
        assert float(line.split()[-1]) == 4 * sum(1 for key, *_ in cases if key == "head_ct") + 1  # and the 401


def test_two_uvicorn_workers_answer_alike_and_metrics_add_up() -> None:
    cases = [case for case in workload() if case[0] == "head_ct"]
    expected = expected_answers(cases)
    with uvicorn_server("head_ct", workers=2) as server:
        assert len(server.pids) == 3  # the supervisor and two workers
        answers = run_clients(server.url, cases, 2, clients=8)
        for i, answer in answers:
            check(answer, expected[i])
        workers = {answer.headers["x-secondlook-replica"] for _, answer in answers}
        assert 1 <= len(workers) <= 2
        metrics = httpx.get(f"{server.url}/metrics").text  # one worker answers for both
        line = next(l for l in metrics.splitlines()
                    if l.startswith('secondlook_api_request_seconds_count{endpoint="/v1/predict/{key}",model="head_ct"}'))
        assert float(line.split()[-1]) == len(answers)


def test_ray_serve_two_replicas_share_the_requests() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-serve.txt)")
    cases = [case for case in workload() if case[0] == "head_ct"]
    expected = expected_answers(cases)
    try:
        started = ray_server("head_ct", replicas=2, cpus=1, ray_cpus=2)
        server = started.__enter__()
    except Exception as exc:  # noqa: BLE001 - only a Ray that cannot start here skips, with its reason
        pytest.skip(f"Ray cannot start on this machine: {type(exc).__name__}: {exc}")
    try:
        replicas: set[str] = set()
        for _ in range(4):  # Ray picks replicas at random (power of two choices): a few rounds reach both
            answers = run_clients(server.url, cases, 1, clients=8)
            for i, answer in answers:
                check(answer, expected[i])
            replicas |= {answer.headers["x-secondlook-replica"] for _, answer in answers}
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, f"every request went to {replicas}"
        assert len(server.pids) == 2
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready == {"status": "ready", "models": {"head_ct": "ready"}}
    finally:
        started.__exit__(None, None, None)
    import ray

    assert not ray.is_initialized()


def test_ray_builder_checks_its_arguments() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-serve.txt)")
    from api.serve import build

    for args, message in (({"replicas": "0"}, "at least 1"), ({"cpus": "two"}, "whole number"),
                          ({"models": "lungs"}, "unknown models"), ({"gpus": "1"}, "unknown arguments")):
        with pytest.raises(ValueError, match=message):
            build(args)
    assert build({"models": "head_ct", "replicas": "2"}) is not None
