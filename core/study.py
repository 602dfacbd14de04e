"""Whole series through a slice model: per-slice predictions, the study call, key slices, heatmaps on demand.

    study = read_upload([(name, data), ...], spec)           # core.series: grouped, ordered, checked
    outcome = analyse_series(classifier, study, progress=cb)  # the model's default series; StudyAnalysis or Refusal
    outcome.prediction                                        # the study call (a core.decision.Prediction)
    outcome.key_slices, outcome.scores                        # the slices that drive it; per-slice score
    outcome.heatmap(12, "hemorrhage", "Grad-CAM")             # one slice's heatmap, on demand, cached
    rows = study_rows(classifier, data, "study.zip")          # one JSON row per series (CLI, API, batch)

Every slice goes through the slice model in batches through `core.decision.predict` (the one
place predictions are made), with the same 8-bit pixels a single upload of that slice would give
(`Series.window_8bit` in the model's CT window; for other modalities `core.preprocess.eight_bit`
of the slice's `Scan`). The study call aggregates the per-slice score of the thresholded class
(or group) with the card's aggregation and compares it with the card's study threshold
(`study_rule` is the one reader of the card's `study` section, written by `python -m
core.lab.study`). Findings of a multi-label model get study-level probabilities too.

Memory: a `StudyAnalysis` keeps the series (its stored values), the per-slice probabilities and
verdicts, and a handful of per-slice `core.pipeline.Analysis` objects for the slices the reader
looked at (each with its heatmaps); no per-slice float image is kept for the whole series.
Nothing is written to disk; logs carry counts and the upload's short hash, never tags or names.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.archive import ArchiveError, UploadBudget, is_zip, open_zip
from core.cards import ModelCard
from core.decision import Band, Finding, Prediction, band_of, decide, finding_reliability, log_odds, positive_mask
from core.guard import GuardVerdict, read_tags
from core.imaging import MAX_UPLOAD_BYTES, ScanError, parse_dicom
from core.models import Classifier
from core.pipeline import BATCH_SIZE, Analysis, Heatmap, Refusal, short_digest
from core.preprocess import EvalPreset, ModelInput, apply_steps, eight_bit
from core.report import KeySlice, StudyReportContent
from core.series import (
    MAX_MEMBERS,
    MAX_STUDY_BYTES,
    LeftOut,
    Series,
    SeriesChoice,
    Study,
    StudyError,
    read_members,
    upload_kind,
    uploaded_files,
)
from core.series import read_path as read_folder_or_file
from core.tasks import TaskSpec, positive_classes

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- aggregations

AGGREGATIONS: dict[str, str] = {
    "max": "the highest slice score",
    "top_k_mean": "the mean of the k highest slice scores",
    "smoothed_max": "the highest mean over `window` neighbouring slices (in anatomical order)",
    "noisy_or": "1 - the product of (1 - score) over the k highest slice scores",
    "logistic": "a logistic model on pooled slice log-odds (highest, mean of the 3 highest, mean, highest "
                "3-slice mean)",
}
POOLED_FEATURES: tuple[str, ...] = ("max_logit", "top3_logit", "mean_logit", "smoothed3_logit")
DEFAULT_AGGREGATION: tuple[str, dict[str, Any]] = ("top_k_mean", {"k": 3})
KEY_SLICES = 3  # slices marked as key slices (the highest scores), unless the card says otherwise
MAX_SLICE_ANALYSES = 8  # per-slice analyses (scan, model input, heatmaps) a study keeps: the ones looked at last
# A study's own guard verdict: refused when more than this share of its slices is out of range.
GUARD_REFUSED_SHARE = 0.5


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(int(k), scores.size))
    return np.sort(scores)[::-1][:k]


def _smoothed(scores: np.ndarray, window: int) -> np.ndarray:
    """Means over `window` neighbouring slices (all slices where fewer)."""
    window = max(1, int(window))
    if scores.size <= window:
        return np.array([scores.mean()])
    return np.convolve(scores, np.ones(window) / window, mode="valid")


def pooled_features(scores: np.ndarray) -> np.ndarray:
    """The logistic aggregation's inputs (`POOLED_FEATURES`) from slice scores in anatomical order.

    Pooled in log-odds and independent of the slice count, so a 300-slice series and a 30-slice
    one give comparable features.

    Args:
        scores: float (n,) slice scores in [0, 1], n >= 1.

    Returns:
        float64 (4,).
    """
    logits = log_odds(np.asarray(scores, dtype=np.float64))
    return np.array([logits.max(), _top(logits, 3).mean(), logits.mean(), _smoothed(logits, 3).max()])


def aggregate(scores: np.ndarray, name: str, params: Mapping[str, Any] | None = None) -> float:
    """One study score from per-slice scores.

    Args:
        scores: float (n,) per-slice scores in [0, 1] (probability of the thresholded class or
            group), in anatomical order; n >= 1.
        name: One of `AGGREGATIONS`.
        params: "k" (top_k_mean, noisy_or), "window" (smoothed_max), or the logistic's "mean",
            "scale", "weights", "bias" (over `POOLED_FEATURES`).

    Returns:
        The study score in [0, 1].

    Raises:
        ValueError: For an unknown aggregation, missing parameters or no slices.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"aggregation needs at least one slice score (n,), got shape {scores.shape}")
    params = dict(params or {})
    try:
        if name == "max":
            value = scores.max()
        elif name == "top_k_mean":
            value = _top(scores, params["k"]).mean()
        elif name == "smoothed_max":
            value = _smoothed(scores, params["window"]).max()
        elif name == "noisy_or":
            value = 1.0 - np.prod(1.0 - _top(scores, params["k"]))
        elif name == "logistic":
            z = (pooled_features(scores) - np.asarray(params["mean"])) / np.asarray(params["scale"])
            value = 1.0 / (1.0 + math.exp(-float(np.clip(z @ np.asarray(params["weights"]) + params["bias"], -50, 50))))
        else:
            raise ValueError(f"unknown aggregation {name!r}; one of {', '.join(AGGREGATIONS)}")
    except KeyError as exc:
        raise ValueError(f"aggregation {name!r} needs the parameter {exc.args[0]!r}") from None
    return float(np.clip(value, 0.0, 1.0))


