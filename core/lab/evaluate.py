"""Score any SecondLook weights on any labelled folder.

Usage:
    python -m core.evaluate --task brain_mri --data ../shared/data/brain_mri
    python -m core.evaluate --task head_ct --data DIR --by patient --json   # the study call, per patient
    python -m core.evaluate --task cxr_covid --data DIR --json --predictions preds.csv
    python -m core.evaluate --task ct_cancer --data DIR --weights other.safetensors --split test

The folder holds `manifest.csv` (path,label[,split][,patient], and a 0/1 column per finding
for a multi-label model) or class subfolders. Every image is read with `core.imaging.read_scan`
and preprocessed exactly as in the app. A multi-label model is scored on its classes and on each
finding (ROC-AUC, average precision, sensitivity and specificity at the card's threshold).

With `--by patient` every patient's slices (manifest `patient` column, ordered by `slice`) form one
study, scored with the card's study call exactly as the app makes it (`core.study.call_study`): a
patient is positive when any of its slices is; ROC-AUC of the study score, sensitivity and
specificity at the card's study threshold, with bootstrap intervals over patients
(`core.lab.patients.score_patients`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.calibration import expected_calibration_error, sensitivity_specificity
from core.lab.data import SPLITS, Record, ScanDataset, check_labels, finding_targets, load_pixels, read_records, recorded_split
from core.lab.patients import format_patients, score_patients
from core.decision import card_probabilities, decide, positive_mask, positive_score
from core.models import Classifier, WeightsError, forward_module, load_candidate
from core.preprocess import EvalPreset
from core.tasks import TASKS, TaskSpec, get_task

logger = logging.getLogger(__name__)


def compute_metrics(targets: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray, spec: TaskSpec) -> dict:
    """Classification metrics for one scored set.

    Args:
        targets: int (N,) true class indices.
        probabilities: float (N, C) calibrated probabilities.
        predictions: int (N,) decided classes.
        spec: The model's spec (labels, positive class).

    Returns:
        n, accuracy, balanced_accuracy, macro_f1, roc_auc (binary: of the positive class;
        multiclass: macro one-vs-rest; None where a class is absent), ece, per_class,
        confusion_matrix {labels, matrix}; with more than two classes and a positive class or
        group, positive_vs_rest {positive, accuracy, roc_auc} (e.g. pneumonia vs normal).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = list(spec.labels)
    classes = list(range(len(labels)))
    targets = np.asarray(targets, dtype=np.int64)
    n = int(len(targets))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=classes, zero_division=0
    )
    present = support > 0
    roc_auc = None
    try:
        if len(labels) == 2:
            pos = labels.index(spec.positive) if spec.positive else 1
            roc_auc = float(roc_auc_score(targets == pos, probabilities[:, pos]))
        else:
            roc_auc = float(roc_auc_score(targets, probabilities, multi_class="ovr", average="macro", labels=classes))
    except ValueError:
        roc_auc = None
    grouped = {}
    if spec.positive is not None and len(labels) > 2 and n:  # the thresholded class or group against the rest
        truth = positive_mask(spec.labels, spec.positive)[targets]
        called = positive_mask(spec.labels, spec.positive)[np.asarray(predictions, dtype=np.int64)]
        both = truth.any() and not truth.all()
        score = positive_score(probabilities, spec.labels, spec.positive)
        grouped = {"positive_vs_rest": {"positive": spec.positive, "accuracy": float((truth == called).mean()),
                                        "roc_auc": float(roc_auc_score(truth, score)) if both else None}}
    return {
        **grouped,
        "n": n,
        "accuracy": float((predictions == targets).mean()) if n else None,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else None,
        "macro_f1": float(f1[present].mean()) if present.any() else None,
        "roc_auc": roc_auc,
        "ece": expected_calibration_error(probabilities, targets) if n else None,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(targets, predictions, labels=classes).tolist()},
    }


def threshold_figures(probabilities: np.ndarray, targets: np.ndarray, labels: tuple[str, ...], positive: str,
                      threshold: float) -> dict:
    """Sensitivity and specificity of the thresholded positive class (or group) against the true classes."""
    sens, spec_ = sensitivity_specificity(positive_score(probabilities, labels, positive),
                                          positive_mask(labels, positive)[np.asarray(targets)], threshold)
    return {"sensitivity": sens, "specificity": spec_}


