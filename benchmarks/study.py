"""A whole study: a synthetic CT series as a ZIP -> the study call, the shown slice's heatmap, memory.

    python -m benchmarks.study                     # 300 slices of 512 x 512, head_ct, 3 rounds
    python -m benchmarks.study --slices 60 --rounds 1 --task ct_covid
    python -m benchmarks.study --no-model          # reading and windowing only (no model loaded)

Makes a CT series in memory (int16 stored values, RescaleIntercept -1024, a head phantom with
noise, one scout image), zips it in shuffled order, then times, per round:

- read: ZIP bytes -> `core.study.read_upload` (unzip through `core.archive`, parse, decode, group,
  order, check) and the model's default series chosen;
- study: every slice through the model in batches and the study call (`core.study.analyse_series`),
  so `zip_to_call_s` = read + study is what a reader waits for after the upload;
- heatmap: the shown slice's heatmap (the top key slice, then the next ones: each a slice whose
  heatmap was not computed yet, with the default method), per slice in ms; the first heatmap
  of the process (which imports pytorch-grad-cam and makes the gradient replica) is made before
  the rounds, as a server has made it long before;
- window (with --no-model): every slice through the model's window to 8-bit, all arrays kept, and
  the scan path (every slice as a `Scan` through `EvalPreset`), for comparison.

Peak memory added is the kernel's high-water mark of this process (VmHWM, reset through
/proc/self/clear_refs before each round) minus the resident set before it, with the ZIP bytes and
the model already in memory: what one study adds to a server that has received the upload. Prints
one JSON object; nothing is written to disk. A timing, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import random
import statistics
import sys
import time
import zipfile

import numpy as np

from benchmarks.memory import rss_mb, status_mb
from benchmarks.samples import make_dicom


def head_phantom(size: int, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """An HU slice k of n: air, skull, brain whose radius follows the slice, noise of 8 HU."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    radius = 0.25 + 0.2 * np.sin(np.pi * (k + 1) / (n + 1))
    r = np.hypot(yy - 0.5, xx - 0.5)
    hu = np.full((size, size), -1000.0)
    hu[r < radius + 0.03] = 1200.0
    hu[r < radius] = 35.0
    hu[(r < radius) & (np.hypot(yy - 0.45, xx - 0.6) < 0.03 + 0.02 * (k % 5) / 5)] = 70.0
    hu += rng.normal(0.0, 8.0, hu.shape)
    return hu


def series_zip(slices: int, size: int, seed: int = 0) -> bytes:
    """A ZIP of `slices` axial CT DICOM files (plus one scout) in shuffled order, names without extension."""
    return zip_files(series_files(slices, size, seed), seed)


def series_files(slices: int, size: int, seed: int = 0) -> list[bytes]:
    """`slices` axial CT DICOM files of a head phantom in order, then one scout (another orientation, LOCALIZER)."""
    rng = np.random.default_rng(seed)
    files = []
    for k in range(slices):
        stored = np.clip(np.round(head_phantom(size, k, slices, rng) + 1024), -32768, 32767).astype(np.int16)
        files.append(make_dicom(stored, extra={
            "StudyInstanceUID": "2.25.10", "SeriesInstanceUID": "2.25.10.1", "SeriesNumber": 2, "InstanceNumber": k + 1,
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
            "ImagePositionPatient": [-125.0, -125.0, 2.5 * k], "PixelSpacing": [0.49, 0.49], "SliceThickness": 2.5,
            "BodyPartExamined": "HEAD"}))
    files.append(make_dicom(np.zeros((size, size), np.int16), extra={
        "StudyInstanceUID": "2.25.10", "SeriesInstanceUID": "2.25.10.1", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "ImageOrientationPatient": [1, 0, 0, 0, 0, -1], "ImagePositionPatient": [-250, 0, 300]}))
    return files