def describe_aggregation(name: str, params: Mapping[str, Any], subject: str) -> str:
    """The aggregation in words: "the mean of the 3 highest slice probabilities of hemorrhage"."""
    if name == "max":
        return f"the highest slice probability of {subject}"
    if name == "top_k_mean":
        return f"the mean of the {params['k']} highest slice probabilities of {subject}"
    if name == "smoothed_max":
        return f"the highest mean of {subject} over {params['window']} neighbouring slices"
    if name == "noisy_or":
        return f"1 - the product of (1 - p) over the {params['k']} highest slice probabilities p of {subject}"
    if name == "logistic":
        return (f"a logistic model on pooled slice log-odds of {subject} (highest, mean of the 3 highest, mean, "
                "highest 3-slice mean), fitted on validation patients")
    return name


# ---------------------------------------------------------------- the card's rule


@dataclass(frozen=True)
class FindingRule:
    """How one finding of a multi-label model is called per study.

    Attributes:
        key: The finding's key.
        threshold: Its study threshold (on the highest slice probability).
        unreliable: Why it is never called present (too few patients, weak figures), or None.
        sensitivity: Test-patient sensitivity at the threshold, where measured.
        specificity: Test-patient specificity at the threshold, where measured.
    """

    key: str
    threshold: float
    unreliable: str | None = None
    sensitivity: float | None = None
    specificity: float | None = None


@dataclass(frozen=True, eq=False)
class StudyRule:
    """The study call of one model, as its card defines it (`study_rule` reads it).

    Attributes:
        aggregation: A key of `AGGREGATIONS`.
        params: Its parameters.
        positive: The class, or "+"-joined group, whose per-slice probability is aggregated and
            thresholded; None: no thresholded class (the call is the argmax of the mean slice
            probabilities).
        positive_label: What the group is called in a headline.
        threshold: The study threshold on the aggregated score (None with no positive).
        threshold_rule: How the threshold was chosen, in words.
        band: The study call's indeterminate band, or None.
        key_slices: How many key slices are marked.
        findings: Per finding of a multi-label model, its study rule.
        validated: Whether the call was chosen and measured on patients.
        note: What the reader is told about its validation (or why there is none).
        section: The card's raw section (figures for display).
    """

    aggregation: str
    params: Mapping[str, Any]
    positive: str | None
    positive_label: str | None
    threshold: float | None
    threshold_rule: str
    band: Band | None = None
    key_slices: int = KEY_SLICES
    findings: Mapping[str, FindingRule] = field(default_factory=dict)
    validated: bool = False
    note: str = ""
    section: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """The rule in one sentence, for pages, reports and the card."""
        if self.positive is None:
            return "the class with the highest mean probability over all slices (no study threshold)"
        subject = self.positive_label or self.positive
        return (f"{subject} when {describe_aggregation(self.aggregation, self.params, subject)} is at least "
                f"{self.threshold:.3f}")


def study_rule(card: ModelCard, spec: TaskSpec) -> StudyRule:
    """The study call the card defines: the one place the card's `study` section is read.

    Without a section, the default is the mean of the 3 highest slice scores at the slice
    model's own threshold, marked as not validated per patient.

    Raises:
        ValueError: If the section names an unknown aggregation or class.
    """
    section = dict(getattr(card, "study", None) or {})
    if not section:
        name, params = DEFAULT_AGGREGATION
        positive = card.positive
        return StudyRule(
            aggregation=name, params=params, positive=positive, positive_label=spec.positive_label,
            threshold=card.threshold if positive else None,
            threshold_rule="the slice model's own operating threshold" if positive else "none",
            findings=_finding_rules(card, spec, {}),
            note="This model's card holds no study calibration: the study call was not validated per patient.",
        )
    aggregation = section.get("aggregation") or {}
    name, params = aggregation.get("name"), dict(aggregation.get("params") or {})
    if name not in AGGREGATIONS:
        raise ValueError(f"card {card.key}: unknown study aggregation {name!r}; one of {', '.join(AGGREGATIONS)}")
    positive = section.get("positive")
    if positive is not None:
        positive_mask(spec.labels, positive)  # raises naming the unknown class
    threshold = section.get("threshold")
    if positive is not None and (threshold is None or not 0.0 < float(threshold) < 1.0):
        raise ValueError(f"card {card.key}: the study threshold must lie in (0, 1), got {threshold!r}")
    label = section.get("positive_label") or (spec.positive_label if positive == card.positive else None) \
        or (" + ".join(positive_classes(positive)) if positive else None)
    validated = bool(section.get("validated"))
    made_for = (section.get("slice_model") or {}).get("sha256")
    if validated and made_for and card.sha256 and made_for != card.sha256:
        # The weights were replaced after the study calibration: its figures describe another model.
        validated = False
        section["reason"] = ("the study calibration in the card was made for other weights; rerun "
                             f"python -m core.lab.study --task {card.key}")
    if validated:
        test = section.get("test") or {}
        note = (f"Chosen on {section.get('patients', {}).get('val', {}).get('patients', 'n/a')} validation patients; "
                f"on {test.get('patients', 'n/a')} test patients {figure_text(test)}.")
    else:
        note = f"Not validated per patient: {section.get('reason') or 'no reason recorded'}."
    return StudyRule(
        aggregation=name, params=params, positive=positive, positive_label=label,
        threshold=float(threshold) if positive is not None else None,
        threshold_rule=str(section.get("threshold_rule") or ""), band=_band(section.get("indeterminate")),
        key_slices=int(section.get("key_slices") or KEY_SLICES), findings=_finding_rules(card, spec, section),
        validated=validated, note=note, section=section,
    )


