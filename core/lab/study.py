"""The study call on patients: aggregation and study threshold chosen on validation patients,
figures on test patients, written as the card's `study` section.

    python -m core.lab.study --task head_ct --data ../shared/data/head_ct                 # print the section
    python -m core.lab.study --task head_ct --data ../shared/data/head_ct --write-card    # and store it
    python -m core.lab.study --task ct_covid --data ../shared/data/ct_covid --write-card
    python -m core.lab.study --task ct_cancer --data ../shared/data/ct_cancer --write-card  # no patient IDs
    python -m core.lab.study --task brain_mri --data ../shared/data/brain_mri --absent no_tumor --write-card

A study is every slice of one patient in the manifest (`patient` column, ordered by its `slice`
column where there is one); a patient is positive when any of its slices is (for a finding: when
any slice has it). The split is the one the card's training recorded (`recorded_split`): the
slice model never saw the validation or test patients.

1. Every candidate aggregation of `CANDIDATES` (`core.study.AGGREGATIONS`) gives each
   validation patient a study score from its slices' calibrated probabilities of the
   thresholded class (or group). The logistic one is fitted on the validation patients and
   scored leave-one-patient-out there. The chosen aggregation has the highest validation
   ROC-AUC; ties go to the higher validation specificity at the threshold rule, then to the
   simpler (earlier in `CANDIDATES`).
2. The study threshold: the highest one at which validation patients keep a sensitivity of at
   least `MIN_SENSITIVITY`, placed halfway (in log-odds) to the next lower validation score, so
   a test patient just below the lowest kept positive is not lost for nothing.
3. Figures (ROC-AUC, sensitivity and specificity at the study threshold) on validation and test
   patients, each with a 95% percentile interval from `RESAMPLES` bootstrap resamples of
   patients. Findings: the highest slice probability at the finding's slice threshold, with the
   same figures; a finding with fewer than 3 validation patients or weak figures is marked
   unreliable (`core.study.finding_study_reliability`).

Where the data has no patient IDs (brain_mri, ct_cancer) the section defines the study call
(`UNVALIDATED`) and says it was not validated per patient. The figures come only from this
command: rerun it after retraining a model.

Grouping slices into patients and the patient-level figures live in `core.lab.patients` (shared with
`python -m core.evaluate --by patient`).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.decision import log_odds, positive_mask
from core.lab.data import Record, recorded_split
from core.lab.evaluate import card_section_parser, run_card_section, score_records
from core.lab.patients import RESAMPLES, SEED, Patient, group_patients, patient_figures, rates, roc_auc
from core.models import Classifier
from core.study import (
    StudyRule,
    call_study,
    describe_aggregation,
    figure_text,
    finding_study_reliability,
    pooled_features,
)
from core.tasks import TASKS, TaskSpec

logger = logging.getLogger(__name__)

CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("max", {}),
    ("smoothed_max", {"window": 3}),
    ("top_k_mean", {"k": 2}),
    ("top_k_mean", {"k": 3}),
    ("top_k_mean", {"k": 5}),
    ("noisy_or", {"k": 3}),
    ("logistic", {}),
)
UNVALIDATED: tuple[str, dict[str, Any]] = ("top_k_mean", {"k": 3})  # a single outlying slice does not decide
MIN_SENSITIVITY = 0.95
LOGISTIC_C = 1.0  # L2 strength of the logistic aggregation: few validation patients, so a strong prior
NO_PATIENTS = ("the data has no patient IDs, so its slices cannot be grouped into studies: the study call could not be "
               "chosen or measured per patient")


def _rule(spec: TaskSpec, positive: str, label: str | None, name: str, params: dict[str, Any],
          threshold: float = 0.5) -> StudyRule:
    return StudyRule(aggregation=name, params=params, positive=positive, positive_label=label, threshold=threshold,
                     threshold_rule="")


def study_scores(rule: StudyRule, spec: TaskSpec, patients: Sequence[Patient]) -> np.ndarray:
    """Each patient's aggregated study score, by `core.study.call_study` (the app's own code)."""
    return np.array([call_study(rule, spec, p.probabilities, p.finding_probabilities).score for p in patients])


def fit_logistic(features: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """The logistic aggregation's parameters from pooled features (N, 4) of labelled patients."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), 1e-6)
    model = LogisticRegression(C=LOGISTIC_C, max_iter=1000).fit((features - mean) / scale, truth)
    return {"mean": mean.tolist(), "scale": scale.tolist(), "weights": model.coef_[0].tolist(),
            "bias": float(model.intercept_[0])}