def compute_finding_metrics(targets: np.ndarray, probabilities: np.ndarray, thresholds: list[float],
                            findings: Sequence[str]) -> dict:
    """Per-finding metrics of a multi-label model.

    Args:
        targets: float or int (N, F) 0/1 truth, one column per finding in registry order.
        probabilities: float (N, F) calibrated finding probabilities.
        thresholds: One operating threshold per finding.
        findings: The findings' keys, one per column (a spec's `findings`).

    Returns:
        {finding: {n, positives, roc_auc, average_precision (None where a side has no case),
        threshold, sensitivity, specificity (None without positives / negatives)}}.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    targets = np.asarray(targets).astype(bool)
    out = {}
    for j, name in enumerate(findings):
        truth, scores = targets[:, j], np.asarray(probabilities)[:, j]
        both = truth.any() and not truth.all()
        sens, spec_ = sensitivity_specificity(scores, truth, thresholds[j])
        out[name] = {
            "n": int(len(truth)),
            "positives": int(truth.sum()),
            "roc_auc": float(roc_auc_score(truth, scores)) if both else None,
            "average_precision": float(average_precision_score(truth, scores)) if both else None,
            "threshold": float(thresholds[j]),
            "sensitivity": None if np.isnan(sens) else sens,
            "specificity": None if np.isnan(spec_) else spec_,
        }
    return out


def collect_logits(model: torch.nn.Module, loader: DataLoader, spec: TaskSpec, device: torch.device) -> np.ndarray:
    """Outputs (N, C + F) of a model over a loader of unnormalised (N, 1, S, S) batches."""
    model.eval()
    preset = EvalPreset(spec)
    outputs = [forward_module(model, preset.tensor(images[:, 0].to(device, non_blocking=True))).logits
               for images, *_ in loader]
    return np.concatenate(outputs) if outputs else np.zeros((0, spec.num_outputs), dtype=np.float32)


class Scores(NamedTuple):
    """A loaded model's calibrated outputs on labelled records."""

    targets: np.ndarray  # int (N,) true class indices
    probabilities: np.ndarray  # float64 (N, C) class probabilities
    finding_targets: np.ndarray  # float32 (N, F) 0/1 truth of the findings (F = 0 without findings)
    finding_probabilities: np.ndarray  # float64 (N, F)


def score_records(
    classifier: Classifier, records: list[Record], batch_size: int = 16, images: list[np.ndarray] | None = None
) -> Scores:
    """Targets and calibrated probabilities of a loaded model on records (findings too, where it has any).

    `images` may carry the records' pixels already read with `load_pixels`.

    Raises:
        ValueError: For a label the model does not know, or a missing / invalid finding column.
    """
    spec = classifier.spec
    check_labels(records, spec)
    targets = [spec.label_index(r.label) for r in records]
    findings = finding_targets(records, spec)
    images = load_pixels(records, spec) if images is None else images
    loader = DataLoader(ScanDataset(images, targets, spec, train=False), batch_size=batch_size)
    preset = EvalPreset(spec)
    logits = np.concatenate([classifier.runner.logits(preset.tensor(images[:, 0])) for images, *_ in loader]) \
        if len(images) else np.zeros((0, spec.num_outputs), dtype=np.float32)
    probabilities, finding_probabilities = card_probabilities(logits, spec, classifier.card)
    return Scores(np.asarray(targets), probabilities, findings, finding_probabilities)


def format_report(metrics: dict, title: str) -> str:
    """Human-readable text for a metrics dict."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [title, f"  images             {metrics['n']}"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece"):
        lines.append(f"  {name:<18} {fmt(metrics[name])}")
    if metrics.get("positive_vs_rest"):
        grouped = metrics["positive_vs_rest"]
        lines.append(f"  {grouped['positive']} vs the rest: accuracy {fmt(grouped['accuracy'])}, "
                     f"ROC-AUC {fmt(grouped['roc_auc'])}")
    if metrics.get("at_threshold"):
        at = metrics["at_threshold"]
        lines.append(f"  at the card's threshold {at['threshold']:.4f}: sensitivity {fmt(at['sensitivity'])}, "
                     f"specificity {fmt(at['specificity'])}")
    lines.append("  per class           precision  recall  f1      support")
    for label, row in metrics["per_class"].items():
        lines.append(f"    {label:<16}  {row['precision']:.4f}     {row['recall']:.4f}  {row['f1']:.4f}  {row['support']}")
    cm = metrics["confusion_matrix"]
    lines.append("  confusion matrix (rows: true, columns: predicted): " + ", ".join(cm["labels"]))
    for label, row in zip(cm["labels"], cm["matrix"]):
        lines.append(f"    {label:<16}  " + " ".join(f"{v:>6d}" for v in row))
    if metrics.get("findings"):
        lines.append("  findings (independent)  positives  roc_auc  avg_prec  threshold  sensitivity  specificity")
        for name, row in metrics["findings"].items():
            lines.append(f"    {name:<20}  {row['positives']:>9d}  {fmt(row['roc_auc']):>7}  {fmt(row['average_precision']):>8}"
                         f"  {row['threshold']:>9.4f}  {fmt(row['sensitivity']):>11}  {fmt(row['specificity']):>11}")
    return "\n".join(lines)


def write_predictions(path: Path, records: list[Record], spec: TaskSpec, probabilities: np.ndarray, predictions: np.ndarray,
                      finding_probabilities: np.ndarray | None = None) -> None:
    """One CSV row per image: path,label,pred,prob_<class>...[,prob_<finding>...]"""
    if finding_probabilities is None:
        finding_probabilities = np.zeros((len(records), 0))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "pred"] + [f"prob_{key}" for key in spec.labels + spec.findings[:finding_probabilities.shape[1]]])
        for record, probs, pred, finding in zip(records, probabilities, predictions, finding_probabilities):
            writer.writerow([record.rel, record.label, spec.labels[pred]] + [f"{p:.6f}" for p in (*probs, *finding)])


def card_section_parser(description: str, tasks: Sequence[str], field: str) -> argparse.ArgumentParser:
    """Arguments of a command that measures a bundled model on its data folder and may store the
    result as one card field: --task, --data, --weights, --write-card."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", required=True, choices=sorted(tasks))
    parser.add_argument("--data", required=True, type=Path, help="the folder the model was trained on")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/<task>.safetensors)")
    parser.add_argument("--write-card", action="store_true", help=f"store the result in the card (field `{field}`)")
    return parser


