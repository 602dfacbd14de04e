"""The analysis pipeline: upload bytes -> a typed `Analysis`, the same for every front end.

Streamlit pages, `python -m core.predict`, the HTTP API and the study reader all call it:

    outcome = analyse(classifier, data, filename)        # Analysis, or Refusal with the reader's reason
    outcome.prediction                                   # calibrated call, band, findings, guard verdict
    outcome.heatmap("glioma", "Grad-CAM")                # on demand, cached; placed in scan coordinates
    outcome.faithfulness("glioma", "Grad-CAM")           # ROAD score of that heatmap, cached
    outcome.stability()                                  # test-time augmentation spread, cached

An `Analysis` keeps what its page shows (the scan, the prepared input, the prediction, the heatmaps
computed so far); nothing of it is written anywhere. Logs carry the upload's short hash, the model
and the outcome, never pixels, file names or tags.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from core.decision import Prediction, predict
from core.explain import DEFAULT_METHOD, METHODS, Faithfulness, compute_cam, road_score
from core.guard import TagCheck, read_tags
from core.imaging import Scan, ScanError, read_scan
from core.models import Classifier
from core.preprocess import EvalPreset, ModelInput
from core.uncertainty import Spread, tta_spread
from core.vocabulary import PLANES, body_part_words, known_body_part, known_modality, modality_words

logger = logging.getLogger(__name__)

BATCH_SIZE = 16  # the fastest batch for MobileNetV2 on the 2-core CPU (`python -m benchmarks`)


def short_digest(sha256_hex: str) -> str:
    """The short form (16 hex digits) of a full sha256: what logs, keys and reports carry."""
    return sha256_hex[:16]


def upload_digest(data: bytes) -> str:
    """Short sha256 of an upload: what logs carry instead of the file or its tags."""
    return short_digest(hashlib.sha256(data).hexdigest())


# Scan facts are told in the fixed vocabulary of `core.vocabulary`: a tag value outside it is never shown
# (a BodyPartExamined of "DOE^JANE MRN-0042" reads "another body part"), so no untrusted text reaches a page
# or a report.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "MPO"})


def scan_facts(scan: Scan) -> list[str]:
    """What was read from a file, as short phrases in a fixed vocabulary (safe for any page or report)."""
    height, width = scan.shape
    facts = [f"{width} x {height} px"]
    if scan.kind == "dicom":
        facts.append("DICOM")
        modality = modality_words(scan.info.get("Modality"))
        if modality:
            facts.append(f"modality {modality}" if known_modality(modality) else modality)
        body_part = body_part_words(scan.info.get("BodyPartExamined"))
        if body_part:
            facts.append(f"body part {body_part}" if known_body_part(body_part) else body_part)
        plane = scan.info.get("orientation")
        if plane in PLANES:
            facts.append(f"{plane} plane")
        syntax = str(scan.info.get("TransferSyntax", ""))
        if syntax:
            facts.append(_syntax_name(syntax))
    else:
        fmt = str(scan.info.get("format", "")).upper()
        facts.append(fmt if fmt in IMAGE_FORMATS else "IMAGE")
    return facts


def _syntax_name(value: str) -> str:
    """A transfer syntax's name from pydicom's UID dictionary, whether given as a UID or a name; else "unknown"."""
    from pydicom.uid import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[1] == "Transfer Syntax" and value in (uid, entry[0]):
            return entry[0]
    return "unknown transfer syntax"


def internal_error(digest: str) -> str:
    """The reader's message for a failure on the server's side: plain words and the upload's short hash (which the
    log line carries too), never the library's text."""
    return (f"Something went wrong on the server while analysing this file (reference {digest or 'none'}); the file "
            "itself may be fine. Try again, or try another export of the image.")


def failure_detail(exc: BaseException) -> str:
    """What a log line says of an unexpected exception: its type and where it was raised (file:line, function).

    Not its message: library messages can quote the values they choked on, and those come from the upload.
    """
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    parts = last.filename.replace("\\", "/").split("/")
    where = "/".join(parts[-2:])  # package/module.py: no server path
    return f"{type(exc).__name__} at {where}:{last.lineno} in {last.name}"


