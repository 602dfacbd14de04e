"""Speed under the conditions users meet: idle, one CPU-bound neighbour, and 4 / 10 concurrent requests.

    python -m benchmarks.conditions                          # brain_mri and head_ct, about 4 minutes
    python -m benchmarks.conditions --models brain_mri --seconds 8 --json out.json

Every figure is measured in a fresh process per (condition, subject), so each starts with the
thread settings it would have in real use:

- *ours*: the project's own path (`core.pipeline.analyse` for a 512 x 512 PNG, Grad-CAM through
  `Analysis.heatmap`, batches through `core.decision.predict`), under the thread policy of
  `core.threads` (OpenMP waiting passively; concurrent computations sharing the cores);
- *baseline*: what a plain demo does, with torch's defaults (a torchvision ResNet-50, PIL +
  torchvision transforms, pytorch-grad-cam's GradCAM built per request; no `core` import, so
  OpenMP keeps its default active waiting).

Conditions: *idle*; *neighbour*: one CPU-bound process (a busy loop the benchmark starts before
and stops after, bounded in time) on the same cores; *4 / 10 concurrent*: that many threads in
one process each sending a request (predict, then its Grad-CAM) as soon as the last one returned,
as concurrent sessions or API requests do. Figures: p50 / p95 ms per predict and per Grad-CAM
(alone), per request (concurrent), and throughput.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONDITIONS = ("idle", "neighbour", "4 concurrent", "10 concurrent")
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return (1000 * statistics.median(ordered),
            1000 * ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))])


# Fewer calls and a smaller batch only for the command's smoke test (tests/test_benchmarks.py).
MIN_CALLS = int(os.environ.get("SECONDLOOK_BENCH_MIN_CALLS", "5"))
BATCH = int(os.environ.get("SECONDLOOK_BENCH_BATCH", "16"))


def run_for(fn, seconds: float, warmup: int = 2) -> list[float]:
    """Call `fn` repeatedly for about `seconds` (at least `MIN_CALLS` times) after `warmup` untimed calls; the timings."""
    for _ in range(warmup):
        fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < MIN_CALLS:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def concurrent(request, clients: int, seconds: float) -> dict:
    """`clients` threads each sending requests back to back for `seconds`: per-request p50 / p95 and requests/s."""
    request()  # warm up
    times: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            request()
            with lock:
                times.append(time.perf_counter() - start)

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    p50, p95 = percentiles(times)
    return {"request_ms": [p50, p95], "requests_per_s": len(times) / elapsed, "requests": len(times)}


def ours(key: str, clients: int, seconds: float) -> dict:
    """The project's path for one model (this process applies the project's thread policy on import)."""
    import torch

    from benchmarks.samples import encode, synthetic_slice
    from core.decision import predict
    from core.imaging import read_scan
    from core.models import load_model
    from core.pipeline import analyse
    from core.preprocess import EvalPreset
    from core.tasks import get_task
    from core.threads import configure

    policy = configure("serve")
    classifier = load_model(get_task(key))
    data = encode(synthetic_slice(512, seed=5))
    target = get_task(key).labels[0]

    def request() -> None:
        analysis = analyse(classifier, data, "scan.png")
        analysis.heatmap(target, "Grad-CAM")

    out: dict = {"threads": policy.threads, "concurrency": policy.concurrency, "wait_policy": policy.wait_policy}
    if clients > 1:
        return {**out, **concurrent(request, clients, seconds)}
    analysis = analyse(classifier, data, "scan.png")
    predict_s = run_for(lambda: analyse(classifier, data, "scan.png"), seconds / 3)
    out["predict_ms"] = percentiles(predict_s)
    # A heatmap is cached per analysis, so each is timed with a fresh analysis; its own share is each
    # sample less the median prediction (subtracting p95 from p95 would not be a percentile of anything).
    total_s = run_for(lambda: analyse(classifier, data, "scan.png").heatmap(target, "Grad-CAM"), seconds / 3)
    predict_median = statistics.median(predict_s)
    out["cam_ms"] = percentiles([max(0.0, t - predict_median) for t in total_s])
    batch = torch.cat([EvalPreset(classifier.spec)(read_scan(encode(synthetic_slice(512, seed=s)), "x.png")).tensor
                       for s in range(BATCH)])
    out["throughput"] = BATCH / statistics.median(run_for(lambda: predict(classifier, batch), seconds / 3, warmup=1))
    del analysis
    return out


def baseline(clients: int, seconds: float) -> dict:
    """The plain demo: torchvision ResNet-50, PIL + transforms, GradCAM per request; torch's default threading."""
    import pytorch_grad_cam as pgc
    import torch
    from PIL import Image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision import models, transforms

    from benchmarks.samples import encode, synthetic_slice

    model = models.resnet50(weights=None).eval()
    transform = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = encode(synthetic_slice(512, seed=5))
    lock = threading.Lock()  # a shared model needs one: the hooks of one request would see another's pass

    def read() -> torch.Tensor:
        return transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)

    def predict() -> None:
        with lock, torch.no_grad():
            torch.softmax(model(read()), dim=1)

    def cam() -> None:
        tensor = read()
        with lock, pgc.GradCAM(model=model, target_layers=[model.layer4[-1]]) as grad_cam:
            grad_cam(input_tensor=tensor, targets=[ClassifierOutputTarget(0)])

    out: dict = {"threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    if clients > 1:
        return {**out, **concurrent(lambda: (predict(), cam()), clients, seconds)}
    out["predict_ms"] = percentiles(run_for(predict, seconds / 3))
    out["cam_ms"] = percentiles(run_for(cam, seconds / 3))
    batch = torch.cat([read() for _ in range(BATCH)])

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    out["throughput"] = BATCH / statistics.median(run_for(forward, seconds / 3, warmup=1))
    return out


def measure(subject: str, condition: str, seconds: float) -> dict:
    """One (subject, condition) in a fresh process, with a busy neighbour process for the "neighbour" condition."""
    clients = int(condition.split()[0]) if condition.endswith("concurrent") else 1
    env = dict(os.environ)
    if subject == "baseline":
        env.pop("OMP_WAIT_POLICY", None)  # torch's defaults, as a plain demo has them
    neighbour = None
    if condition == "neighbour":
        bound = seconds * 3 + 120  # stops by itself even if this benchmark is killed
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=bound)])
    try:
        result = subprocess.run([sys.executable, "-m", "benchmarks.conditions", "--worker", subject, "--clients",
                                 str(clients), "--seconds", str(seconds)], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=seconds * 10 + 300)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if result.returncode != 0:
        raise RuntimeError(f"{subject} under {condition} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict) -> str:
    """Each model beside the baseline, condition by condition."""
    lines = [f"machine: {results['machine']}", "",
             "| condition | subject | predict p50 / p95 ms | Grad-CAM p50 / p95 ms | batch img/s | request p50 / p95 ms "
             "(predict + Grad-CAM) | requests/s |",
             "|---|---|---|---|---|---|---|"]
    for condition, subjects in results["conditions"].items():
        for subject, f in subjects.items():
            def pair(name: str, f: dict = f) -> str:
                return f"{f[name][0]:.1f} / {f[name][1]:.1f}" if name in f else "-"

            row = [condition, subject, pair("predict_ms"), pair("cam_ms"),
                   f"{f['throughput']:.0f}" if "throughput" in f else "-", pair("request_ms"),
                   f"{f['requests_per_s']:.1f}" if "requests_per_s" in f else "-"]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "targets: " + "; ".join(check(results))]
    return "\n".join(lines)


