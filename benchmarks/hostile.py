"""Time and peak memory of reading hostile and oversized uploads, one fresh process per case.

    python -m benchmarks.hostile                       # every case (about 2 minutes on 2 cores)
    python -m benchmarks.hostile --cases png_rgba_40mp,zip_600k_entries
    python -m benchmarks.hostile --json                # one JSON object per case instead of the table
    python -m benchmarks.hostile --through app         # the app's own path, model and heatmap included

Each case's bytes are made here (`benchmarks.hostile_files`) and handed over a pipe to a child
process that has already imported the readers and read one small PNG and DICOM (the idle
process). The child resets the kernel's peak-RSS mark (/proc/self/clear_refs), reads the
upload the way the app does, and reports the seconds taken, the peak resident memory above
its idle size (VmHWM - VmRSS before) and what a reader would be told. Scan cases go through
`core.imaging.read_scan`; request cases unpack every archive of one upload against one
`core.archive.UploadBudget` and keep every member passed on (what a request can make the
server hold). On a checkout without `core.archive` they use `core.predict.unpack_zip`, the
reader that came before it, so the same command measures the old code.

`--through app` measures what the app does with the upload instead of the reader alone. The
idle child has loaded a model (`--model`, default brain_mri) and analysed one small scan, heatmap
included, as a server that has served a page. A scan case then goes through
`core.pipeline.analyse` and, when accepted, the page's work on it: the heatmap of the call and
its faithfulness score (`Analysis.heatmap`, `Analysis.faithfulness`), the image as shown
(`core.preprocess.display_rgb`) and the blended overlay (`core.explain.overlay`). A request case
goes the Batch page's way: its archives unpacked against one budget and streamed through
`core.pipeline.predict_uploads`.

Targets (issue 18): an accepted upload peaks under 1.5 GB above the idle process, a refused one
under 300 MB. The child runs under an address-space limit (--limit-gb, default 8 for the reader
and 12 for the app path, whose idle process already maps 4.5 GB of torch) so that an old
reader's blow-up ends in MemoryError instead of taking the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from benchmarks import hostile_files as hf

ACCEPTED_TARGET_MB = 1536.0
REFUSED_TARGET_MB = 300.0
MB = 2**20

Upload = list[tuple[str, bytes]]


def _nan_float_tiff() -> bytes:
    values = np.full((5000, 8000), 0.5, dtype=np.float32)
    values[2500, 4000] = np.nan
    return hf.float_tiff(values)


# name -> (kind, builder of the upload's (name, bytes) list, what the reader should now do)
CASES: dict[str, tuple[str, Callable[[], Upload], str]] = {
    "png_512_reference": ("scan", lambda: [("scan.png", hf.large_image(512, 512, "PNG", "L"))], "accepted"),
    "png_rgba_40mp": ("scan", lambda: [("scan.png", hf.large_image(8000, 5000, "PNG", "RGBA"))], "accepted"),
    "png_palette_40mp": ("scan", lambda: [("scan.png", hf.large_image(8000, 5000, "PNG", "P"))], "accepted"),
    "png_gray16_40mp": ("scan", lambda: [("scan.png", hf.large_image(8000, 5000, "PNG", "I;16"))], "accepted"),
    "jpeg_rgb_40mp": ("scan", lambda: [("scan.jpg", hf.large_image(8000, 5000, "JPEG", "RGB", quality=90))], "accepted"),
    "tiff_float_40mp": ("scan", lambda: [("scan.tif", hf.large_image(8000, 5000, "TIFF", "F"))], "accepted"),
    "tiff_float_nan_40mp": ("scan", lambda: [("scan.tif", _nan_float_tiff())], "refused"),
    "tiff_float_3e38": ("scan", lambda: [("scan.tif", hf.extreme_float_tiff())], "refused"),
    "tiff_5000_pages": ("scan", lambda: [("stack.tif", hf.many_page_tiff(5000))], "accepted"),
    "tiff_50000_pages": ("scan", lambda: [("stack.tif", hf.many_page_tiff(50000))], "accepted"),
    "eps_named_png": ("scan", lambda: [("scan.png", hf.foreign_image("EPS", 512))], "refused"),
    "gif": ("scan", lambda: [("scan.gif", hf.foreign_image("GIF", 512))], "refused"),
    "dicom_12000_square_8bit": ("scan", lambda: [("big.dcm", hf.native_dicom(12000, 12000))], "refused"),
    "dicom_40mp_16bit": ("scan", lambda: [("big.dcm", hf.native_dicom(6400, 6250, bits=16))], "accepted"),
    "dicom_200_frames": ("scan", lambda: [("cine.dcm", hf.native_dicom(512, 512, bits=16, frames=200))], "accepted"),
    "dicom_deflate_1gb": ("scan", lambda: [("deflated.dcm", hf.deflated_dicom_bomb(2**30))], "refused"),
    "dicom_rle_640mb": ("scan", lambda: [("rle.dcm", hf.rle_dicom_bomb(512, 640 * MB))], "refused"),
    "dicom_nested_200": ("scan", lambda: [("nested.dcm", hf.nested_sequence_dicom(200))], "refused"),
    "zip_600k_entries": ("request", lambda: [("many.zip", hf.many_entry_zip(600_000))], "refused"),
    "zip_8_archives_190mb": ("request", lambda: [(f"part{i}.zip", hf.zip_of_zeros(f"scan{i}.png", 190 * MB))
                                                 for i in range(8)], "budget"),
}


# ---------------------------------------------------------------- child side


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0, proc(5) "clear_refs").
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _archive_reader() -> Callable[[Upload], tuple[int, int, list[str]]]:
    """A function unpacking a request's archives: (members kept, bytes kept, refusal/skip notes)."""
    try:
        from core.archive import ArchiveError, UploadBudget, open_zip
    except ImportError:
        from core.predict import unpack_zip  # the reader before core.archive: per-archive limits

        def old(upload: Upload) -> tuple[int, int, list[str]]:
            kept, notes = [], []
            for name, data in upload:
                try:
                    kept.extend(content for _, content in unpack_zip(name, data))
                except ValueError as exc:
                    notes.append(f"refused: {exc}")
            return len(kept), sum(map(len, kept)), notes

        return old

    def new(upload: Upload) -> tuple[int, int, list[str]]:
        budget, kept, notes = UploadBudget(), [], []
        for name, data in upload:
            try:
                archive = open_zip(data, name, budget)
            except ArchiveError as exc:
                notes.append(f"refused: {exc}")
                continue
            kept.extend(content for _, content in archive)
            notes.extend(f"skipped {member}: {reason}" for member, reason in archive.skipped)
        return len(kept), sum(map(len, kept)), notes

    return new


