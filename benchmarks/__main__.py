"""CPU benchmarks of every bundled model, next to a common baseline doing the same work.

    python -m benchmarks                      # everything (about 3 minutes on 2 cores)
    python -m benchmarks --threads 1          # another thread count
    python -m benchmarks --quick --models brain_mri --no-server   # a fast smoke run

Prints, per model: weights load time (libraries already imported: their import is part of the
cold start); read + preprocess + predict latency p50/p95 for a PNG
and a DICOM (512 x 512, synthetic, so the run needs no data); Grad-CAM latency p50/p95 per
method; batch throughput (model only, and read + preprocess + predict of PNG files); then the
peak resident memory of one process with all models loaded and used, and the app's cold start
(server spawn to the home page's script run finished, and to the first task page ready).

The baseline is what a plain demo does: a torchvision ResNet-50 (random weights: only the
arithmetic matters) in eval mode, PIL + torchvision transforms to 224, and pytorch-grad-cam's
GradCAM on layer4 built per request, as in its README (the one pytorch_grad_cam import outside
core/explain.py, on purpose). Ratios are baseline time / ours: above 1 means faster than it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.proc import cpu_model
from benchmarks.samples import ct_dicom, encode, synthetic_slice
from benchmarks.server import REPO, serve
from benchmarks.session import AppSession

TARGETS = {"predict_ms": 40.0, "cam_ms": 120.0, "throughput": 60.0, "memory_mb": 1024.0, "cold_start_s": 8.0}
BATCH = 16


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def p50_p95_ms(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return 1000 * statistics.median(ordered), 1000 * ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def machine(threads: int) -> str:
    return (f"{cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__} on {threads} threads "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}")


def bench_model(key: str, repeats: int, cam_repeats: int) -> dict:
    """Load, latency, CAM and throughput figures for one bundled model."""
    from core.explain import METHODS, compute_cam, road_score
    from core.imaging import read_scan
    from core.preprocess import display_rgb
    from core.report import ReportContent, render_pdf
    from core.uncertainty import tta_spread
    from core.decision import predict
    from core.models import load_model
    from core.pipeline import analyse, predict_uploads
    from core.preprocess import EvalPreset
    from core.tasks import get_task

    spec = get_task(key)
    start = time.perf_counter()
    classifier = load_model(spec)
    figures: dict = {"load_ms": 1000 * (time.perf_counter() - start)}
    png = encode(synthetic_slice(512, seed=5))
    for kind, name, data in (("png", "scan.png", png), ("dicom", "slice.dcm", ct_dicom(512, seed=6))):
        def path(data: bytes = data, name: str = name) -> None:
            analyse(classifier, data, name)
        figures[f"predict_{kind}_ms"] = p50_p95_ms(timed(path, repeats))
    scan = read_scan(png, "scan.png")
    prepared = EvalPreset(spec)(scan)
    tensor = prepared.tensor
    index = predict(classifier, tensor)[0].index
    figures["cam_ms"] = {m: p50_p95_ms(timed(lambda m=m: compute_cam(classifier, tensor, index, m), cam_repeats))
                         for m in METHODS}
    # What the page adds on request or per heatmap: ROAD faithfulness, test-time augmentation, the PDF report.
    heatmap = compute_cam(classifier, tensor, index)
    figures["road_ms"] = p50_p95_ms(timed(lambda: road_score(classifier, tensor, heatmap, index), cam_repeats, warmup=1))
    figures["tta_ms"] = p50_p95_ms(timed(lambda: tta_spread(classifier, prepared), cam_repeats, warmup=1))
    rgb = display_rgb(scan)
    content = ReportContent(rgb, rgb, predict(classifier, tensor)[0], classifier.card, "0" * 16, spec.labels[index],
                            "Grad-CAM")
    figures["report_ms"] = p50_p95_ms(timed(lambda: render_pdf(content), cam_repeats, warmup=1))
    batch = torch.cat([EvalPreset(spec)(read_scan(encode(synthetic_slice(512, seed=s)), "x.png")).tensor
                       for s in range(BATCH)])
    seconds = timed(lambda: predict(classifier, batch), max(3, repeats // 5), warmup=1)
    figures["throughput_model"] = BATCH / statistics.median(seconds)
    files = [(f"scan{s}.png", encode(synthetic_slice(512, seed=s))) for s in range(4 * BATCH)]
    seconds = timed(lambda: list(predict_uploads(classifier, files)), max(2, repeats // 10), warmup=1)
    figures["throughput_files"] = len(files) / statistics.median(seconds)
    return figures


def bench_baseline(repeats: int, cam_repeats: int) -> dict:
    """The same work done the common way: ResNet-50, PIL + transforms, GradCAM per request."""
    import pytorch_grad_cam as pgc
    from PIL import Image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision import models, transforms

    buffer = io.BytesIO()
    torch.save(models.resnet50(weights=None).state_dict(), buffer)
    start = time.perf_counter()
    model = models.resnet50(weights=None)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    figures: dict = {"load_ms": 1000 * (time.perf_counter() - start)}
    transform = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = encode(synthetic_slice(512, seed=5))

    def read(payload: bytes) -> torch.Tensor:
        return transform(Image.open(io.BytesIO(payload)).convert("RGB")).unsqueeze(0)

    def path() -> None:
        with torch.no_grad():
            torch.softmax(model(read(data)), dim=1)

    figures["predict_png_ms"] = p50_p95_ms(timed(path, repeats))
    tensor = read(data)

    def cam() -> None:
        with pgc.GradCAM(model=model, target_layers=[model.layer4[-1]]) as grad_cam:
            grad_cam(input_tensor=tensor, targets=[ClassifierOutputTarget(0)])

    figures["cam_ms"] = {"Grad-CAM": p50_p95_ms(timed(cam, cam_repeats))}
    batch = torch.cat([read(encode(synthetic_slice(512, seed=s))) for s in range(BATCH)])

    def forward_batch() -> None:
        with torch.no_grad():
            model(batch)

    figures["throughput_model"] = BATCH / statistics.median(timed(forward_batch, max(3, repeats // 5), warmup=1))
    return figures


def bench_memory() -> dict:
    """Peak RSS of a fresh process holding all models (benchmarks.memory)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory"], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cold_start(rounds: int) -> dict:
    """Server spawn -> health answered -> home page run finished -> Brain MRI page ready (model loaded); then
    the Model cards page's first opening on that server (its own run time: every card, chart and table)."""

    async def first_pages(url: str) -> tuple[float, float, float]:
        async with AppSession(url) as session:
            await session.run("")
        at_home = time.monotonic()
        async with AppSession(url) as session:
            opened = await session.run("brain-mri")
            if not opened.uploader_ids:
                raise RuntimeError("the Brain MRI page showed no uploader")
        at_task = time.monotonic()
        async with AppSession(url) as session:
            cards = await session.run("model-cards")
            if cards.exceptions:
                raise RuntimeError("the Model cards page showed an exception")
        return at_home, at_task, cards.seconds

    health, home, task, cards = [], [], [], []
    for _ in range(rounds):
        with serve() as server:
            at_home, at_task, cards_s = asyncio.run(first_pages(server.url))
            health.append(server.healthy_after)
            home.append(at_home - server.spawned)
            task.append(at_task - server.spawned)
            cards.append(cards_s)
    return {"health_s": statistics.median(health), "home_s": statistics.median(home), "task_page_s": statistics.median(task),
            "cards_page_s": statistics.median(cards)}


