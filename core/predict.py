"""Calibrated predictions, and the `python -m core.predict` command.

Usage:
    python -m core.predict --task brain_mri scan1.png scan2.dcm

prints one JSON object per file and line: file, status (ok / rejected / error), reason,
prediction, probabilities, uncertain, and for a multi-label model findings (the probability of
each finding) and present (the findings at or above their card thresholds). It never stops on a bad file; the exit code is 0 unless the
command line itself is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.calibration import output_probabilities
from core.cards import ModelCard
from core.imaging import MAX_UPLOAD_BYTES, Scan, ScanError, read_scan
from core.guard import check_tags, explain_flag
from core.models import Classifier, WeightsError, head_module, load_model
from core.preprocess import model_input
from core.tasks import TASKS, TaskSpec, get_task, positive_classes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One independent finding of a multi-label model, for one scan.

    Attributes:
        key: The finding's key (a manifest column).
        title: Its human name.
        probability: Calibrated probability (sigmoid of its logit / its temperature).
        threshold: The card's operating threshold for it, chosen on validation.
    """

    key: str
    title: str
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        """At or above its threshold."""
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Prediction:
    """A calibrated prediction for one scan.

    Attributes:
        labels: Class keys in model order.
        probabilities: float64 (C,) calibrated probabilities (softmax of logits / T).
        index: Index of the decided class.
        threshold: Operating threshold on the positive class (or group), where the model has one.
        positive: The thresholded class, or "+"-joined group of classes, where the model has one.
        flag: Why the wrong-input guard thinks the scan does not belong to this model, or None.
        margin: Half-width of the card's indeterminate band, or None where the card has none.
        findings: The independent findings of a multi-label model (empty for other models).
    """

    labels: tuple[str, ...]
    probabilities: np.ndarray
    index: int
    threshold: float | None = None
    positive: str | None = None
    flag: str | None = None
    margin: float | None = None
    findings: tuple[Finding, ...] = ()

    @property
    def label(self) -> str:
        """The decided class key."""
        return self.labels[self.index]

    def as_dict(self) -> dict[str, float]:
        """{label: probability}."""
        return {label: float(p) for label, p in zip(self.labels, self.probabilities)}

    @property
    def uncertain(self) -> bool:
        """True inside the indeterminate band, where the output should read "uncertain", not a class."""
        if self.margin is None:
            return False
        return bool(decision_margin(self.probabilities[None], self.labels, self.positive, self.threshold)[0] < self.margin)


def decision_margin(probabilities: np.ndarray, labels: tuple[str, ...], positive: str | None,
                    threshold: float | None) -> np.ndarray:
    """How far each row is from changing its decision, in probability units.

    With an operating threshold: |P(positive) - threshold|; without one: the top probability
    minus the second. A row whose margin is below the card's indeterminate margin is uncertain.

    Args:
        probabilities: float (N, C).

    Returns:
        float64 (N,).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if positive is not None and threshold is not None:
        return np.abs(positive_score(probabilities, labels, positive) - threshold)
    top = np.sort(probabilities, axis=1)
    return top[:, -1] - top[:, -2]


def positive_mask(labels: Sequence[str], positive: str) -> np.ndarray:
    """bool (C,): the classes a thresholded `positive` (one class, or several joined by "+") covers.

    Raises:
        ValueError: If it names a class not in `labels`.
    """
    members = positive_classes(positive)
    unknown = [m for m in members if m not in labels]
    if unknown:
        raise ValueError(f"positive {positive!r} names unknown classes {unknown}; classes are {', '.join(labels)}")
    return np.array([label in members for label in labels])


def positive_score(probabilities: np.ndarray, labels: Sequence[str], positive: str) -> np.ndarray:
    """The thresholded probability per row: of the positive class, or the sum over a positive group."""
    return np.asarray(probabilities, dtype=np.float64)[:, positive_mask(labels, positive)].sum(axis=1)


def decide(probabilities: np.ndarray, labels: tuple[str, ...], positive: str | None, threshold: float | None) -> np.ndarray:
    """Class decision per row: at or above the threshold the likeliest positive class, else the
    likeliest other class (plain argmax where the model has no threshold). Works for any number of
    classes, and for a positive group of classes (their summed probability is thresholded).

    Args:
        probabilities: float (N, C).
        labels: Class keys.
        positive: Thresholded class (or "+"-joined group), or None for plain argmax.
        threshold: Threshold on that class's (or group's) probability.

    Returns:
        int64 (N,) class indices.
    """
    decided = probabilities.argmax(axis=1)
    if positive is not None and threshold is not None:
        mask = positive_mask(labels, positive)
        inside = np.where(mask, probabilities, -np.inf)
        outside = np.where(mask, -np.inf, probabilities)  # below the threshold: the likeliest of the others
        decided = np.where(positive_score(probabilities, labels, positive) >= threshold, inside.argmax(axis=1),
                           outside.argmax(axis=1))
    return decided.astype(np.int64)


def card_probabilities(logits: np.ndarray, spec: TaskSpec, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated class probabilities (N, C) and finding probabilities (N, F) of network outputs, per the card."""
    temperatures = [float(card.findings[name]["temperature"]) for name in spec.findings]
    return output_probabilities(logits, spec.num_classes, card.temperature, temperatures)