def logistic_scores(spec: TaskSpec, positive: str, patients: Sequence[Patient]) -> tuple[np.ndarray, dict[str, Any]]:
    """Leave-one-patient-out scores of the logistic aggregation, and its parameters fitted on all patients."""
    members = positive_mask(spec.labels, positive)
    features = np.stack([pooled_features(p.probabilities[:, members].sum(axis=1)) for p in patients])
    truth = np.array([p.positive for p in patients])
    scores = np.zeros(len(patients))
    for i in range(len(patients)):
        keep = np.arange(len(patients)) != i
        if truth[keep].all() or not truth[keep].any():
            scores[i] = truth[keep].mean()
            continue
        params = fit_logistic(features[keep], truth[keep])
        z = (features[i] - np.array(params["mean"])) / np.array(params["scale"])
        scores[i] = 1.0 / (1.0 + math.exp(-float(np.clip(z @ np.array(params["weights"]) + params["bias"], -50, 50))))
    return scores, fit_logistic(features, truth)


def choose_threshold(scores: np.ndarray, truth: np.ndarray, min_sensitivity: float = MIN_SENSITIVITY) -> float:
    """The highest threshold keeping validation sensitivity >= `min_sensitivity`, halfway (log-odds) to the next lower score.

    Raises:
        ValueError: Without positive patients.
    """
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    if not truth.any():
        raise ValueError("no positive validation patient: the study threshold cannot be chosen")
    positives = np.sort(scores[truth])[::-1]
    kept = positives[math.ceil(min_sensitivity * len(positives)) - 1]
    lower = scores[scores < kept]
    top = float(log_odds(kept))
    bottom = float(log_odds(lower.max())) if lower.size else top - 1.0
    return float(np.clip(1.0 / (1.0 + math.exp(-(top + bottom) / 2.0)), 1e-6, 1.0 - 1e-6))


def _candidate(name: str, params: dict[str, Any], scores: np.ndarray, truth: np.ndarray, subject: str) -> dict[str, Any]:
    threshold = choose_threshold(scores, truth)
    sens, spec_ = rates(truth, scores >= threshold)
    return {"name": name, "params": params, "rule": describe_aggregation(name, params, subject) if name != "logistic"
            else describe_aggregation(name, params, subject) + " (scored leave-one-patient-out)",
            "validation": {"roc_auc": roc_auc(truth, scores), "threshold": threshold, "sensitivity": sens,
                           "specificity": spec_}}


def choose_aggregation(spec: TaskSpec, positive: str, label: str, patients: Sequence[Patient]
                       ) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """The aggregation chosen on validation patients, its parameters, and every candidate's validation figures."""
    truth = np.array([p.positive for p in patients])
    table, fitted = [], {}
    for name, params in CANDIDATES:
        if name == "logistic":
            scores, fitted = logistic_scores(spec, positive, patients)
        else:
            scores = study_scores(_rule(spec, positive, label, name, params), spec, patients)
        table.append(_candidate(name, params, scores, truth, label))

    def rank(item: tuple[int, dict[str, Any]]) -> tuple[float, float, int]:
        order, row = item
        figures = row["validation"]
        return (figures["roc_auc"] or 0.0, figures["specificity"] or 0.0, -order)

    best = max(enumerate(table), key=rank)[1]
    params = fitted if best["name"] == "logistic" else dict(best["params"])
    return best["name"], params, table