@dataclass(frozen=True)
class Refusal:
    """An upload that gave no analysis.

    Attributes:
        status: "rejected" (the file cannot be read, or is not a scan this app reads; the reason is
            for the reader) or "error" (something failed here; the reason says so in plain words, with the
            upload's short hash that the log line also carries).
        reason: The message for the reader.
        digest: The upload's short hash.
        kind: For a rejected file, why, for a machine (`core.imaging.ScanError.kind`): "unreadable",
            "too_large" or "unsupported_format" (the HTTP API's 400, 413 or 415).
    """

    status: str
    reason: str
    digest: str = ""
    kind: str = "unreadable"


@dataclass(frozen=True)
class Heatmap:
    """One class activation map of one output, by one method.

    Attributes:
        target: The output explained (a class or finding key).
        method: The CAM method.
        model_map: float32 (S, S) in [0, 1] over the model input (what ROAD perturbs).
        placed: float32 (H, W) in [0, 1] over the scan: 0 outside the region the model saw.
        outside: bool (H, W): the scan pixels the model never saw (outside a crop).
    """

    target: str
    method: str
    model_map: np.ndarray
    placed: np.ndarray
    outside: np.ndarray

    @property
    def empty(self) -> bool:
        """Whether the method found no evidence for the target in this image."""
        return float(self.model_map.max()) <= 0.0


@dataclass(eq=False)
class Analysis:
    """One upload through one model: what a page, the command line or the API shows.

    Heatmaps, faithfulness and the stability check are computed on first request and kept; each
    computation runs once even when two threads ask at once.
    """

    classifier: Classifier
    sha256: str
    scan: Scan
    input: ModelInput
    prediction: Prediction
    _heatmaps: dict[tuple[str, str], Heatmap] = field(default_factory=dict, repr=False)
    _faithfulness: dict[tuple[str, str], Faithfulness] = field(default_factory=dict, repr=False)
    _spread: Spread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def digest(self) -> str:
        """The upload's short hash."""
        return short_digest(self.sha256)

    @property
    def key(self) -> str:
        """The model's registry key."""
        return self.classifier.spec.key

    def computed(self, kind: str) -> int:
        """How many heatmaps ("heatmaps"), faithfulness scores ("faithfulness") or stability checks ("stability")
        this analysis has computed so far."""
        with self._lock:
            return {"heatmaps": len(self._heatmaps), "faithfulness": len(self._faithfulness),
                    "stability": int(self._spread is not None)}[kind]

    def has_heatmap(self, target: str, method: str) -> bool:
        """Whether that heatmap was computed already (the page shows a spinner otherwise)."""
        with self._lock:
            return (target, method) in self._heatmaps

    def heatmap(self, target: str | None = None, method: str = DEFAULT_METHOD) -> Heatmap:
        """The heatmap of an output (default: the call) by a CAM method, computed once.

        Raises:
            ValueError: For an unknown output or method.
        """
        spec = self.classifier.spec
        target = target or self.prediction.label
        index = spec.output_index(target)
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; one of {', '.join(METHODS)}")
        with self._lock:
            cached = self._heatmaps.get((target, method))
        if cached is None:
            model_map = compute_cam(self.classifier, self.input.tensor, index, method)
            cached = Heatmap(target, method, model_map, self.input.place(model_map), self.input.outside())
            with self._lock:
                cached = self._heatmaps.setdefault((target, method), cached)
            logger.info("upload %s: %s of %s for %s", self.digest, method, target, self.key)
        return cached

    def faithfulness(self, target: str | None = None, method: str = DEFAULT_METHOD) -> Faithfulness:
        """ROAD faithfulness of that heatmap (`core.explain.road_score`), computed once."""
        target = target or self.prediction.label
        with self._lock:
            cached = self._faithfulness.get((target, method))
        if cached is None:
            heatmap = self.heatmap(target, method)
            cached = road_score(self.classifier, self.input.tensor, heatmap.model_map,
                                self.classifier.spec.output_index(target))
            with self._lock:
                cached = self._faithfulness.setdefault((target, method), cached)
        return cached

    def stability(self) -> Spread:
        """Test-time augmentation: the spread of each class's probability over augmented views, computed once."""
        with self._lock:
            cached = self._spread
        if cached is None:
            cached = tta_spread(self.classifier, self.input)
            with self._lock:
                self._spread = self._spread or cached
                cached = self._spread
        return cached

    @property
    def stability_checked(self) -> Spread | None:
        """The stability check's result if it was run, else None (never runs it)."""
        with self._lock:
            return self._spread

    def faithfulness_if_measured(self, target: str, method: str) -> Faithfulness | None:
        """The faithfulness score of that heatmap if it was measured, else None (never measures it)."""
        with self._lock:
            return self._faithfulness.get((target, method))