def forward(classifier: Classifier, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs (N, C + F) and pooled penultimate features (N, D) in one pass, under the model's lock."""
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


BATCH_SIZE = 16  # the fastest batch for MobileNetV2 on the 2-core CPU (`python -m benchmarks`)


def predict_batch(classifier: Classifier, batch: torch.Tensor, scans: Sequence[Scan | None] | None = None) -> list[Prediction]:
    """Predictions for a batch of normalised inputs in one forward pass, with the guard's verdicts.

    Args:
        classifier: A loaded model.
        batch: float32 (N, 3, S, S) model inputs.
        scans: The scans they were made from, for the DICOM tag check (optional; None entries allowed).

    Returns:
        N predictions, in input order.
    """
    logits, features = forward(classifier, batch.contiguous(memory_format=torch.channels_last))
    card, spec = classifier.card, classifier.spec
    probs, finding_probs = card_probabilities(logits, spec, card)
    decided = decide(probs, spec.labels, card.positive, card.threshold)
    belonging = classifier.guard.belonging(features) if classifier.guard is not None else None
    scans = list(scans) if scans is not None else [None] * len(probs)
    predictions = []
    for row, scan in enumerate(scans):
        flag = check_tags(scan, spec) if scan is not None else None
        if flag is None and belonging is not None and belonging[row] < classifier.guard.threshold:
            flag = explain_flag(spec, float(belonging[row]))
        findings = tuple(Finding(name, spec.output_title(name), float(finding_probs[row, j]),
                                 float(card.findings[name]["threshold"])) for j, name in enumerate(spec.findings))
        predictions.append(Prediction(spec.labels, probs[row], int(decided[row]), card.threshold, card.positive, flag,
                                      card.indeterminate.get("margin"), findings))
    return predictions


def predict_tensor(classifier: Classifier, tensor: torch.Tensor, scan: Scan | None = None) -> Prediction:
    """Prediction for one normalised input (1, 3, S, S), with the wrong-input guard's verdict.

    Args:
        classifier: A loaded model.
        tensor: The model input.
        scan: The scan it was made from, for the DICOM tag check (optional).
    """
    return predict_batch(classifier, tensor, [scan])[0]


def predict_scan(classifier: Classifier, scan: Scan) -> Prediction:
    """Prediction for a read scan (preprocessed the way the model was trained)."""
    return predict_tensor(classifier, model_input(scan, classifier.spec), scan)


def upload_digest(data: bytes) -> str:
    """Short sha256 of an upload: what logs carry instead of the file or its tags."""
    return short_digest(hashlib.sha256(data).hexdigest())


def short_digest(sha256_hex: str) -> str:
    """The short form (16 hex digits) of a full sha256, as `upload_digest` gives it."""
    return sha256_hex[:16]


def result_row(name: str, prediction: Prediction | None = None, status: str = "ok", reason: str | None = None) -> dict:
    """One output row: file, status (ok / rejected / error), reason, prediction, probabilities, uncertain,
    and where the model has findings, `findings` ({key: probability}) and `present` (keys at or above
    their thresholds).

    `uncertain` is True when an ok prediction falls inside the card's indeterminate band
    (the reason then says so), False outside it, None when there is no prediction.
    """
    row: dict = {"file": name, "status": status, "reason": reason, "prediction": None, "probabilities": None,
                 "uncertain": None}
    if prediction is not None and prediction.flag:
        row.update(status="rejected", reason=f"Not classified: {prediction.flag}.")
    elif prediction is not None:
        row.update(prediction=prediction.label, probabilities=prediction.as_dict(), uncertain=prediction.uncertain)
        if prediction.findings:
            row.update(findings={f.key: f.probability for f in prediction.findings},
                       present=[f.key for f in prediction.findings if f.present])
        if prediction.uncertain:
            row.update(reason=f"uncertain: inside the indeterminate band (+-{prediction.margin:.2f}) "
                                              f"around the decision; the likelier call is {prediction.label}")
    return row


def read_upload(name: str, data: bytes, spec: TaskSpec) -> tuple[Scan, torch.Tensor] | dict:
    """The scan and its model input, or a rejected (or error) row with the reason; never raises."""
    try:
        scan = read_scan(data, Path(name).name)
        return scan, model_input(scan, spec)
    except ScanError as exc:
        logger.info("upload %s rejected for %s", upload_digest(data), spec.key)
        return result_row(name, status="rejected", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the rest; the type is logged, not the file
        logger.error("upload %s failed for %s: %s", upload_digest(data), spec.key, type(exc).__name__)
        return result_row(name, status="error", reason=f"internal error: {type(exc).__name__}")


def predict_uploads(classifier: Classifier, uploads: Iterable[tuple[str, bytes | OSError]],
                    batch_size: int = BATCH_SIZE) -> Iterator[dict]:
    """Result rows for (name, bytes) uploads, in order, readable scans predicted in batches.

    A bad file gives a rejected row (an OSError in place of the bytes: an error row) and
    never stops the rest.
    """
    pending: list[tuple[str, str, Scan, torch.Tensor]] = []

    def flush() -> Iterator[dict]:
        if not pending:
            return
        batch = torch.cat([tensor for *_, tensor in pending])
        predictions = predict_batch(classifier, batch, [scan for _, _, scan, _ in pending])
        for (name, digest, _, _), prediction in zip(pending, predictions):
            logger.info("upload %s -> %s: %s", digest, classifier.spec.key, "flagged" if prediction.flag else prediction.label)
            yield result_row(name, prediction)
        pending.clear()

    for name, data in uploads:
        if isinstance(data, OSError):
            yield from flush()
            yield result_row(name, status="error", reason=f"cannot open the file: {data.strerror or data}")
            continue
        read = read_upload(name, data, classifier.spec)
        if isinstance(read, dict):
            yield from flush()
            yield read
            continue
        pending.append((name, upload_digest(data), *read))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


MAX_ZIP_MEMBERS = 2000


def is_zip(data: bytes) -> bool:
    """True for a ZIP archive (local file header magic)."""
    return data[:4] == b"PK\x03\x04"


def unpack_zip(name: str, data: bytes, max_members: int = MAX_ZIP_MEMBERS,
               max_total: int = MAX_UPLOAD_BYTES) -> Iterator[tuple[str, bytes]]:
    """The files inside a ZIP upload as (archive name/member name, bytes), in archive order.

    Folders, macOS resource forks (__MACOSX/, ._*) and hidden files are skipped; nested
    archives are passed on as files (and refused by the reader). Everything stays in memory.

    Raises:
        ValueError: For an unreadable or encrypted archive, too many members, or more than
            `max_total` bytes once unpacked (a ZIP bomb), with a plain reason.
    """
    import io
    import zipfile

    archive_name = Path(name).name
    too_big = f"{archive_name} unpacks to more than {max_total // 2**20} MB; split it into smaller archives"
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()
                   and not any(part.startswith((".", "__MACOSX")) for part in Path(m.filename).parts)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ValueError(f"{archive_name} is not a readable ZIP archive ({exc})") from None
    if len(members) > max_members:
        raise ValueError(f"{archive_name} holds {len(members)} files; at most {max_members} per archive")
    if sum(m.file_size for m in members) > max_total:
        raise ValueError(too_big)
    if any(m.flag_bits & 0x1 for m in members):
        raise ValueError(f"{archive_name} is encrypted; upload an archive without a password")
    total = 0
    for member in members:
        try:
            with archive.open(member) as handle:
                content = handle.read(max_total - total + 1)  # the sizes in the header may lie
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise ValueError(f"{archive_name}: {member.filename} cannot be unpacked ({exc})") from None
        total += len(content)
        if total > max_total:
            raise ValueError(too_big)
        yield f"{archive_name}/{member.filename}", content


def _read_files(paths: Iterable[Path]) -> Iterator[tuple[str, bytes]]:
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
        for row in predict_uploads(classifier, _read_files(args.files), args.batch_size):
            print(json.dumps(row), flush=True)
    except Exception:  # noqa: BLE001 - say so in one line, not a traceback, then stop
        logger.exception("unexpected failure")
        parser.exit(1, "error: internal error; see the log\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
