"""Studies as patients: a labelled folder's scored slices grouped into one study per patient, and
patient-level figures with bootstrap intervals.

Shared by the study calibration (`core.lab.study`) and `python -m core.evaluate --by patient`
(`score_patients`: the card's study call, made by `core.study.call_study` exactly as the app makes
it, scored per patient). A patient is positive when any of its slices is (for a finding: when any
slice has it); its slices are ordered by the manifest's `slice` column where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.decision import positive_mask
from core.lab.data import Record
from core.models import Classifier
from core.study import call_study, figure_text, study_rule
from core.tasks import TaskSpec

RESAMPLES = 2000
SEED = 0


class ScoredSlices(Protocol):
    """What `core.lab.evaluate.score_records` gives: calibrated outputs of labelled slices."""

    targets: np.ndarray  # int (N,) true class indices
    probabilities: np.ndarray  # float (N, C)
    finding_targets: np.ndarray  # 0/1 (N, F)
    finding_probabilities: np.ndarray  # float (N, F)


@dataclass(frozen=True)
class Patient:
    """One patient's slices as one study.

    Attributes:
        key: The manifest's patient ID.
        positive: Whether any slice is of the thresholded class (or group).
        findings: bool (F,): whether any slice has each finding.
        probabilities: float (n, C) calibrated class probabilities per slice, in slice order.
        finding_probabilities: float (n, F).
    """

    key: str
    positive: bool
    findings: np.ndarray
    probabilities: np.ndarray
    finding_probabilities: np.ndarray


def group_patients(records: Sequence[Record], scores: ScoredSlices, spec: TaskSpec, positive: str) -> list[Patient]:
    """Scored slices -> one `Patient` per patient ID, slices in the manifest's `slice` order (else as listed).

    Raises:
        ValueError: If a record has no patient ID.
    """
    missing = [r.rel for r in records if not r.patient]
    if missing:
        raise ValueError(f"{len(missing)} images have no patient ID (e.g. {missing[0]}): cannot group them into studies")
    members = positive_mask(spec.labels, positive)
    by_patient: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_patient.setdefault(str(record.patient), []).append(i)
    patients = []
    for key, rows in by_patient.items():
        rows.sort(key=lambda i: (_slice_number(records[i]), i))
        patients.append(Patient(
            key, bool(members[scores.targets[rows]].any()),
            scores.finding_targets[rows].astype(bool).any(axis=0) if len(spec.findings) else np.zeros(0, bool),
            scores.probabilities[rows], scores.finding_probabilities[rows]))
    return patients


def _slice_number(record: Record) -> float:
    value = dict(record.columns).get("slice")
    try:
        return float(value) if value not in (None, "") else math.inf
    except ValueError:
        return math.inf


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC of scores against bool truth, or None where one side has no patient."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, scores)) if truth.any() and not truth.all() else None


def rates(truth: np.ndarray, called: np.ndarray) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) of bool calls against bool truth; None where a side has no patient."""
    sens = float(called[truth].mean()) if truth.any() else None
    spec_ = float((~called[~truth]).mean()) if (~truth).any() else None
    return sens, spec_