def check(results: dict) -> list[str]:
    """With a neighbour: within 2x of idle and never slower than the baseline under the same condition."""
    out = []
    idle, busy = results["conditions"].get("idle", {}), results["conditions"].get("neighbour", {})
    for subject, f in busy.items():
        if subject == "baseline" or subject not in idle:
            continue
        for name in ("predict_ms", "cam_ms"):
            ratio = f[name][0] / max(idle[subject][name][0], 1e-9)
            out.append(f"{subject} {name[:-3]} p50 with a neighbour {ratio:.1f}x idle "
                       f"({'met' if ratio <= 2 else 'NOT met'}: <= 2x)")
            base = busy.get("baseline", {}).get(name)
            if base:
                out.append(f"{subject} {name[:-3]} p50 with a neighbour {f[name][0]:.0f} ms vs baseline {base[0]:.0f} ms "
                           f"({'met' if f[name][0] <= base[0] else 'NOT met'})")
    return out


def machine() -> str:
    from benchmarks.proc import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} logical cores"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Speed idle, beside a busy neighbour, and under concurrent requests.")
    parser.add_argument("--models", nargs="*", default=["brain_mri", "head_ct"], help="registry keys")
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per figure group")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--no-baseline", action="store_true", help="measure only the project's path")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "ours:KEY" or "baseline", in a subprocess
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        if args.worker == "baseline":
            figures = baseline(args.clients, args.seconds)
        else:
            figures = ours(args.worker.split(":", 1)[1], args.clients, args.seconds)
        print(json.dumps(figures))
        return 0
    results: dict = {"machine": machine(), "conditions": {}}
    for condition in args.conditions:
        results["conditions"][condition] = {}
        for subject in [f"ours:{key}" for key in args.models] + ([] if args.no_baseline else ["baseline"]):
            print(f"{condition}: {subject}...", file=sys.stderr, flush=True)
            results["conditions"][condition][subject.removeprefix("ours:")] = measure(subject, condition, args.seconds)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