def ratio(baseline: float, ours: float) -> str:
    return f"{baseline / ours:.1f}x" if ours > 0 else "n/a"


def report(results: dict) -> str:
    """The figures as the README shows them."""
    lines = [f"machine: {results['machine']}", ""]
    base = results["baseline"]
    lines.append("| model | load ms | PNG predict p50/p95 ms | DICOM predict p50/p95 ms | Grad-CAM p50/p95 ms "
                 "| batch img/s (model) | batch img/s (files) |")
    lines.append("|---|---|---|---|---|---|---|")
    for key, f in results["models"].items():
        lines.append(f"| {key} | {f['load_ms']:.0f} | {f['predict_png_ms'][0]:.1f} / {f['predict_png_ms'][1]:.1f} "
                     f"| {f['predict_dicom_ms'][0]:.1f} / {f['predict_dicom_ms'][1]:.1f} "
                     f"| {f['cam_ms']['Grad-CAM'][0]:.1f} / {f['cam_ms']['Grad-CAM'][1]:.1f} "
                     f"| {f['throughput_model']:.0f} | {f['throughput_files']:.0f} |")
    lines.append(f"| baseline ResNet-50 | {base['load_ms']:.0f} | {base['predict_png_ms'][0]:.1f} / {base['predict_png_ms'][1]:.1f} "
                 f"| - | {base['cam_ms']['Grad-CAM'][0]:.1f} / {base['cam_ms']['Grad-CAM'][1]:.1f} "
                 f"| {base['throughput_model']:.0f} | - |")
    methods = list(next(iter(results["models"].values()))["cam_ms"])
    lines += ["", "CAM p50 ms per method:", "", "| model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for key, f in results["models"].items():
        lines.append(f"| {key} | " + " | ".join(f"{f['cam_ms'][m][0]:.0f}" for m in methods) + " |")
    lines += ["", "Per heatmap or on request, p50 / p95 ms: ROAD faithfulness score (every heatmap shown), stability check "
              "(16 augmented views, on request), one-page PDF report (on download):", "",
              "| model | ROAD | stability (TTA) | PDF report |", "|---|---|---|---|"]
    for key, f in results["models"].items():
        lines.append(f"| {key} | " + " | ".join(f"{f[k][0]:.0f} / {f[k][1]:.0f}" for k in ("road_ms", "tta_ms", "report_ms"))
                     + " |")
    lines += ["", "Ratios to the baseline (baseline time / ours; > 1 is faster), per model: "]
    for key, f in results["models"].items():
        lines.append(f"- {key}: load {ratio(base['load_ms'], f['load_ms'])}, "
                     f"PNG predict p50 {ratio(base['predict_png_ms'][0], f['predict_png_ms'][0])}, "
                     f"Grad-CAM p50 {ratio(base['cam_ms']['Grad-CAM'][0], f['cam_ms']['Grad-CAM'][0])}, "
                     f"batch throughput {ratio(1 / base['throughput_model'], 1 / f['throughput_model'])}")
    if "memory" in results:
        m = results["memory"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in m["stages_mb"].items())
        lines.append(f"\npeak resident memory, {len(m['models'])} models loaded and used in one process: "
                     f"{m['peak_rss_mb']:.0f} MB (resident MB after each stage: {stages})")
    if "cold_start" in results:
        c = results["cold_start"]
        lines.append(f"cold start (median of {results['cold_start_rounds']}): health answered {c['health_s']:.1f} s, "
                     f"home page served {c['home_s']:.1f} s, Brain MRI page ready (model loaded) {c['task_page_s']:.1f} s, "
                     f"Model cards page's first opening {c['cards_page_s']:.2f} s")
    lines += ["", "targets: " + "; ".join(check_targets(results))]
    return "\n".join(lines)


def check_targets(results: dict) -> list[str]:
    """Each target with the worst figure over the models, and met / NOT met."""
    models = results["models"].values()
    worst = {
        "predict_ms": max(max(f["predict_png_ms"][0], f["predict_dicom_ms"][0]) for f in models),
        "cam_ms": max(f["cam_ms"]["Grad-CAM"][0] for f in models),
        "throughput": min(f["throughput_model"] for f in models),
    }
    checks = [f"predict p50 <= {TARGETS['predict_ms']:.0f} ms: {worst['predict_ms']:.1f}",
              f"Grad-CAM p50 <= {TARGETS['cam_ms']:.0f} ms: {worst['cam_ms']:.1f}",
              f"batch throughput (model) >= {TARGETS['throughput']:.0f} img/s: {worst['throughput']:.0f}"]
    met = [worst["predict_ms"] <= TARGETS["predict_ms"], worst["cam_ms"] <= TARGETS["cam_ms"],
           worst["throughput"] >= TARGETS["throughput"]]
    if "memory" in results:
        checks.append(f"memory <= {TARGETS['memory_mb']:.0f} MB: {results['memory']['peak_rss_mb']:.0f}")
        met.append(results["memory"]["peak_rss_mb"] <= TARGETS["memory_mb"])
    if "cold_start" in results:
        checks.append(f"cold start <= {TARGETS['cold_start_s']:.0f} s: {results['cold_start']['home_s']:.1f}")
        met.append(results["cold_start"]["home_s"] <= TARGETS["cold_start_s"])
    return [f"{c} ({'met' if ok else 'NOT met'})" for c, ok in zip(checks, met)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CPU benchmarks of the bundled models against a common baseline.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    parser.add_argument("--models", nargs="*", default=None, help="registry keys (default: every bundled model)")
    parser.add_argument("--quick", action="store_true", help="few repeats, one cold start: a smoke run, not figures")
    parser.add_argument("--no-server", action="store_true", help="skip the cold start (no Streamlit server)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.models import WEIGHTS_DIR
    from core.tasks import TASKS

    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats, cam_repeats, rounds = (5, 2, 1) if args.quick else (40, 15, 3)
    keys = args.models or [k for k in TASKS if (WEIGHTS_DIR / f"{k}.safetensors").is_file()]
    results: dict = {"machine": machine(args.threads), "threads": args.threads, "models": {}}
    import pytorch_grad_cam  # noqa: F401 - library imports are part of the cold start, not of a model's load time
    import torchvision  # noqa: F401

    for key in keys:
        print(f"benchmarking {key}...", file=sys.stderr, flush=True)
        results["models"][key] = bench_model(key, repeats, cam_repeats)
    print("benchmarking the baseline...", file=sys.stderr, flush=True)
    results["baseline"] = bench_baseline(repeats, cam_repeats)
    results["memory"] = bench_memory()
    if not args.no_server:
        print("timing cold starts...", file=sys.stderr, flush=True)
        results["cold_start"], results["cold_start_rounds"] = bench_cold_start(rounds), rounds
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
