"""Decisions: calibrated probabilities -> the call, the indeterminate band, findings and the guard's verdict.

The one place a prediction is made (`predict`), for every front end: the app, the command lines,
the API and the study reader. Every figure a reader sees comes from here, so this is where a
probability that is not a number is stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.calibration import output_probabilities
from core.cards import BandCard, FindingCard, ModelCard
from core.guard import GuardVerdict, TagCheck, judge
from core.models import Classifier
from core.tasks import TaskSpec, positive_classes

LOGIT_CLIP = 1e-6  # probabilities are clipped to [1e-6, 1 - 1e-6] before log-odds


def log_odds(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Band:
    """The indeterminate band: outputs this close to the decision boundary read "uncertain".

    The distance is in log-odds, so a band means the same near a threshold of 0.11 as near 0.5:
    |logit(P) - logit(threshold)| for a thresholded output, log(P(top) / P(second)) for an argmax call.

    Attributes:
        width: Half-width of the band in log-odds (natural log); 0 means no band.
    """

    width: float

    def contains(self, distance: float | np.ndarray) -> np.ndarray:
        """True where a log-odds distance lies inside the band."""
        return np.asarray(distance) < self.width

    def interval(self, threshold: float) -> tuple[float, float]:
        """The probabilities a thresholded output is uncertain between: (low, high)."""
        centre = float(log_odds(threshold))
        return _sigmoid(centre - self.width), _sigmoid(centre + self.width)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def band_of(section: BandCard | None) -> Band | None:
    """The band a card declares (log-odds, width > 0), or None for no band."""
    if section is None or section.scale != "log-odds" or not section.width > 0:
        return None
    return Band(float(section.width))


@dataclass(frozen=True)
class Finding:
    """One independent finding of a multi-label model, for one scan.

    Attributes:
        key: The finding's key (a manifest column).
        title: Its human name.
        probability: Calibrated probability (sigmoid of its logit / its temperature).
        threshold: The card's operating threshold for it, chosen on validation.
        sensitivity: Held-out sensitivity at that threshold (the card's test figures), where known.
        specificity: Held-out specificity at that threshold, where known.
        unreliable: Why the card's own figures say this output cannot be relied on, or None.
        band: Its indeterminate band, or None.
    """

    key: str
    title: str
    probability: float
    threshold: float
    sensitivity: float | None = None
    specificity: float | None = None
    unreliable: str | None = None
    band: Band | None = None

    @property
    def above_threshold(self) -> bool:
        """At or above its threshold, whatever its reliability."""
        return self.probability >= self.threshold

    @property
    def uncertain(self) -> bool:
        """Inside its indeterminate band."""
        if self.band is None:
            return False
        return bool(self.band.contains(abs(float(log_odds(self.probability) - log_odds(self.threshold)))))

    @property
    def present(self) -> bool:
        """Called present: above its threshold, outside its band, and reliable."""
        return self.unreliable is None and self.above_threshold and not self.uncertain


@dataclass(frozen=True)
class Prediction:
    """A calibrated prediction for one scan, with the call and the guard's verdict.

    Attributes:
        labels: Class keys in model order.
        probabilities: float64 (C,) calibrated probabilities (softmax of logits / T).
        index: Index of the decided class.
        threshold: Operating threshold on the positive class (or group), where the model has one.
        positive: The thresholded class, or "+"-joined group of classes, where the model has one.
        positive_label: Short name of the positive ("pneumonia" for a group, else the class).
        guard: The wrong-input guard's verdict.
        band: The card's indeterminate band, or None where it has none.
        findings: The independent findings of a multi-label model (empty for other models).
    """

    labels: tuple[str, ...]
    probabilities: np.ndarray
    index: int
    threshold: float | None = None
    positive: str | None = None
    positive_label: str | None = None
    guard: GuardVerdict = GuardVerdict.passed()
    band: Band | None = None
    findings: tuple[Finding, ...] = ()

    @property
    def label(self) -> str:
        """The decided class key."""
        return self.labels[self.index]

    @property
    def flag(self) -> str | None:
        """Why the scan is refused (out of range for this model), or None."""
        return self.guard.reason if self.guard.refused else None

    def as_dict(self) -> dict[str, float]:
        """{label: probability}."""
        return {label: float(p) for label, p in zip(self.labels, self.probabilities)}

    @property
    def distance(self) -> float:
        """How far the output is from changing its call, in log-odds (see `Band`)."""
        return float(decision_distance(self.probabilities[None], self.labels, self.positive, self.threshold)[0])

    @property
    def uncertain(self) -> bool:
        """True inside the indeterminate band, where the output reads "uncertain", not a class."""
        return self.band is not None and bool(self.band.contains(self.distance))

    @property
    def grouped(self) -> bool:
        """Whether the positive is a group of classes (its summed probability is thresholded)."""
        return self.positive is not None and "+" in self.positive

    @property
    def positive_probability(self) -> float | None:
        """The thresholded probability: of the positive class, or summed over the positive group."""
        if self.positive is None:
            return None
        return float(positive_score(self.probabilities[None], self.labels, self.positive)[0])

    @property
    def called_positive(self) -> bool:
        """Whether the call is the positive class (or a member of the positive group)."""
        return self.positive is not None and self.label in positive_classes(self.positive)

    def headline(self) -> tuple[str, float]:
        """What the page shows as the answer and the probability behind it; chart and call agree with it.

        A grouped positive that is called reads as the group ("pneumonia", the summed probability);
        below a threshold the call is the likeliest other class with its own probability.
        """
        if self.grouped and self.called_positive:
            return str(self.positive_label), float(self.positive_probability)
        return self.label, float(self.probabilities[self.index])

    def headline_text(self) -> str:
        """The answer in one line, in the terms the call was made in.

        Without a threshold: "glioma 93%". With one, the thresholded probability against its threshold, so that
        a call made at 15% reads as what it is: "hemorrhage 15%, at or above its 12% threshold"; "normal:
        hemorrhage 5%, below its 12% threshold"; a group with its members: "pneumonia 93% (bacterial 70%, viral
        23%), at or above its 92% threshold". Inside the band: "uncertain: hemorrhage 15%, near its 12% threshold".
        """
        name, p = self.headline()
        if self.threshold is None or self.positive is None:
            text = f"{name} {p:.0%}"
            return f"uncertain (likelier {text})" if self.uncertain else text
        score = float(self.positive_probability)
        group = ""
        if self.grouped:
            group = " (" + ", ".join(f"{label} {self.probabilities[self.labels.index(label)]:.0%}"
                                     for label in positive_classes(str(self.positive))) + ")"
        where = "near" if self.uncertain else "at or above" if self.called_positive else "below"
        figure = f"{self.positive_label} {score:.0%}{group}, {where} its {self.threshold:.0%} threshold"
        if self.uncertain:
            return f"uncertain: {figure}"
        return figure if self.called_positive else f"{name}: {figure}"


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


def decision_distance(probabilities: np.ndarray, labels: Sequence[str], positive: str | None,
                      threshold: float | None) -> np.ndarray:
    """How far each row is from changing its call, in log-odds.

    With an operating threshold: |logit(P(positive)) - logit(threshold)|; without one:
    log(P(top) / P(second)).

    Args:
        probabilities: float (N, C).

    Returns:
        float64 (N,) >= 0.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if positive is not None and threshold is not None:
        return np.abs(log_odds(positive_score(probabilities, labels, positive)) - log_odds(threshold))
    top = np.sort(np.clip(probabilities, LOGIT_CLIP, None), axis=1)
    return np.log(top[:, -1]) - np.log(top[:, -2])


def decide(probabilities: np.ndarray, labels: Sequence[str], positive: str | None, threshold: float | None) -> np.ndarray:
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
    temperatures = [card.findings[name].temperature for name in spec.findings]
    return output_probabilities(logits, spec.num_classes, card.temperature, temperatures)


# A finding is shown as unreliable (greyed, never "present") when its card's validation figures fall
# below these: validation sensitivity at its threshold, or validation ROC-AUC.
FINDING_MIN_SENSITIVITY = 0.5
FINDING_MIN_AUC = 0.7


def finding_reliability(card_finding: FindingCard) -> str | None:
    """Why a finding's own validation figures say it cannot be relied on, or None."""
    validation = card_finding.validation
    sensitivity, auc, positives = validation.sensitivity, validation.roc_auc, validation.positives
    if positives < 3:
        return f"only {positives} positive validation slices: its threshold could not be set"
    if auc is None or auc < FINDING_MIN_AUC:
        return f"validation ROC-AUC {'n/a' if auc is None else f'{auc:.2f}'} is below {FINDING_MIN_AUC:.2f}"
    if sensitivity is None or sensitivity < FINDING_MIN_SENSITIVITY:
        shown = "n/a" if sensitivity is None else f"{sensitivity:.2f}"
        return f"validation sensitivity {shown} at its threshold is below {FINDING_MIN_SENSITIVITY:.2f}"
    return None


def _findings(spec: TaskSpec, card: ModelCard, row: np.ndarray) -> tuple[Finding, ...]:
    out = []
    bands = card.indeterminate.findings if card.indeterminate is not None else {}
    for j, name in enumerate(spec.findings):
        entry = card.findings[name]
        out.append(Finding(name, spec.output_title(name), float(row[j]), entry.threshold, entry.test.sensitivity,
                           entry.test.specificity, finding_reliability(entry), band_of(bands.get(name))))
    return tuple(out)


def predict(classifier: Classifier, batch: torch.Tensor, tags: Sequence[TagCheck | str | None] | None = None) -> list[Prediction]:
    """Predictions for a batch of normalised inputs (N, 3, S, S) in one forward pass, with the guard's verdicts.

    Args:
        classifier: A loaded model.
        batch: float32 (N, 3, S, S) model inputs.
        tags: Per input, what its DICOM tags say (`core.guard.read_tags` of its scan; a plain reason string is
            taken as a refusal), or None; default: no tags.

    Returns:
        N predictions, in input order.

    Raises:
        FloatingPointError: If any probability is not a finite number (never shown to anyone).
    """
    outputs = classifier.runner.run(batch)
    card, spec = classifier.card, classifier.spec
    probs, finding_probs = card_probabilities(outputs.logits, spec, card)
    if not (np.isfinite(probs).all() and np.isfinite(finding_probs).all()):
        raise FloatingPointError(f"{spec.key} gave a probability that is not a number")
    decided = decide(probs, spec.labels, card.positive, card.threshold)
    belonging = classifier.guard.belonging(outputs.features) if classifier.guard is not None else None
    tags = list(tags) if tags is not None else [None] * len(probs)
    band = band_of(card.indeterminate.classes if card.indeterminate is not None else None)
    predictions = []
    for row, tag in enumerate(tags):
        verdict = judge(classifier.guard, None if belonging is None else float(belonging[row]), spec, tag)
        predictions.append(Prediction(spec.labels, probs[row], int(decided[row]), card.threshold, card.positive,
                                      spec.positive_label, verdict, band, _findings(spec, card, finding_probs[row])))
    return predictions
