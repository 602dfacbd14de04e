"""Reading a whole study: a synthetic CT series as a ZIP -> every slice ready for a model.

    python -m benchmarks.study                     # 300 slices of 512 x 512, head_ct's window, 3 rounds
    python -m benchmarks.study --slices 60 --rounds 1 --task ct_covid

Makes a CT series in memory (int16 stored values, RescaleIntercept -1024, a head phantom with
noise, one scout image), zips it in shuffled order, then times, per round:

- read: ZIP bytes -> `core.series.read_study` (unzip, parse, decode, group, order, check) and the
  model's default series chosen;
- window: every slice through the model's window to 8-bit (`Series.window_8bit`, what the
  model's 8-bit training files hold), all arrays kept;
- scan path (separately): every slice as a `Scan` through the single-image preprocessing
  (`core.preprocess.EvalPreset`, float32 at the model's input size), all kept.

Peak memory added is the kernel's high-water mark of this process (VmHWM, reset through
/proc/self/clear_refs before each round) minus the resident set before it, with the ZIP bytes
already in memory: what one study adds to a server that has received the upload. Prints one JSON
object; nothing is written to disk.
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
    from core.preprocess import EvalPreset
    from core.series import read_study

    gc.collect()
    before = rss_mb()
    exact_peak = reset_peak()
    start = time.perf_counter()
    study = read_study(data, "study.zip")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", default="head_ct", help="model whose window and series choice are used")
    parser.add_argument("--no-scan-path", action="store_true", help="skip the Scan + preprocess timing")
    args = parser.parse_args(argv)

    import core.preprocess  # noqa: F401 - imported before measuring: torch and cv2 are the server's anyway
    from core.tasks import get_task

    spec = get_task(args.task)
    data = series_zip(args.slices, args.size)
    rounds = [one_round(data, spec, not args.no_scan_path) for _ in range(args.rounds)]
    p50 = {key: statistics.median(r[key] for r in rounds) for key in ("read_s", "window_s", "zip_to_8bit_s")}
    result = {
        "slices": args.slices, "size": args.size, "task": args.task, "window": list(spec.ct_window),
        "zip_mb": round(len(data) / 2**20, 1), "rounds": args.rounds,
        "p50_s": {key: round(value, 3) for key, value in p50.items()},
        "peak_added_mb": round(max(r["peak_added_mb"] for r in rounds), 1),
        "peak_exact": all(r["peak_exact"] for r in rounds),
        "held_mb": round(rounds[0]["held_mb"], 1), "arrays_mb": round(rounds[0]["arrays_mb"], 1),
        "slices_used": rounds[0]["slices"], "left_out": rounds[0]["left_out"],
    }
    if not args.no_scan_path:
        result["p50_s"]["scan_preprocess_s"] = round(statistics.median(r["scan_preprocess_s"] for r in rounds), 3)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