def _band(section: Mapping[str, Any] | None) -> Band | None:
    """The study call's band, where its section declares one ({"scale": "log-odds", "width": w > 0})."""
    if not section or section.get("scale") != "log-odds" or not float(section.get("width") or 0) > 0:
        return None
    return Band(float(section["width"]))


def figure_text(figures: Mapping[str, Any]) -> str:
    """ "ROC-AUC 0.91 (95% CI 0.80-0.99), sensitivity ..., specificity ..." from a section's figures."""
    parts = []
    for name, title in (("roc_auc", "ROC-AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity")):
        value = figures.get(name) or {}
        if value.get("estimate") is None:
            parts.append(f"{title} n/a")
        elif value.get("low") is not None:
            count = f" = {value['count']}" if value.get("count") else ""
            exact = (f"; exact {value['exact_low']:.2f}-{value['exact_high']:.2f}"
                     if value.get("exact_low") is not None else "")
            parts.append(f"{title} {value['estimate']:.2f}{count} (95% CI {value['low']:.2f}-{value['high']:.2f}{exact})")
        else:
            parts.append(f"{title} {value['estimate']:.2f}")
    return ", ".join(parts)


FINDING_MIN_PATIENTS = 3
FINDING_MIN_AUC = 0.7
FINDING_MIN_SENSITIVITY = 0.5


def finding_study_reliability(validation: Mapping[str, Any]) -> str | None:
    """Why a finding's study-level validation figures say it cannot be relied on, or None."""
    positives = validation.get("positives")
    if positives is not None and positives < FINDING_MIN_PATIENTS:
        return f"only {positives} validation patient(s) with it"
    auc = (validation.get("roc_auc") or {}).get("estimate")
    if auc is None or auc < FINDING_MIN_AUC:
        return f"study-level validation ROC-AUC {'n/a' if auc is None else f'{auc:.2f}'} is below {FINDING_MIN_AUC:.2f}"
    sensitivity = (validation.get("sensitivity") or {}).get("estimate")
    if sensitivity is None or sensitivity < FINDING_MIN_SENSITIVITY:
        shown = "n/a" if sensitivity is None else f"{sensitivity:.2f}"
        return f"study-level validation sensitivity {shown} is below {FINDING_MIN_SENSITIVITY:.2f}"
    return None


def _finding_rules(card: ModelCard, spec: TaskSpec, section: Mapping[str, Any]) -> dict[str, FindingRule]:
    rules = {}
    recorded = section.get("findings") or {}
    for name in spec.findings:
        entry = recorded.get(name) or {}
        slice_entry = card.findings.get(name)
        threshold = float(entry.get("threshold", slice_entry.threshold if slice_entry is not None else 0.5))
        unreliable = finding_reliability(slice_entry) if slice_entry is not None else "no figures in the card"
        if unreliable is None and section.get("validated"):
            unreliable = finding_study_reliability(entry.get("validation") or {})
        test = entry.get("test") or {}
        rules[name] = FindingRule(name, threshold, unreliable, (test.get("sensitivity") or {}).get("estimate"),
                                  (test.get("specificity") or {}).get("estimate"))
    return rules


# ---------------------------------------------------------------- the study call


@dataclass(frozen=True, eq=False)
class StudyCall:
    """The study-level answer from per-slice outputs.

    Attributes:
        prediction: The study call as a `Prediction` (study probabilities, the study threshold,
            the study's guard verdict, study-level findings), so every front end shows it the
            way it shows a single image's.
        score: The aggregated score that is thresholded.
        scores: float64 (n,) per-slice score of the thresholded class or group (or of the
            called class without one), in anatomical order.
        key_slices: Indices of the key slices, highest score first.
    """

    prediction: Prediction
    score: float
    scores: np.ndarray
    key_slices: tuple[int, ...]


