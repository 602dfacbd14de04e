"""Wrong-input guard: flag a scan that does not belong to the chosen model.

Two checks, in order:
1. DICOM tags, where present: a Modality or BodyPartExamined that the model is not for.
2. An image-level check on the model's own penultimate features (the pooled input of its
   head, computed in the same forward pass as the prediction): a logistic "belongs to this
   model" score, trained on the model's training images against other tasks' training
   images and non-medical images (photos, documents, screenshots). Images whose score falls
   below a threshold set on the validation split are flagged.

Three outcomes (`judge`): in range (answered), borderline (answered with a warning and the reason),
out of range (refused with the reason; the reader may still ask to see the output).

Fit and measure with `python -m core.lab.guard_fit --data-root DIR`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.imaging import Scan
from core.tasks import TaskSpec
from core.vocabulary import known_body_part, known_modality

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class GuardStats:
    """A linear 'belongs to this model' score on standardised penultimate features.

    Attributes:
        mean: float32 (D,) feature mean used for standardising.
        scale: float32 (D,) feature standard deviation.
        weight: float32 (D,) logistic weights.
        bias: Logistic intercept.
        threshold: Images with a score below this are out of range (refused).
        borderline: Images with a score below this (and at or above `threshold`) are borderline
            (answered with a warning); None: no borderline zone.
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    threshold: float
    borderline: float | None = None

    def belonging(self, features: np.ndarray) -> np.ndarray:
        """Probability (N,) that each row of features (N, D) is an image this model is for."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z @ self.weight.astype(np.float64) + self.bias, -50, 50)))

    def flags(self, features: np.ndarray) -> np.ndarray:
        """Boolean (N,): True where the image is flagged."""
        return self.belonging(features) < self.threshold

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """For saving as safetensors."""
        return {
            "mean": torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float32)),
            "scale": torch.from_numpy(np.ascontiguousarray(self.scale, dtype=np.float32)),
            "weight": torch.from_numpy(np.ascontiguousarray(self.weight, dtype=np.float32)),
            "bias": torch.tensor([self.bias], dtype=torch.float32),
            "threshold": torch.tensor([self.threshold], dtype=torch.float32),
            **({"borderline": torch.tensor([self.borderline], dtype=torch.float32)} if self.borderline is not None else {}),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "GuardStats":
        return cls(
            mean=tensors["mean"].numpy(),
            scale=tensors["scale"].numpy(),
            weight=tensors["weight"].numpy(),
            bias=float(tensors["bias"][0]),
            threshold=float(tensors["threshold"][0]),
            borderline=float(tensors["borderline"][0]) if "borderline" in tensors else None,
        )


# Body parts a model accepts when a DICOM names one (upper case, as DICOM writes them).
BODY_PARTS: dict[str, tuple[str, ...]] = {
    "MR": ("BRAIN", "HEAD", "SKULL", "HEADNECK", "NEURO"),
    "CR": ("CHEST", "THORAX", "LUNG", "PORT CHEST"),
    "DX": ("CHEST", "THORAX", "LUNG", "PORT CHEST"),
    "CT": ("CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS", "CHESTABDOMEN", "CHEST ABDOMEN", "CHESTABDPELVIS"),
}


@dataclass(frozen=True)
class TagCheck:
    """What a scan's DICOM tags say about the model: a reason to refuse, or whether they confirm it is for it.

    Attributes:
        reason: Why the tags say the scan is not for this model (modality or body part), or None.
        confirms: The scan is a DICOM whose modality (and body part, where it names one) is the model's.
    """

    reason: str | None = None
    confirms: bool = False


COLOUR_SHARE = 0.05  # an image with more clearly coloured pixels than this is not a scan


def read_tags(scan: Scan, spec: TaskSpec) -> TagCheck:
    """What the file itself says about a model: DICOM tags (modality, body part), or for an ordinary image its
    colour (X-ray, CT and MRI scans are grey; a photo or an annotated screenshot is not).

    A reason names a tag value only where it is in the fixed vocabulary of `core.vocabulary`: a free-text
    tag may name the patient.
    """
    if scan.kind != "dicom":
        share = float(scan.info.get("colour_share", 0.0))
        if share > COLOUR_SHARE:
            return TagCheck(f"this is a colour image ({share:.0%} of its pixels clearly coloured); X-ray, CT and MRI "
                            "scans are grey, so it is probably a photo, a chart or an annotated screenshot")
        return TagCheck()
    modality = scan.modality
    if modality and modality not in spec.modalities:
        said = f"its modality is {modality}" if known_modality(modality) else "a modality that is not a DICOM code"
        return TagCheck(f"the DICOM file says {said}, but this model is for {'/'.join(spec.modalities)} images")
    body_part = str(scan.info.get("BodyPartExamined", "")).strip().upper()
    expected = set(spec.body_parts) or {part for m in spec.modalities for part in BODY_PARTS.get(m, ())}
    if body_part and expected and body_part not in expected:
        said = f"the body part is {body_part}" if known_body_part(body_part) else "another body part"
        return TagCheck(f"the DICOM file says {said}, but this model is for {spec.page.lower()} images")
    return TagCheck(confirms=bool(modality))


def check_tags(scan: Scan, spec: TaskSpec) -> str | None:
    """Reason to flag from DICOM tags (or an ordinary image's colour), or None when they fit (or are absent)."""
    return read_tags(scan, spec).reason


def plane_mismatch(scan: Scan, spec: TaskSpec) -> str | None:
    """A warning when a DICOM slice's plane (from ImageOrientationPatient) is not the model's.

    Returns:
        The message, or None when the planes agree or either is unknown.
    """
    plane = scan.info.get("orientation")
    if not plane or not spec.plane or plane == spec.plane:
        return None
    return (f"This slice is {plane} (from the DICOM orientation); the model was trained on {spec.plane} slices "
            f"only, so its output on a {plane} slice has not been tested.")


OUTCOMES: tuple[str, ...] = ("in_range", "borderline", "out_of_range")


@dataclass(frozen=True)
class GuardVerdict:
    """Whether a scan belongs to the model: in range (answer), borderline (answer with a warning), or
    out of range (refused, with the reason; the reader may still ask to see the output).

    Attributes:
        outcome: One of `OUTCOMES`.
        reason: What the reader is told (None when in range).
        score: The image-level similarity score in [0, 1], where it was computed.
        threshold: Scores below it are out of range.
        borderline: Scores below it (and at or above `threshold`) are borderline.
    """

    outcome: str
    reason: str | None = None
    score: float | None = None
    threshold: float | None = None
    borderline: float | None = None

    @classmethod
    def passed(cls) -> "GuardVerdict":
        """In range, with no score (no guard, or nothing to check)."""
        return cls("in_range")

    @property
    def refused(self) -> bool:
        """Out of range: the scan is not classified unless the reader asks."""
        return self.outcome == "out_of_range"

    @property
    def warned(self) -> bool:
        """Borderline: answered, with a visible warning."""
        return self.outcome == "borderline"


def judge(stats: GuardStats | None, score: float | None, spec: TaskSpec, tags: TagCheck | str | None = None) -> GuardVerdict:
    """The verdict for one scan: a DICOM tag mismatch first, then the image-level score against the thresholds.

    The message names the score and the thresholds in words: the score says how much the image
    resembles this model's training images against other tasks' scans, photos and documents
    (a score, not the probability that the answer is right). A DICOM whose tags confirm the model's
    modality and body part is never refused on its score alone: a real scanner's slice may look
    unlike the exported training images, so a low score makes it borderline, with the reason.
    """
    tags = TagCheck(tags) if isinstance(tags, str) else tags or TagCheck()
    if tags.reason is not None:
        return GuardVerdict("out_of_range", tags.reason + ".")
    if stats is None or score is None:
        return GuardVerdict.passed()
    threshold = stats.threshold
    borderline = max(stats.borderline or threshold, threshold)
    resemblance = (f"its resemblance to this model's training images ({spec.trained_on}) scores {score:.0%} on a "
                   f"0-100% scale set against other scans, photos and documents")
    if score < threshold and tags.confirms:
        return GuardVerdict("borderline", (
            f"The DICOM tags say this is a {'/'.join(spec.modalities)} image of the right body part, but the image is "
            f"unlike the model's training images ({spec.trained_on}): its resemblance scores {score:.0%}, where "
            f"images from elsewhere scoring below {threshold:.0%} are not classified. The output is shown with this "
            "warning; read it with extra care."), score, threshold, borderline)
    if score < threshold:
        return GuardVerdict("out_of_range", (
            f"This image is outside what the model was trained on: {resemblance}; images scoring below "
            f"{threshold:.0%} are not classified. It may be another modality, body part or population, a photo or "
            "a document."), score, threshold, borderline)
    if score < borderline:
        return GuardVerdict("borderline", (
            f"This image is at the edge of what the model was trained on: {resemblance}; most of the model's own "
            f"held-out scans score above {borderline:.0%} (below {threshold:.0%} an image is refused). Read the "
            "output with extra care."), score, threshold, borderline)
    return GuardVerdict("in_range", None, score, threshold, borderline)