def patient_figures(scores: np.ndarray, truth: np.ndarray, called: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = SEED) -> dict[str, Any]:
    """ROC-AUC of the study scores, sensitivity and specificity of the calls, each with a 95% bootstrap interval.

    Args:
        scores: float (N,) study scores, one per patient.
        truth: bool (N,) positive patients.
        called: bool (N,) patients called positive.
        resamples: Bootstrap resamples of patients (with replacement); 0: no intervals.
        seed: Random seed.

    Returns:
        {patients, positives, roc_auc, sensitivity, specificity: {estimate, low, high}} (None where
        a side has no patient).
    """
    scores, truth, called = np.asarray(scores, np.float64), np.asarray(truth, bool), np.asarray(called, bool)
    sens, spec_ = rates(truth, called)
    estimates = {"roc_auc": roc_auc(truth, scores), "sensitivity": sens, "specificity": spec_}
    draws: dict[str, list[float]] = {name: [] for name in estimates}
    rng = np.random.default_rng(seed)
    for _ in range(resamples if len(truth) else 0):
        pick = rng.integers(0, len(truth), len(truth))
        t, s, c = truth[pick], scores[pick], called[pick]
        auc = roc_auc(t, s)
        if auc is not None:
            draws["roc_auc"].append(auc)
        se, sp = rates(t, c)
        if se is not None:
            draws["sensitivity"].append(se)
        if sp is not None:
            draws["specificity"].append(sp)
    out: dict[str, Any] = {"patients": int(len(truth)), "positives": int(truth.sum())}
    for name, estimate in estimates.items():
        values = draws[name]
        low, high = (np.percentile(values, [2.5, 97.5]) if values and estimate is not None else (None, None))
        out[name] = {"estimate": estimate, "low": None if low is None else float(low),
                     "high": None if high is None else float(high)}
    # A percentile bootstrap of a proportion at 0 or 1 collapses to a point (7 of 7 resampled is still 7 of 7):
    # the exact binomial interval says how little a handful of patients shows.
    for name, hits, total in (("sensitivity", int(called[truth].sum()), int(truth.sum())),
                              ("specificity", int((~called[~truth]).sum()), int((~truth).sum()))):
        out[name]["count"] = f"{hits}/{total}"
        out[name]["exact_low"], out[name]["exact_high"] = clopper_pearson(hits, total)
    return out


def clopper_pearson(hits: int, total: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """The exact (Clopper-Pearson) interval of a proportion hits / total; (None, None) without cases."""
    from scipy.stats import beta

    if total == 0:
        return None, None
    alpha = 1.0 - level
    low = 0.0 if hits == 0 else float(beta.ppf(alpha / 2, hits, total - hits + 1))
    high = 1.0 if hits == total else float(beta.ppf(1 - alpha / 2, hits + 1, total - hits))
    return low, high


def score_patients(classifier: Classifier, records: Sequence[Record], scores: ScoredSlices,
                   resamples: int = RESAMPLES) -> dict[str, Any]:
    """The card's study call scored per patient on labelled slices (what `core.evaluate --by patient` prints).

    Raises:
        ValueError: Records without patient IDs, or a study rule without a thresholded class.
    """
    spec = classifier.spec
    rule = study_rule(classifier.card, spec)
    if rule.positive is None:
        raise ValueError(f"the study rule of {spec.key} has no thresholded class or group: write its card's study "
                         "section first (python -m core.lab.study --absent CLASS)")
    patients = group_patients(records, scores, spec, rule.positive)
    calls = [call_study(rule, spec, p.probabilities, p.finding_probabilities) for p in patients]
    truth = np.array([p.positive for p in patients])
    study_scores_ = np.array([c.score for c in calls])
    called = np.array([c.prediction.called_positive for c in calls])
    out: dict[str, Any] = {"unit": "patient", "rule": rule.describe(), "validated": rule.validated,
                           "threshold": rule.threshold, **patient_figures(study_scores_, truth, called, resamples),
                           "accuracy": float((truth == called).mean()) if len(truth) else None}
    if spec.findings:
        out["findings"] = {}
        for j, name in enumerate(spec.findings):
            finding_truth = np.array([p.findings[j] for p in patients], dtype=bool)
            probability = np.array([c.prediction.findings[j].probability for c in calls])
            present = np.array([c.prediction.findings[j].above_threshold for c in calls])
            out["findings"][name] = {"threshold": rule.findings[name].threshold,
                                     "unreliable": rule.findings[name].unreliable,
                                     **patient_figures(probability, finding_truth, present, resamples)}
    return out


def format_patients(metrics: dict[str, Any], title: str) -> str:
    """`score_patients` as readable lines."""
    lines = [title, f"  study call: {metrics['rule']}" + ("" if metrics["validated"] else " (not validated per patient)"),
             f"  patients {metrics['patients']} ({metrics['positives']} positive), accuracy "
             f"{'n/a' if metrics['accuracy'] is None else format(metrics['accuracy'], '.4f')}",
             f"  {figure_text(metrics)}"]
    for name, row in (metrics.get("findings") or {}).items():
        lines.append(f"  finding {name}: {row['positives']} positive patients; {figure_text(row)}"
                     + (f" (unreliable: {row['unreliable']})" if row["unreliable"] else ""))
    return "\n".join(lines)