def call_study(rule: StudyRule, spec: TaskSpec, probabilities: np.ndarray, finding_probabilities: np.ndarray | None = None,
               guard: GuardVerdict | None = None) -> StudyCall:
    """The study call from per-slice calibrated outputs: what the app, the command lines and the lab all use.

    With a positive class or group: its per-slice probability is aggregated into the study
    score s = P(positive); inside the group s is shared as the key slices share it, outside the
    rest 1 - s is shared as all slices do on average; the call is `core.decision.decide` at the
    study threshold. Without one: the mean of the slice probabilities, argmax. A finding's study
    probability is its highest slice probability, called at its study threshold.

    Args:
        rule: The card's study rule.
        spec: The model's spec.
        probabilities: float (n, C) calibrated class probabilities per slice, anatomical order.
        finding_probabilities: float (n, F) per slice (F = len(spec.findings)), or None.
        guard: The study's guard verdict (default: in range).

    Returns:
        The study call.

    Raises:
        ValueError: With no slices or shapes that do not fit the spec.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = len(probabilities)
    if probabilities.ndim != 2 or n == 0 or probabilities.shape[1] != spec.num_classes:
        raise ValueError(f"need (n >= 1, {spec.num_classes}) slice probabilities, got {probabilities.shape}")
    findings_in = np.zeros((n, 0)) if finding_probabilities is None else np.asarray(finding_probabilities, np.float64)
    if findings_in.shape != (n, len(spec.findings)):
        raise ValueError(f"need ({n}, {len(spec.findings)}) finding probabilities, got {findings_in.shape}")
    labels = spec.labels
    if rule.positive is None:
        study = probabilities.mean(axis=0)
        index = int(study.argmax())
        scores = probabilities[:, index]
        score = float(study[index])
    else:
        members = positive_mask(labels, rule.positive)
        scores = probabilities[:, members].sum(axis=1)
        score = aggregate(scores, rule.aggregation, rule.params)
        inside = probabilities[_key_order(scores)[:max(1, rule.key_slices)]][:, members].mean(axis=0)
        outside = probabilities[:, ~members].mean(axis=0)
        study = np.zeros(len(labels))
        study[members] = score * _shares(inside)
        if (~members).any():
            study[~members] = (1.0 - score) * _shares(outside)
        index = int(decide(study[None], labels, rule.positive, rule.threshold)[0])
    finding_rules = [rule.findings.get(name) or FindingRule(name, 0.5, "no study rule for this finding")
                     for name in spec.findings]
    findings = tuple(
        Finding(item.key, spec.output_title(item.key), float(findings_in[:, j].max()), item.threshold,
                item.sensitivity, item.specificity, item.unreliable)
        for j, item in enumerate(finding_rules))
    prediction = Prediction(labels, study, index, rule.threshold, rule.positive, rule.positive_label,
                            guard or GuardVerdict.passed(), rule.band, findings)
    keys = tuple(int(i) for i in _key_order(scores)[:max(1, rule.key_slices)])
    return StudyCall(prediction, score, scores, keys)


def _key_order(scores: np.ndarray) -> np.ndarray:
    """Slice indices by score, highest first (ties: the earlier slice first)."""
    return np.argsort(-np.asarray(scores), kind="stable")


def _shares(values: np.ndarray) -> np.ndarray:
    total = float(values.sum())
    return values / total if total > 0 else np.full(len(values), 1.0 / len(values))


def study_guard(verdicts: Sequence[GuardVerdict]) -> GuardVerdict:
    """The study's guard verdict from its slices' verdicts.

    A DICOM tag mismatch (the same for every slice) refuses the study. Otherwise the study is out
    of range when more than `GUARD_REFUSED_SHARE` of its slices are; borderline when any slice is
    out of range, or when more than that share is out of range or borderline together (a few
    borderline slices at the ends of a long series are not worth a warning); else in range. The
    call always reads every slice. Its score is the median slice score.
    """
    if not verdicts:
        return GuardVerdict.passed()
    tagged = next((v for v in verdicts if v.refused and v.score is None), None)
    if tagged is not None:
        return tagged
    scores = [v.score for v in verdicts if v.score is not None]
    score = float(np.median(scores)) if scores else None
    first = next((v for v in verdicts if v.score is not None), verdicts[0])
    out = sum(v.refused for v in verdicts)
    edge = sum(v.warned for v in verdicts)
    n = len(verdicts)
    if out > GUARD_REFUSED_SHARE * n:
        return GuardVerdict("out_of_range", (
            f"{out} of {n} slices are outside what the model was trained on (their resemblance to its training images "
            "is below the guard's threshold): this series does not look like the model's scans."),
            score, first.threshold, first.borderline)
    if out or out + edge > GUARD_REFUSED_SHARE * n:
        parts = ([f"{out} of {n} slices are outside what the model was trained on"] if out else []) + \
                ([f"{edge} are at its edge"] if edge else [])
        return GuardVerdict("borderline", "; ".join(parts) + ". The study call still reads every slice; look at those "
                            "slices (marked in the strip) with extra care.", score, first.threshold, first.borderline)
    return GuardVerdict("in_range", None, score, first.threshold, first.borderline)


# ---------------------------------------------------------------- reading uploads


def is_study(data: bytes, filename: str | None = None) -> bool:
    """Whether one upload is a study rather than a single image: a ZIP, a NIfTI volume or a multi-frame DICOM."""
    kind = upload_kind(data, filename)
    if kind in ("zip", "nifti"):
        return True
    if kind != "dicom":
        return False
    try:
        ds = parse_dicom(data, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (ScanError, TypeError, ValueError):
        return False
    return frames > 1


def study_budget() -> UploadBudget:
    """The archive budget of one study upload: the series reader's limits (`core.series`), not a batch's."""
    return UploadBudget(max_files=MAX_MEMBERS, max_bytes=MAX_STUDY_BYTES, max_entries=2 * MAX_MEMBERS)


def read_upload(files: Iterable[tuple[str, bytes]], spec: TaskSpec | None = None,
                budget: UploadBudget | None = None) -> Study:
    """Read one upload (one or several files: ZIPs of DICOM files, DICOM files, NIfTI) as a study.

    ZIPs are unpacked in memory by `core.archive` against one budget for the whole upload;
    every member not passed on (hidden, unsafe path, encrypted, an archive inside, over a
    limit) is counted with its reason among the left-outs; folder entries are not.

    Args:
        files: (name, bytes) per uploaded file; names are format hints only (never kept).
        spec: The model the study is read for: a NIfTI volume takes its first modality (its
            values are then HU for a CT model).
        budget: The request's budget (default: `study_budget()`).

    Raises:
        StudyError: An unreadable archive, a limit passed, or no series at all; the message says why.
    """
    budget = budget or study_budget()
    skipped: list[str] = []
    modality = spec.modalities[0] if spec is not None and len(spec.modalities) == 1 else None

    def members() -> Iterator[tuple[str, bytes]]:
        for name, data in uploaded_files(files, skipped):
            if is_zip(data):
                try:
                    archive = open_zip(bytes(data), name or "upload.zip", budget)
                except ArchiveError as exc:
                    raise StudyError(str(exc)) from None
                for member in archive.members():
                    if member.data is not None:
                        yield member.name, member.data
                    elif member.reason and not member.reason.startswith("a folder"):
                        skipped.append(member.reason)
                continue
            over = budget.admit(len(data))
            if over is not None:
                skipped.append(f"not read: {over}")
                continue
            yield name or "", bytes(data)

    return read_members(members(), skipped=skipped, modality=modality)


def read_study_path(path: str | Path, spec: TaskSpec | None = None) -> Study:
    """Read the command line's PATH as a study: a folder, a ZIP, a (multi-frame) DICOM or a NIfTI file.

    Raises:
        StudyError: The path is missing or cannot be read as a study.
    """
    path = Path(path)
    modality = spec.modalities[0] if spec is not None and len(spec.modalities) == 1 else None
    if path.is_dir():
        return read_folder_or_file(path, modality=modality)
    if not path.is_file():
        raise StudyError("The path is neither a file nor a folder.")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise StudyError(f"The file is {size / 2**20:.0f} MB; files over {MAX_UPLOAD_BYTES // 2**20} MB are not accepted.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StudyError(f"The file cannot be read ({exc.strerror or type(exc).__name__}).") from None
    return read_upload([(path.name, data)], spec)


def upload_digest(files: Sequence[tuple[str, bytes]]) -> str:
    """Short sha256 over every uploaded file's bytes, in order: what logs and page keys carry."""
    digest = hashlib.sha256()
    for _, data in files:
        digest.update(hashlib.sha256(data).digest())
    return short_digest(digest.hexdigest())