def prepare(data: bytes, filename: str | None, classifier: Classifier) -> tuple[Scan, ModelInput] | Refusal:
    """Read an upload and make its model input; a Refusal with the reason for a bad file. Never raises."""
    digest = upload_digest(data) if isinstance(data, (bytes, bytearray)) else ""
    try:
        scan = read_scan(data, filename)
        return scan, EvalPreset(classifier.spec)(scan)
    except ScanError as exc:
        logger.info("upload %s rejected for %s", digest, classifier.spec.key)
        return Refusal("rejected", str(exc), digest, exc.kind)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the rest; the type is logged, not the file
        logger.error("upload %s failed for %s: %s", digest, classifier.spec.key, failure_detail(exc))
        return Refusal("error", internal_error(digest), digest)


def analyse(classifier: Classifier, data: bytes, filename: str | None = None) -> Analysis | Refusal:
    """Read, prepare and predict one upload.

    Args:
        classifier: A loaded model.
        data: The uploaded file.
        filename: Its name (a hint for DICOM without a preamble; never logged).

    Returns:
        The analysis, or a Refusal whose reason is written for the reader.
    """
    prepared = prepare(data, filename, classifier)
    if isinstance(prepared, Refusal):
        return prepared
    scan, model_input = prepared
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        prediction = predict(classifier, model_input.tensor, [read_tags(scan, classifier.spec)])[0]
    except Exception as exc:  # noqa: BLE001 - the caller must survive any file; the type is logged, not the file
        logger.error("upload %s failed for %s: %s", short_digest(sha256), classifier.spec.key, failure_detail(exc))
        return Refusal("error", internal_error(short_digest(sha256)), short_digest(sha256))
    logger.info("upload %s -> %s: %s", short_digest(sha256), classifier.spec.key,
                prediction.guard.outcome if prediction.guard.refused else prediction.label)
    return Analysis(classifier, sha256, scan, model_input, prediction)


@dataclass(frozen=True)
class Answer:
    """A prediction without the scan: what the batch and the command line keep per file (memory stays flat)."""

    digest: str
    prediction: Prediction