def _app_path(model: str) -> tuple[Callable[[Upload], str], Callable[[Upload], str]]:
    """(scan, request) measurers through the app's own path, after one warm analysis (see the docstring)."""
    from benchmarks.samples import encode, synthetic_slice
    from core.archive import ArchiveError, UploadBudget, is_zip, open_zip
    from core.explain import overlay
    from core.models import load_model
    from core.pipeline import Refusal, analyse, predict_uploads
    from core.preprocess import display_rgb
    from core.tasks import get_task

    classifier = load_model(get_task(model))

    def scan(upload: Upload) -> str:
        name, data = upload[0]
        outcome = analyse(classifier, data, name)
        if isinstance(outcome, Refusal):
            return f"refused: {outcome.reason}"
        heatmap = outcome.heatmap(outcome.prediction.label)
        outcome.faithfulness(outcome.prediction.label)
        overlay(display_rgb(outcome.scan), heatmap.placed, 0.45, "jet", 0.2)
        height, width = outcome.scan.shape
        probabilities = outcome.prediction.probabilities
        return (f"accepted {width} x {height}: {outcome.prediction.label}, guard {outcome.prediction.guard.outcome}"
                + ("; NaN probabilities" if not np.isfinite(probabilities).all() else ""))

    def request(upload: Upload) -> str:
        budget = UploadBudget()
        whole: list[str] = []  # archives refused as a whole (their directory over the budget, unreadable)

        def members():
            for name, data in upload:
                if not is_zip(data):
                    over = budget.admit(len(data))
                    yield name, data if over is None else Refusal("rejected", over)
                    continue
                try:
                    archive = open_zip(data, name, budget)
                except ArchiveError as exc:
                    whole.append(str(exc))
                    yield name, Refusal("rejected", str(exc))
                    continue
                for member in archive.members():
                    yield member.name, member.data if member.data is not None else Refusal("rejected", member.reason or "")

        rows = [outcome for _, outcome in predict_uploads(classifier, members())]
        refused = [r for r in rows if isinstance(r, Refusal)]
        if len(whole) == len(upload):
            return f"refused: {whole[0]}"  # every archive refused as a whole
        outcome = f"{len(rows) - len(refused)} predicted, {len(refused)} refused or skipped"
        return outcome + (f"; first: {refused[0].reason}" if refused else "")

    warm = encode(synthetic_slice(64))
    scan([("warm.png", warm)])
    request([("warm.png", warm)])
    return scan, request