def zip_files(files: list[bytes], seed: int = 0) -> bytes:
    """The files in a ZIP, shuffled, in sub-folders, names without extension."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for place, index in enumerate(order):
            archive.writestr(f"DICOM/{place % 7:02d}/I{place:05d}", files[index])
    return buffer.getvalue()


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current resident set (Linux); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def one_round(data: bytes, spec: object, scan_path: bool) -> dict:
    """Reading and windowing only (no model)."""
    from core.preprocess import EvalPreset
    from core.study import read_upload

    gc.collect()
    before = rss_mb()
    exact_peak = reset_peak()
    start = time.perf_counter()
    study = read_upload([("study.zip", data)], spec)
    series = study.choose(spec).series
    read_s = time.perf_counter() - start
    arrays = [series.window_8bit(i, spec.ct_window) for i in range(len(series))]
    total_s = time.perf_counter() - start
    peak = status_mb("VmHWM") - before
    figures = {"read_s": read_s, "window_s": total_s - read_s, "zip_to_8bit_s": total_s, "peak_added_mb": peak,
               "peak_exact": exact_peak, "slices": len(series), "left_out": series.left_out_count,
               "held_mb": series.nbytes / 2**20, "arrays_mb": sum(a.nbytes for a in arrays) / 2**20}
    del arrays
    if scan_path:
        gc.collect()
        start = time.perf_counter()
        inputs = [EvalPreset(spec)(series.scan(i)).grey for i in range(len(series))]
        figures["scan_preprocess_s"] = time.perf_counter() - start
        figures["inputs_mb"] = sum(item.nbytes for item in inputs) / 2**20
        del inputs
    del study, series
    gc.collect()
    return figures


def study_round(data: bytes, classifier: object, heatmaps: int) -> dict:
    """ZIP -> study call through the model, then `heatmaps` slice heatmaps."""
    from core.study import StudyAnalysis, analyse_series, read_upload

    spec = classifier.spec
    gc.collect()
    before = rss_mb()
    exact_peak = reset_peak()
    start = time.perf_counter()
    study = read_upload([("study.zip", data)], spec)
    read_s = time.perf_counter() - start
    analysis = analyse_series(classifier, study)
    total_s = time.perf_counter() - start
    if not isinstance(analysis, StudyAnalysis):
        raise RuntimeError(f"the study was not analysed: {analysis.reason}")
    peak_call = status_mb("VmHWM") - before
    shown = list(analysis.key_slices) + [i for i in range(len(analysis)) if i not in analysis.key_slices]
    heatmap_ms = []
    for index in shown[:heatmaps]:
        begin = time.perf_counter()
        analysis.heatmap(index)
        heatmap_ms.append((time.perf_counter() - begin) * 1000)
    peak = status_mb("VmHWM") - before
    figures = {"read_s": read_s, "study_s": total_s - read_s, "zip_to_call_s": total_s, "heatmap_ms": heatmap_ms,
               "peak_added_mb": peak, "peak_added_at_call_mb": peak_call, "peak_exact": exact_peak,
               "slices": len(analysis), "left_out": analysis.series.left_out_count,
               "held_mb": analysis.series.nbytes / 2**20, "call": analysis.prediction.headline_text()}
    del analysis, study
    gc.collect()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--heatmaps", type=int, default=5, help="slice heatmaps timed per round")
    parser.add_argument("--task", default="head_ct", help="model whose window, series choice and study call are used")
    parser.add_argument("--no-model", action="store_true", help="reading and windowing only (no model loaded)")
    parser.add_argument("--no-scan-path", action="store_true", help="with --no-model: skip the Scan + preprocess timing")
    args = parser.parse_args(argv)

    import core.preprocess  # noqa: F401 - imported before measuring: torch and cv2 are the server's anyway
    from core.tasks import get_task

    spec = get_task(args.task)
    data = series_zip(args.slices, args.size)
    result = {"slices": args.slices, "size": args.size, "task": args.task, "window": list(spec.ct_window),
              "zip_mb": round(len(data) / 2**20, 1), "rounds": args.rounds}
    if args.no_model:
        rounds = [one_round(data, spec, not args.no_scan_path) for _ in range(args.rounds)]
        keys = ("read_s", "window_s", "zip_to_8bit_s") + (() if args.no_scan_path else ("scan_preprocess_s",))
        result.update(arrays_mb=round(rounds[0]["arrays_mb"], 1))
    else:
        from core import threads
        from core.models import load_model
        from core.pipeline import BATCH_SIZE
        from core.study import StudyAnalysis, analyse_series, read_upload

        threads.configure("serve")
        classifier = load_model(spec)
        # A server has run full batches and made its first heatmap long before: so does this process first.
        warm = read_upload([("warm.zip", series_zip(BATCH_SIZE, 64, seed=1))], spec)
        warmed = analyse_series(classifier, warm)
        if isinstance(warmed, StudyAnalysis):
            warmed.heatmap(0)
        del warm, warmed
        rounds = [study_round(data, classifier, args.heatmaps) for _ in range(args.rounds)]
        keys = ("read_s", "study_s", "zip_to_call_s")
        heatmaps = [ms for r in rounds for ms in r["heatmap_ms"]]
        result.update(heatmap_ms={"p50": round(statistics.median(heatmaps), 1), "max": round(max(heatmaps), 1),
                                  "n": len(heatmaps)} if heatmaps else None,
                      peak_added_at_call_mb=round(max(r["peak_added_at_call_mb"] for r in rounds), 1),
                      call=rounds[0]["call"])
    result.update(
        p50_s={key: round(statistics.median(r[key] for r in rounds), 3) for key in keys},
        peak_added_mb=round(max(r["peak_added_mb"] for r in rounds), 1),
        peak_exact=all(r["peak_exact"] for r in rounds), held_mb=round(rounds[0]["held_mb"], 1),
        slices_used=rounds[0]["slices"], left_out=rounds[0]["left_out"])
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