def predict_uploads(classifier: Classifier, uploads: Iterable[tuple[str, bytes | OSError | Refusal]],
                    batch_size: int = BATCH_SIZE) -> Iterator[tuple[str, Answer | Refusal]]:
    """(name, Answer or Refusal) for each upload, in order; readable scans predicted in batches.

    Only the model inputs of one batch are held at a time (each scan is dropped once prepared), and
    the uploads are read as they are consumed, so a generator streams. A bad file gives a Refusal
    (an OSError in place of the bytes: an error; a Refusal in place of the bytes, e.g. an archive
    member that was not unpacked: passed on) and never stops the rest.
    """
    pending: list[tuple[str, str, torch.Tensor, TagCheck]] = []

    def flush() -> Iterator[tuple[str, Answer | Refusal]]:
        if not pending:
            return
        batch = torch.cat([tensor for _, _, tensor, _ in pending])
        try:
            predictions = predict(classifier, batch, [reason for *_, reason in pending])
        except Exception as exc:  # noqa: BLE001 - a failed batch is reported per file, not raised
            logger.error("batch of %d failed for %s: %s", len(pending), classifier.spec.key, failure_detail(exc))
            for name, digest, _, _ in pending:
                yield name, Refusal("error", internal_error(digest), digest)
        else:
            for (name, digest, _, _), prediction in zip(pending, predictions):
                logger.info("upload %s -> %s: %s", digest, classifier.spec.key,
                            prediction.guard.outcome if prediction.guard.refused else prediction.label)
                yield name, Answer(digest, prediction)
        pending.clear()

    for name, data in uploads:
        if isinstance(data, OSError):
            yield from flush()
            yield name, Refusal("error", f"cannot open the file: {data.strerror or type(data).__name__}")
            continue
        if isinstance(data, Refusal):
            yield from flush()
            yield name, data
            continue
        prepared = prepare(data, name, classifier)
        if isinstance(prepared, Refusal):
            yield from flush()
            yield name, prepared
            continue
        scan, model_input = prepared
        pending.append((name, upload_digest(data), model_input.tensor, read_tags(scan, classifier.spec)))
        del scan, model_input, prepared
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def predict_scans(classifier: Classifier, scans: Iterable[Scan], batch_size: int = BATCH_SIZE) -> list[Prediction]:
    """Predictions for scans already read (the slices of a study, a test's synthetic scans), in batches."""
    preset, out = EvalPreset(classifier.spec), []
    pending: list[tuple[torch.Tensor, TagCheck]] = []
    for scan in scans:
        pending.append((preset(scan).tensor, read_tags(scan, classifier.spec)))
        if len(pending) >= batch_size:
            out += predict(classifier, torch.cat([t for t, _ in pending]), [r for _, r in pending])
            pending.clear()
    if pending:
        out += predict(classifier, torch.cat([t for t, _ in pending]), [r for _, r in pending])
    return out


def predict_scan(classifier: Classifier, scan: Scan) -> Prediction:
    """The prediction for one scan already read."""
    return predict_scans(classifier, [scan])[0]


def result_row(name: str, outcome: Analysis | Answer | Refusal) -> dict:
    """The JSON row of one file (the command line's output, the API's body, the batch table's source).

    Fields: file, status (ok / rejected / error), reason, prediction (class key), call (what the
    page headlines: the class, or a positive group's name, or "uncertain"), probabilities, uncertain,
    guard (outcome, score, threshold, borderline); for a multi-label model also findings
    ({key: probability}), present (keys called present) and unreliable ({key: why}).

    `uncertain` is True when an ok prediction falls inside the card's indeterminate band, False
    outside it, None when there is no prediction. A borderline scan is ok with a warning in `reason`.
    """
    row: dict = {"file": name, "status": "ok", "reason": None, "prediction": None, "call": None, "probabilities": None,
                 "uncertain": None, "guard": None}
    if isinstance(outcome, Refusal):
        row.update(status=outcome.status, reason=outcome.reason)
        return row
    prediction = outcome.prediction
    guard = prediction.guard
    row["guard"] = {"outcome": guard.outcome, "score": guard.score, "threshold": guard.threshold,
                    "borderline": guard.borderline}
    if guard.refused:
        row.update(status="rejected", reason=f"Not classified: {guard.reason}")
        return row
    name_called, _ = prediction.headline()
    row.update(prediction=prediction.label, call="uncertain" if prediction.uncertain else name_called,
               probabilities=prediction.as_dict(), uncertain=prediction.uncertain)
    if prediction.findings:
        row.update(findings={f.key: f.probability for f in prediction.findings},
                   present=[f.key for f in prediction.findings if f.present],
                   unreliable={f.key: f.unreliable for f in prediction.findings if f.unreliable})
    reasons = []
    if prediction.uncertain:
        reasons.append(f"uncertain: inside the indeterminate band around the decision; the likelier call is "
                       f"{name_called}")
    if guard.warned:
        reasons.append(f"borderline: {guard.reason}")
    row["reason"] = "; ".join(reasons) or None
    return row
