"""`python -m core.predict`: predict files with a bundled model, one JSON line per file.

Usage:
    python -m core.predict --task brain_mri scan1.png scan2.dcm

prints one JSON object per file and line (`core.pipeline.result_row`): file, status (ok / rejected /
error), reason, prediction, call, probabilities, uncertain, guard, and for a multi-label model
findings, present and unreliable. It never stops on a bad file; the exit code is 0 unless the
command line itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.models import WeightsError, load_model
from core.pipeline import BATCH_SIZE, predict_uploads, result_row
from core.tasks import TASKS, get_task

logger = logging.getLogger(__name__)


def _read_files(paths: Iterable[Path]) -> Iterator[tuple[str, bytes | OSError]]:
    for path in paths:
        try:
            yield str(path), path.read_bytes()
        except OSError as exc:
            yield str(path), exc


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict scans with a bundled SecondLook model.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key of the model")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/<task>.safetensors)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="scans per forward pass")
    parser.add_argument("files", nargs="+", type=Path, help="PNG/JPEG/WebP/TIFF/BMP or DICOM files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    spec = get_task(args.task)
    try:
        classifier = load_model(spec, args.weights)
    except (WeightsError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    try:
        for name, outcome in predict_uploads(classifier, _read_files(args.files), args.batch_size):
            print(json.dumps(result_row(name, outcome)), flush=True)
    except Exception:  # noqa: BLE001 - say so in one line, not a traceback, then stop
        logger.exception("unexpected failure")
        parser.exit(1, "error: internal error; see the log\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