def _positive(spec: TaskSpec, card_positive: str | None, absent: str | None,
              name: str | None = None) -> tuple[str, str]:
    """The thresholded class or group of the study call, and its name."""
    if absent is not None:
        if absent not in spec.labels:
            raise ValueError(f"--absent {absent!r} is not a class of {spec.key}; one of {', '.join(spec.labels)}")
        members = [label for label in spec.labels if label != absent]
        return "+".join(members), name or " or ".join(members)
    if card_positive is None:
        raise ValueError(f"{spec.key} has no thresholded class: say which class means 'nothing found' with --absent "
                         f"(one of {', '.join(spec.labels)})")
    return card_positive, spec.positive_label or card_positive


def _command(args: argparse.Namespace) -> str:
    folder = args.data.resolve()
    if folder.parent.name == "data" and folder.parent.parent.name == "shared":
        data = f"../shared/data/{folder.name}"  # the data root beside the repository, as the README places it
    else:
        data = str(args.data) if not args.data.is_absolute() else f"DATA/{folder.name}"
    absent = f" --absent {args.absent}" if args.absent else ""
    absent += f" --positive-name {args.positive_name}" if args.positive_name else ""
    weights = f" --weights {args.weights.name}" if args.weights else ""
    return f"python -m core.lab.study --task {args.task} --data {data}{absent}{weights} --write-card"


def calibrate(classifier: Classifier, records: list[Record], args: argparse.Namespace) -> dict[str, Any]:
    """The card's `study` section for a model and its data folder (see the module docstring)."""
    spec, card = classifier.spec, classifier.card
    positive, label = _positive(spec, card.positive, args.absent, args.positive_name)
    common = {"positive": positive, "positive_label": label, "absent": args.absent, "key_slices": 3,
              "unit": "patient: every slice of one patient is one study; a patient is positive when any slice is",
              "slice_model": {"version": card.version, "sha256": card.sha256}, "command": _command(args)}
    if not any(r.patient for r in records):
        name, params = UNVALIDATED
        threshold = card.threshold if positive == card.positive and card.threshold is not None else 0.5
        how = ("the slice model's own operating threshold" if positive == card.positive and card.threshold is not None
               else "0.5: the group is likelier than the rest")
        return {**common, "aggregation": {"name": name, "params": params,
                                          "rule": describe_aggregation(name, params, label)},
                "threshold": threshold, "threshold_rule": f"{how}; not chosen on patients", "indeterminate": {},
                "validated": False, "reason": NO_PATIENTS, "findings": {}}

    records, images, sides = recorded_split(records, spec, card.training.config if card.training is not None else {})
    patients_by_side: dict[str, list[Patient]] = {}
    counts: dict[str, dict[str, int]] = {}
    members = positive_mask(spec.labels, positive)
    for side in ("train", "val", "test"):
        chosen = [i for i, s in enumerate(sides) if s == side]
        side_records = [records[i] for i in chosen]
        patients = {r.patient for r in side_records}
        positives = {r.patient for r in side_records if members[spec.label_index(r.label)]}
        counts[side] = {"patients": len(patients), "positive": len(positives), "slices": len(side_records)}
        if side == "train":
            continue
        scores = score_records(classifier, side_records, images=[images[i] for i in chosen])
        patients_by_side[side] = group_patients(side_records, scores, spec, positive)
    val, test = patients_by_side["val"], patients_by_side["test"]
    name, params, table = choose_aggregation(spec, positive, label, val)
    val_truth = np.array([p.positive for p in val])
    rule = _rule(spec, positive, label, name, params)
    val_scores = study_scores(rule, spec, val)
    if name == "logistic":  # the choice and the threshold rest on its leave-one-patient-out scores
        val_scores = logistic_scores(spec, positive, val)[0]
    threshold = choose_threshold(val_scores, val_truth)
    section = {
        **common,
        "aggregation": {"name": name, "params": params, "rule": describe_aggregation(name, params, label)},
        "threshold": threshold,
        "threshold_rule": (f"highest threshold with validation patient sensitivity >= {MIN_SENSITIVITY:.2f}, placed "
                           "halfway in log-odds to the next lower validation score"),
        "indeterminate": {},
        "indeterminate_note": "no band: too few validation patients to place one",
        "validated": True,
        "patients": counts,
        "selection": ("highest validation ROC-AUC; ties: higher validation specificity at the threshold rule, then the "
                      "simpler (listed first)"),
        "candidates": table,
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "interval": "95% percentile, patients resampled with "
                                                                        "replacement"},
    }
    rule = _rule(spec, positive, label, name, params, threshold)
    for side, patients in (("validation", val), ("test", test)):
        truth = np.array([p.positive for p in patients])
        scores = val_scores if side == "validation" else study_scores(rule, spec, patients)
        section[side] = patient_figures(scores, truth, scores >= threshold)
    section["findings"] = finding_section(classifier, val, test)
    return section