def child(kind: str, through: str, model: str) -> int:
    """Read the pickled upload from stdin, measure reading it (or the app's work on it), print one JSON line."""
    upload: Upload = pickle.load(sys.stdin.buffer)
    from benchmarks.samples import ct_dicom, encode, synthetic_slice
    from core.imaging import ScanError, read_scan

    read_scan(encode(synthetic_slice(64)), "warm.png")
    read_scan(ct_dicom(64), "warm.dcm")
    if through == "app":
        app_scan, app_request = _app_path(model)
        measure = app_request if kind == "request" else app_scan
    else:
        unpack = _archive_reader() if kind == "request" else None

        def measure(upload: Upload) -> str:
            if unpack is not None:
                members, size, notes = unpack(upload)
                if not members and notes and all(note.startswith("refused") for note in notes):
                    return notes[0]  # every archive refused as a whole
                found = f"kept {members} member(s), {size / MB:.0f} MB"
                return found + (f"; {len(notes)} note(s), first: {notes[0]}" if notes else "")
            name, data = upload[0]
            scan = read_scan(data, name)
            return f"accepted {scan.shape[1]} x {scan.shape[0]}" + (
                "; NaN pixels" if not np.isfinite(scan.pixels).all() else "")

    gc.collect()
    try:  # an idle server has handed back what its last request freed (core.threads, after a second)
        from core.allocator import release_free_memory
    except ImportError:  # a checkout from before it
        pass
    else:
        time.sleep(1.5 if through == "app" else 0.0)  # the slot's own timer fires first (one release per idle time)
        release_free_memory()
    _reset_peak()
    idle = _status_mb("VmRSS")
    start = time.perf_counter()
    try:
        outcome = measure(upload)
    except ScanError as exc:
        outcome = f"refused: {exc}"
    except (MemoryError, RecursionError, Exception) as exc:  # noqa: BLE001 - the old readers' crashes are the finding
        outcome = f"CRASH {type(exc).__name__}"
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM") - idle
    print(json.dumps({"seconds": round(seconds, 3), "peak_mb": round(peak, 1), "idle_mb": round(idle, 1),
                      "outcome": outcome[:300]}))
    return 0


# ---------------------------------------------------------------- parent side


def run_case(name: str, limit_gb: float, timeout: float, through: str = "reader", model: str = "brain_mri") -> dict:
    kind, build, expected = CASES[name]
    upload = build()
    size = sum(len(data) for _, data in upload)

    def limit() -> None:
        cap = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        result = subprocess.run([sys.executable, "-m", "benchmarks.hostile", "--child", kind, "--through", through,
                                 "--model", model],
                                input=pickle.dumps(upload), capture_output=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"case": name, "bytes": size, "expected": expected, "seconds": timeout, "peak_mb": None,
                "outcome": f"TIMEOUT after {timeout:.0f} s"}
    lines = result.stdout.decode().strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = result.stderr.decode().strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        return {"case": name, "bytes": size, "expected": expected, "seconds": None, "peak_mb": None,
                "outcome": f"CRASH (process): {tail[0][:200]}"}
    return {"case": name, "bytes": size, "expected": expected, **json.loads(lines[-1])}


def verdict(row: dict) -> str:
    """'ok' when the outcome is the expected one within its memory target, else what is wrong."""
    outcome, peak = row["outcome"], row["peak_mb"]
    if peak is None:
        return "failed"
    expected = row["expected"]
    if expected == "accepted":
        good = outcome.startswith("accepted") and "NaN" not in outcome
        return "ok" if good and peak < ACCEPTED_TARGET_MB else "over target" if good else "wrong outcome"
    if expected == "refused":
        good = outcome.startswith("refused")
        return "ok" if good and peak < REFUSED_TARGET_MB else "over target" if good else "wrong outcome"
    return "ok" if peak < ACCEPTED_TARGET_MB else "over target"  # budget: what one request may hold


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time and peak memory of reading hostile uploads.")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--through", choices=("reader", "app"), default="reader",
                        help="measure the reader alone, or the app's path (model, heatmap, batch streaming)")
    parser.add_argument("--model", default="brain_mri", help="the model the app path runs")
    parser.add_argument("--limit-gb", type=float, default=None,
                        help="address-space limit of each child process (default 8, 12 for --through app)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a case is stopped")
    parser.add_argument("--json", action="store_true", help="print one JSON object per case")
    parser.add_argument("--child", choices=("scan", "request"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.child:
        return child(args.child, args.through, args.model)
    limit_gb = args.limit_gb if args.limit_gb is not None else (12.0 if args.through == "app" else 8.0)
    names = [n.strip() for n in args.cases.split(",") if n.strip()] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; one of {', '.join(CASES)}")
    if not args.json:
        print(f"through the {args.through}{' (' + args.model + ')' if args.through == 'app' else ''}: targets: accepted "
              f"< {ACCEPTED_TARGET_MB:.0f} MB, refused < {REFUSED_TARGET_MB:.0f} MB above the idle process")
        print(f"{'case':26} {'upload':>9} {'seconds':>8} {'peak MB':>8}  {'verdict':13} outcome")
    for name in names:
        row = run_case(name, limit_gb, args.timeout, args.through, args.model)
        row["verdict"] = verdict(row)
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
        peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
        print(f"{name:26} {row['bytes'] / MB:>7.1f}MB {seconds:>8} {peak:>8}  {row['verdict']:13} {row['outcome']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