# ---------------------------------------------------------------- analysing a series

Progress = Callable[[int, int], None]


@dataclass(eq=False)
class StudyAnalysis:
    """One series through one model: per-slice outputs, the study call and, on demand, slice heatmaps.

    Attributes:
        classifier: The model.
        study: The whole upload as read (every series, left-outs, warnings).
        index: The analysed series' index in `study.series`.
        choice: The series the model reads by default, and why (it may be another one).
        digest: The upload's short hash.
        rule: The card's study rule.
        probabilities: float32 (n, C) calibrated class probabilities per slice, anatomical order.
        finding_probabilities: float32 (n, F) per slice.
        verdicts: The guard's verdict per slice.
        call: The study call.
        seconds: Time the slices took through the model (reading excluded).
    """

    classifier: Classifier
    study: Study
    index: int
    choice: SeriesChoice
    digest: str
    rule: StudyRule
    probabilities: np.ndarray
    finding_probabilities: np.ndarray
    verdicts: tuple[GuardVerdict, ...]
    call: StudyCall
    seconds: float = 0.0
    _slices: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def series(self) -> Series:
        """The analysed series."""
        return self.study.series[self.index]

    @property
    def prediction(self) -> Prediction:
        """The study call."""
        return self.call.prediction

    @property
    def key_slices(self) -> tuple[int, ...]:
        """Key slice indices, highest score first."""
        return self.call.key_slices

    @property
    def scores(self) -> np.ndarray:
        """float64 (n,) per-slice score of the thresholded class or group."""
        return self.call.scores

    @property
    def chosen(self) -> bool:
        """Whether this is the series the model reads by default."""
        return self.choice.index == self.index

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def left_out(self) -> tuple[LeftOut, ...]:
        """The series' images left out, then the upload's files not used at all."""
        return self.series.left_out + self.study.left_out

    @property
    def warnings(self) -> tuple[str, ...]:
        """Everything the reader is told about this series before its call: geometry, fit to the model, guard."""
        spec, series = self.classifier.spec, self.series
        out = list(self.study.warnings) + list(series.warnings)
        if spec.plane and series.geometry.plane and series.geometry.plane != spec.plane:
            out.append(f"This series is {series.geometry.plane}; the model was trained on {spec.plane} slices only, "
                       f"so its output on {series.geometry.plane} slices has not been tested.")
        if series.modality and series.modality not in spec.modalities:
            out.append(f"This series is {series.modality}; the model is for {'/'.join(spec.modalities)}.")
        guard = self.prediction.guard
        if guard.warned and guard.reason:
            out.append(f"Guard: {guard.reason}")
        return tuple(out)

    def slice_prediction(self, index: int) -> Prediction:
        """One slice's own prediction (its slice-level call, at the slice threshold)."""
        card, spec = self.classifier.card, self.classifier.spec
        probs = self.probabilities[index].astype(np.float64)
        findings = tuple(
            Finding(name, spec.output_title(name), float(self.finding_probabilities[index, j]),
                    card.findings[name].threshold, None, None, finding_reliability(card.findings[name]))
            for j, name in enumerate(spec.findings))
        decided = int(decide(probs[None], spec.labels, card.positive, card.threshold)[0])
        return Prediction(spec.labels, probs, decided, card.threshold, card.positive, spec.positive_label,
                          self.verdicts[index], band_of(card.indeterminate.classes if card.indeterminate else None),
                          findings)

    def slice_input(self, index: int) -> ModelInput:
        """What the model saw of one slice (made again: a few milliseconds)."""
        pixels, region, shape = _model_pixels(self.series, index, self.classifier.spec)
        return EvalPreset(self.classifier.spec).from_pixels(pixels, region, shape)

    def slice_analysis(self, index: int) -> Analysis:
        """One slice as a `core.pipeline.Analysis` (scan, model input, its own prediction, heatmaps on demand).

        Kept for the `MAX_SLICE_ANALYSES` slices asked for last, so a heatmap is computed once
        per slice, output and method while the reader looks at it. Every slice of the series
        carries the same `sha256` (the series', derived from the upload's digest).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"slice {index!r} out of range; the series has {len(self)} slices (0 to {len(self) - 1})")
        with self._lock:
            cached = self._slices.get(index)
            if cached is not None:
                self._slices.move_to_end(index)
                return cached
        scan = self.series.scan(index)
        model_input = EvalPreset(self.classifier.spec)(scan)
        # One hash per series, not per slice: a page keys its heatmap controls by it, so they keep their
        # settings from slice to slice (each slice's heatmaps are still its own Analysis's).
        sha = hashlib.sha256(f"{self.digest}/{self.index}".encode()).hexdigest()
        made = Analysis(self.classifier, sha, scan, model_input, self.slice_prediction(index))
        with self._lock:
            made = self._slices.setdefault(index, made)
            self._slices.move_to_end(index)
            while len(self._slices) > MAX_SLICE_ANALYSES:
                self._slices.popitem(last=False)
        return made

    def heatmap(self, index: int, target: str | None = None, method: str | None = None) -> Heatmap:
        """The heatmap of one slice for an output (default: the study call's positive class, else the call), once.

        Raises:
            ValueError: For an unknown output or method; IndexError for a slice out of range.
        """
        from core.explain import DEFAULT_METHOD

        return self.slice_analysis(index).heatmap(target or self.explained, method or DEFAULT_METHOD)

    def has_heatmap(self, index: int, target: str, method: str) -> bool:
        """Whether that slice's heatmap is computed and kept."""
        with self._lock:
            cached = self._slices.get(index)
        return cached is not None and cached.has_heatmap(target, method)

    @property
    def explained(self) -> str:
        """The output a key slice's heatmap explains by default: the called class, or the likeliest positive one."""
        prediction = self.prediction
        if prediction.positive and not prediction.called_positive:
            members = positive_classes(prediction.positive)
            return max(members, key=lambda m: prediction.probabilities[prediction.labels.index(m)])
        return prediction.label


def _model_pixels(series: Series, index: int, spec: TaskSpec) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int]]:
    """One slice's 8-bit model pixels after the spec's steps, their region and the slice's shape.

    A CT slice goes through the model's window straight from its stored values (a lookup table,
    no float copy); the result is the same as `eight_bit(series.scan(i), spec)`.
    """
    if series.modality == "CT" and spec.ct_window is not None:
        image = series.window_8bit(index, spec.ct_window)
    else:
        image = eight_bit(series.scan(index), spec)
    pixels, region = apply_steps(image, spec.preprocessing)
    return pixels, region, image.shape