def run_card_section(parser: argparse.ArgumentParser, argv: list[str] | None, field: str,
                     measure: Callable[[Classifier, list[Record], argparse.Namespace], dict],
                     describe: Callable[[dict, str], str]) -> int:
    """Load the model and its data folder, `measure` them, print `describe(section, key)`, and with
    --write-card store the section as the card's `field`. Bad arguments or files exit with 2."""
    from core.cards import update_card
    from core.models import card_path

    args = parser.parse_args(argv)
    spec = get_task(args.task)
    try:
        records = read_records(args.data)
        check_labels(records, spec)
        section = measure(load_candidate(spec, args.weights), records, args)
    except (ValueError, WeightsError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(describe(section, spec.key))
    if args.write_card:
        update_card(card_path(spec, args.weights), f"{field}: {parser.prog} " + " ".join(argv or sys.argv[1:]),
                    **{field: section})
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score SecondLook weights on a labelled folder.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key of the model")
    parser.add_argument("--data", required=True, type=Path, help="folder with manifest.csv or class subfolders")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/<task>.safetensors)")
    parser.add_argument("--split", default=None, help="score only manifest rows with this split value")
    parser.add_argument("--card-split", choices=SPLITS, default=None,
                        help="re-carve the split recorded in the model's card on DIR and score this side (e.g. test)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--predictions", type=Path, default=None, help="write per-image predictions to this CSV")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--by", choices=("image", "patient"), default="image",
                        help="score every image, or every patient's study call (needs a patient column)")
    return parser


def select_split(root: Path, records: list[Record], split: str | None) -> list[Record]:
    """Keep only the manifest rows whose `split` column equals `split` (all when None)."""
    if split is None:
        return records
    with open(root / "manifest.csv", newline="", encoding="utf-8") as handle:
        wanted = {row["path"] for row in csv.DictReader(handle) if row.get("split") == split}
    chosen = [r for r in records if r.rel in wanted]
    if not chosen:
        raise ValueError(f"no rows with split {split!r} in {root / 'manifest.csv'}")
    return chosen


def card_side(classifier: Classifier, records: list[Record], side: str,
              preprocess: bool = True) -> tuple[list[Record], list[np.ndarray]]:
    """The records (and pixels) on one side of the split the card says the model was trained with;
    preprocess=False: the pixels before the model's preprocessing steps (see `recorded_split`)."""
    records, images, sides = recorded_split(records, classifier.spec, classifier.card.training.config,
                                            preprocess)
    chosen = [i for i, s in enumerate(sides) if s == side]
    return [records[i] for i in chosen], [images[i] for i in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    spec = get_task(args.task)
    try:
        records = select_split(args.data, read_records(args.data), args.split)
        check_labels(records, spec)
        classifier = load_candidate(spec, args.weights)
        images = None
        if args.card_split:
            records, images = card_side(classifier, records, args.card_split)
        scores = score_records(classifier, records, args.batch_size, images)
        if args.by == "patient":
            patients = score_patients(classifier, records, scores)
    except (ValueError, WeightsError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    if args.by == "patient":
        print(json.dumps(patients) if args.json else
              format_patients(patients, f"{spec.key} ({classifier.card.name} {classifier.card.version}) per patient "
                                        f"on {args.data}"))
        return 0
    card = classifier.card
    predictions = decide(scores.probabilities, spec.labels, card.positive, card.threshold)
    metrics = compute_metrics(scores.targets, scores.probabilities, predictions, spec)
    if card.threshold is not None:
        metrics["at_threshold"] = {"threshold": card.threshold, **threshold_figures(
            scores.probabilities, scores.targets, spec.labels, card.positive, card.threshold)}
    if spec.findings:
        thresholds = [card.findings[name].threshold for name in spec.findings]
        metrics["findings"] = compute_finding_metrics(scores.finding_targets, scores.finding_probabilities, thresholds,
                                                     spec.findings)
    if args.predictions:
        write_predictions(args.predictions, records, spec, scores.probabilities, predictions, scores.finding_probabilities)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_report(metrics, f"{spec.key} ({classifier.card.name} {classifier.card.version}) on {args.data}"))
    return 0

