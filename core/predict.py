"""Calibrated predictions, and the `python -m core.predict` command.

Usage:
    python -m core.predict --task brain_mri scan1.png scan2.dcm

prints one JSON object per file and line: file, status (ok / rejected / error), reason,
prediction, probabilities. It never stops on a bad file; the exit code is 0 unless the
command line itself is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.calibration import softmax
from core.imaging import Scan, ScanError, read_scan
from core.guard import check_tags, explain_flag
from core.models import Classifier, WeightsError, head_module, load_model
from core.preprocess import model_input
from core.tasks import TASKS, get_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """A calibrated prediction for one scan.

    Attributes:
        labels: Class keys in model order.
        probabilities: float64 (C,) calibrated probabilities (softmax of logits / T).
        index: Index of the decided class.
        threshold: Operating threshold on the positive class, where the model has one.
        positive: The thresholded class, where the model has one.
        flag: Why the wrong-input guard thinks the scan does not belong to this model, or None.
    """

    labels: tuple[str, ...]
    probabilities: np.ndarray
    index: int
    threshold: float | None = None
    positive: str | None = None
    flag: str | None = None

    @property
    def label(self) -> str:
        """The decided class key."""
        return self.labels[self.index]

    def as_dict(self) -> dict[str, float]:
        """{label: probability}."""
        return {label: float(p) for label, p in zip(self.labels, self.probabilities)}


def decide(probabilities: np.ndarray, labels: tuple[str, ...], positive: str | None, threshold: float | None) -> np.ndarray:
    """Class decision per row: the positive class at or above its threshold, else argmax.

    Args:
        probabilities: float (N, C).
        labels: Class keys.
        positive: Thresholded class, or None for plain argmax.
        threshold: Threshold on that class's probability.

    Returns:
        int64 (N,) class indices.
    """
    decided = probabilities.argmax(axis=1)
    if positive is not None and threshold is not None and len(labels) == 2:
        pos = labels.index(positive)
        decided = np.where(probabilities[:, pos] >= threshold, pos, 1 - pos)
    return decided.astype(np.int64)


def forward(classifier: Classifier, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and pooled penultimate features (N, D) in one pass, under the model's lock."""
    captured: list[torch.Tensor] = []

    def keep_input(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        features = inputs[0]
        captured.append(features.mean(dim=(2, 3)) if features.ndim == 4 else features.flatten(1))

    with classifier.lock, torch.inference_mode():
        handle = head_module(classifier.module).register_forward_pre_hook(keep_input)
        try:
            logits = classifier.module(batch)
        finally:
            handle.remove()
    return logits.float().cpu().numpy(), captured[0].float().cpu().numpy()


def predict_tensor(classifier: Classifier, tensor: torch.Tensor, scan: Scan | None = None) -> Prediction:
    """Prediction for one normalised input (1, 3, S, S), with the wrong-input guard's verdict.

    Args:
        classifier: A loaded model.
        tensor: The model input.
        scan: The scan it was made from, for the DICOM tag check (optional).
    """
    logits, features = forward(classifier, tensor)
    probs = softmax(logits, classifier.card.temperature)
    card = classifier.card
    index = int(decide(probs, classifier.spec.labels, card.positive, card.threshold)[0])
    flag = check_tags(scan, classifier.spec) if scan is not None else None
    if flag is None and classifier.guard is not None:
        belonging = float(classifier.guard.belonging(features)[0])
        if belonging < classifier.guard.threshold:
            flag = explain_flag(classifier.spec, belonging)
    return Prediction(classifier.spec.labels, probs[0], index, card.threshold, card.positive, flag)


def predict_scan(classifier: Classifier, scan: Scan) -> Prediction:
    """Prediction for a read scan (preprocessed the way the model was trained)."""
    return predict_tensor(classifier, model_input(scan, classifier.spec), scan)


def upload_digest(data: bytes) -> str:
    """Short sha256 of an upload: what logs carry instead of the file or its tags."""
    return hashlib.sha256(data).hexdigest()[:16]


def predict_file(classifier: Classifier, path: Path) -> dict:
    """One result row for a file: never raises for a bad file."""
    row: dict = {"file": str(path), "status": "error", "reason": None, "prediction": None, "probabilities": None}
    try:
        data = path.read_bytes()
    except OSError as exc:
        row["reason"] = f"cannot open the file: {exc.strerror or exc}"
        return row
    try:
        scan = read_scan(data, path.name)
    except ScanError as exc:
        row.update(status="rejected", reason=str(exc))
        logger.info("upload %s rejected for %s", upload_digest(data), classifier.spec.key)
        return row
    prediction = predict_scan(classifier, scan)
    if prediction.flag:
        row.update(status="rejected", reason=f"Not classified: {prediction.flag}.")
        logger.info("upload %s flagged for %s", upload_digest(data), classifier.spec.key)
        return row
    row.update(status="ok", prediction=prediction.label, probabilities=prediction.as_dict())
    logger.info("upload %s -> %s: %s", upload_digest(data), classifier.spec.key, prediction.label)
    return row


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict scans with a bundled SecondLook model.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key of the model")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/<task>.safetensors)")
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
    for path in args.files:
        try:
            row = predict_file(classifier, path)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
            logger.exception("unexpected failure on one file")
            row = {"file": str(path), "status": "error", "reason": f"internal error ({type(exc).__name__})",
                   "prediction": None, "probabilities": None}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