def analyse_series(classifier: Classifier, study: Study, index: int | None = None, *, digest: str = "",
                   progress: Progress | None = None, batch_size: int = BATCH_SIZE) -> StudyAnalysis | Refusal:
    """Every slice of one series through the model in batches, then the study call.

    Args:
        classifier: A loaded model.
        study: The upload as read.
        index: The series' index in `study.series` (default: the one the model suits, `Study.choose`).
        digest: The upload's short hash (logs, page keys).
        progress: Called with (slices done, slices in all) after each batch.
        batch_size: Slices per forward pass.

    Returns:
        The analysis, or a Refusal ("rejected": the series cannot be analysed, with the reason;
        "error": something failed here, only the error type named).
    """
    import torch

    from core.decision import predict

    spec = classifier.spec
    choice = study.choose(spec)
    if index is None:
        if choice.index is None:
            return Refusal("rejected", choice.reason, digest)
        index = choice.index
    if not 0 <= index < len(study.series):
        raise IndexError(f"series {index!r} out of range; the upload has {len(study.series)} series")
    series = study.series[index]
    if series.refused is not None:
        return Refusal("rejected", series.refused, digest)
    if len(series) == 0:
        return Refusal("rejected", "This series holds no slice that can be analysed.", digest)
    started = time.perf_counter()
    try:
        rule = study_rule(classifier.card, spec)
        tags = read_tags(series.scan(0), spec)  # the series' tags: the same for every slice
        preset = EvalPreset(spec)
        n = len(series)
        probabilities = np.zeros((n, spec.num_classes), dtype=np.float32)
        findings = np.zeros((n, len(spec.findings)), dtype=np.float32)
        verdicts: list[GuardVerdict] = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            greys = np.stack([preset.grey(_model_pixels(series, i, spec)[0]) for i in range(start, stop)])
            batch = preset.tensor(torch.from_numpy(greys))
            for offset, prediction in enumerate(predict(classifier, batch, [tags] * (stop - start))):
                probabilities[start + offset] = prediction.probabilities
                findings[start + offset] = [f.probability for f in prediction.findings]
                verdicts.append(prediction.guard)
            if progress is not None:
                progress(stop, n)
        call = call_study(rule, spec, probabilities, findings, study_guard(verdicts))
    except StudyError as exc:
        return Refusal("rejected", str(exc), digest)
    except Exception as exc:  # noqa: BLE001 - one bad series must never stop the rest; the type is logged, not the file
        logger.error("study %s series %d failed for %s: %s", digest, index, spec.key, type(exc).__name__)
        return Refusal("error", f"internal error: {type(exc).__name__}", digest)
    seconds = time.perf_counter() - started
    outcome = call.prediction.guard.outcome if call.prediction.guard.refused else call.prediction.label
    logger.info("study %s series %d (%d slices) -> %s: %s in %.1f s", digest, index, n, spec.key, outcome, seconds)
    return StudyAnalysis(classifier, study, index, choice, digest, rule, probabilities, findings, tuple(verdicts), call,
                         seconds)