def finding_section(classifier: Classifier, val: Sequence[Patient], test: Sequence[Patient]) -> dict[str, Any]:
    """Per finding: the highest slice probability at the finding's slice threshold, on validation and test patients."""
    spec, card = classifier.spec, classifier.card
    out = {}
    for j, name in enumerate(spec.findings):
        threshold = card.findings[name].threshold
        entry: dict[str, Any] = {"aggregation": "max", "threshold": threshold,
                                 "threshold_rule": "the finding's slice threshold: present when any slice reaches it"}
        for side, patients in (("validation", val), ("test", test)):
            truth = np.array([p.findings[j] for p in patients], dtype=bool)
            scores = np.array([p.finding_probabilities[:, j].max() for p in patients])
            entry[side] = patient_figures(scores, truth, scores >= threshold)
        entry["unreliable"] = finding_study_reliability(entry["validation"])
        out[name] = entry
    return out


def describe(section: dict[str, Any], key: str) -> str:
    """The section as a few readable lines."""
    lines = [f"{key}: study call = {section['positive_label']} when {section['aggregation']['rule']} is at least "
             f"{section['threshold']:.4f} ({section['threshold_rule']})"]
    if not section.get("validated"):
        lines.append(f"  not validated per patient: {section.get('reason')}")
        return "\n".join(lines)
    counts = section["patients"]
    lines.append("  patients (positive): " + ", ".join(f"{side} {c['patients']} ({c['positive']})"
                                                        for side, c in counts.items()))
    lines.append("  candidates on validation patients (ROC-AUC; sensitivity / specificity at their own threshold):")
    for row in section["candidates"]:
        v = row["validation"]
        auc = "n/a" if v["roc_auc"] is None else f"{v['roc_auc']:.3f}"
        lines.append(f"    {row['name']:<13} {str(row['params'] or ''):<12} AUC {auc}  {v['sensitivity']:.2f} / "
                     f"{v['specificity']:.2f}")
    for side in ("validation", "test"):
        figures = section[side]
        lines.append(f"  {side} ({figures['patients']} patients, {figures['positives']} positive): {figure_text(figures)}")
    for name, entry in section.get("findings", {}).items():
        lines.append(f"  finding {name}: validation {entry['validation']['positives']} positive, test "
                     f"{entry['test']['positives']} positive; test {figure_text(entry['test'])}"
                     + (f"; unreliable: {entry['unreliable']}" if entry["unreliable"] else ""))
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = card_section_parser("Choose and measure the study call on patients; optionally store it in the card.",
                                 TASKS, "study")
    parser.add_argument("--absent", default=None,
                        help="for a model without a thresholded class: the class that means nothing was found "
                             "(the study call thresholds every other class together)")
    parser.add_argument("--positive-name", default=None,
                        help="with --absent: what the other classes together are called (e.g. tumour)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_card_section(get_args_parser(), argv, "study", calibrate, describe)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