def series_order(study: Study, spec: TaskSpec) -> list[int]:
    """Series indices with the model's default series first, then the others in the listing's order."""
    chosen = study.choose(spec).index
    rest = [i for i in range(len(study.series)) if i != chosen]
    return ([chosen] if chosen is not None else []) + rest


def series_label(series: Series, index: int) -> str:
    """A series named for a page or a report without its UID or description: "Series 3 (axial, 34 slices, 5 mm)"."""
    name = f"Series {series.number}" if series.number is not None else f"Series {index + 1} of the upload"
    facts = [series.geometry.plane or "plane unknown", f"{len(series)} slices"]
    if series.geometry.thickness:
        facts.append(f"{series.geometry.thickness:g} mm")
    if series.refused:
        facts.append("refused")
    return f"{name} ({', '.join(facts)})"


def study_report_content(analysis: StudyAnalysis, method: str | None = None, target: str | None = None,
                         window: tuple[float, float] | None = None) -> StudyReportContent:
    """What a study report shows (`core.report.StudyReportContent`): key slices with their heatmaps.

    Args:
        analysis: The study analysis.
        method: CAM method (default: the card's most faithful, else Grad-CAM).
        target: Output the heatmaps explain (default: `StudyAnalysis.explained`).
        window: Display window for CT slices (default: the model's own window).
    """
    from core.explain import DEFAULT_METHOD, METHODS, overlay
    from core.preprocess import display_rgb

    classifier, spec = analysis.classifier, analysis.classifier.spec
    explanations = classifier.card.explanations
    preferred = explanations.default_method if explanations is not None else None
    method = method or (preferred if preferred in METHODS else DEFAULT_METHOD)
    target = target or analysis.explained
    window = window or spec.ct_window
    keys = []
    for index in analysis.key_slices:
        slice_analysis = analysis.slice_analysis(index)
        heatmap = slice_analysis.heatmap(target, method)
        rgb = display_rgb(slice_analysis.scan, window if slice_analysis.scan.modality == "CT" else None)
        blended = overlay(rgb, heatmap.placed, 0.45, "jet", 0.2)
        blended[heatmap.outside] = rgb[heatmap.outside]
        keys.append(KeySlice(index + 1, float(analysis.scores[index]), rgb, blended))
    notes = [f"{item.count} image(s) left out: {item.reason}" for item in analysis.left_out]
    notes += [w for w in analysis.warnings if not w.startswith("Guard:")]  # the guard has its own line
    if analysis.prediction.findings:
        notes.append("Findings (study level: highest slice probability against the finding's threshold): " + "; ".join(
            f"{f.title} {f.probability:.0%} ({'unreliable' if f.unreliable else 'above' if f.above_threshold else 'below'}"
            f" {f.threshold:.2f})" for f in analysis.prediction.findings))
    return StudyReportContent(
        prediction=analysis.prediction, card=classifier.card, upload_hash=analysis.digest,
        series=series_label(analysis.series, analysis.index), rule=analysis.rule.describe(),
        validation=analysis.rule.note, scores=analysis.scores,
        slice_threshold=classifier.card.threshold if analysis.rule.positive == classifier.card.positive else None,
        key_slices=tuple(keys), explained=spec.output_title(target), method=method, notes=tuple(notes))


# ---------------------------------------------------------------- rows (command line, API, batch)

ROW_FIELDS: tuple[str, ...] = ("file", "series", "status", "reason", "slices", "left_out", "prediction", "probabilities",
                               "findings", "slice_probabilities", "key_slices")


def _left_out(items: Iterable[LeftOut]) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for item in items:
        reasons[item.reason] = reasons.get(item.reason, 0) + item.count
    return {"count": sum(reasons.values()), "reasons": reasons}


def study_row(name: str, outcome: StudyAnalysis | Refusal, series: Series | None = None,
              study: Study | None = None, *, detail: bool = False, label: str | None = None) -> dict[str, Any]:
    """The JSON row of one series: exactly `ROW_FIELDS` (findings only for a model with findings).

    Fields: file (the name as given), series (SeriesInstanceUID or a name), status (ok / rejected /
    error), reason (why not ok; for an ok row the warnings and the uncertain or borderline note,
    or None), slices (slices used), left_out ({count, reasons}), prediction (study-level class),
    probabilities (study level, every class), findings ({key: study probability}),
    slice_probabilities (one {output: probability} per used slice, anatomical order) and
    key_slices (indices into that list, highest score first).

    Args:
        name: The file or path as given.
        outcome: The series' analysis, or why it has none.
        series: The series (for a Refusal; an analysis knows its own).
        study: The upload (its files left out are added to the row's left-outs).
        detail: Also `call` (the headline, or "uncertain"), `uncertain`, `guard` (outcome, score,
            threshold), `present` and `unreliable` (findings), `rule` and `validated` (the study call's
            rule and whether it was validated per patient): for the API and the batch table.
        label: What `series` says instead of the UID (pages and their downloads show no UID).
    """
    with_findings = isinstance(outcome, StudyAnalysis) and bool(outcome.classifier.spec.findings)
    row: dict[str, Any] = {"file": name, "series": None, "status": "ok", "reason": None, "slices": 0,
                           "left_out": _left_out(()), "prediction": None, "probabilities": None,
                           "slice_probabilities": None, "key_slices": None}
    if isinstance(outcome, Refusal):
        items = (series.left_out if series is not None else ()) + (study.left_out if study is not None else ())
        row.update(series=label or (series.key if series is not None else None), status=outcome.status,
                   reason=outcome.reason, left_out=_left_out(items))
        if detail:
            row.update(call=None, uncertain=None, guard=None, rule=None, validated=None)
        return row
    spec, prediction = outcome.classifier.spec, outcome.prediction
    row.update(series=label or outcome.series.key, slices=len(outcome), left_out=_left_out(outcome.left_out))
    guard = prediction.guard
    extra: dict[str, Any] = {"call": None, "uncertain": None,
                             "guard": {"outcome": guard.outcome, "score": guard.score, "threshold": guard.threshold},
                             "rule": outcome.rule.describe(), "validated": outcome.rule.validated}
    if guard.refused:
        row.update(status="rejected", reason=f"Not classified: {guard.reason}")
        return {**row, **extra} if detail else row
    outputs = spec.outputs
    both = np.concatenate([outcome.probabilities, outcome.finding_probabilities], axis=1)
    row.update(prediction=prediction.label, probabilities=prediction.as_dict(),
               slice_probabilities=[{key: round(float(p), 5) for key, p in zip(outputs, values)} for values in both],
               key_slices=list(outcome.key_slices))
    if with_findings:
        row["findings"] = {f.key: f.probability for f in prediction.findings}
    notes = list(outcome.warnings)
    if prediction.uncertain:
        notes.append(f"uncertain: inside the study call's indeterminate band; the likelier call is {prediction.headline()[0]}")
    row["reason"] = " ".join(notes) or None
    row = {key: row[key] for key in ROW_FIELDS if key in row}
    if not detail:
        return row
    extra.update(call="uncertain" if prediction.uncertain else prediction.headline()[0], uncertain=prediction.uncertain)
    if prediction.findings:
        extra.update(present=[f.key for f in prediction.findings if f.present],
                     unreliable={f.key: f.unreliable for f in prediction.findings if f.unreliable})
    return {**row, **extra}


def study_rows(classifier: Classifier, data: bytes | Iterable[tuple[str, bytes]], filename: str | None = None, *,
               name: str | None = None, progress: Progress | None = None, detail: bool = False,
               safe_series: bool = False) -> list[dict[str, Any]]:
    """Every series of one upload through the model: one row per series (`study_row`), the default series first.

    The function the command line, the HTTP API and the batch page call. It never raises for a
    bad upload: an unreadable one gives one row with status "rejected" (or "error").

    Args:
        classifier: A loaded model.
        data: The upload's bytes (a ZIP, a DICOM or a NIfTI file), or (name, bytes) pairs (several
            DICOM files, or an archive reader's members).
        filename: The upload's name (a format hint).
        name: What the rows' `file` says (default: `filename`).
        progress: Called with (slices done, slices in all) per batch, per series.
        detail: Rows with the extra fields of `study_row(detail=True)` (the API, the batch page).
        safe_series: `series` names the series by number, plane and slices (`series_label`)
            instead of its UID: for pages and their downloads.

    Returns:
        The rows.
    """
    label = name if name is not None else (filename or "")
    files = [(filename or "", data)] if isinstance(data, (bytes, bytearray, memoryview)) else data
    hasher = hashlib.sha256()

    def hashed() -> Iterator[tuple[str, bytes]]:  # the digest as `upload_digest` makes it, members read lazily
        for member_name, member in files:
            if isinstance(member, (bytes, bytearray, memoryview)):  # anything else: read_upload says what is wrong
                hasher.update(hashlib.sha256(member).digest())
            yield member_name, member

    try:
        study = read_upload(hashed(), classifier.spec)
        digest = short_digest(hasher.hexdigest())
    except (StudyError, ScanError) as exc:
        return [study_row(label, Refusal("rejected", str(exc)), detail=detail)]
    except Exception as exc:  # noqa: BLE001 - a bad upload must never stop the caller; the type is logged, not the file
        logger.error("study upload failed for %s: %s", classifier.spec.key, type(exc).__name__)
        return [study_row(label, Refusal("error", f"internal error: {type(exc).__name__}"), detail=detail)]
    rows = []
    for index in series_order(study, classifier.spec):
        outcome = analyse_series(classifier, study, index, digest=digest, progress=progress)
        shown = series_label(study.series[index], index) if safe_series else None
        rows.append(study_row(label, outcome, study.series[index], study, detail=detail, label=shown))
    return rows
