"""Wrong-input guard: flag a scan that does not belong to the chosen model.

Two checks, in order:
1. DICOM tags, where present: a Modality or BodyPartExamined that the model is not for.
2. An image-level check on the model's own penultimate features (the pooled input of its
   head, computed in the same forward pass as the prediction): a logistic "belongs to this
   model" score, trained on the model's training images against other tasks' training
   images and non-medical images (photos, documents, screenshots). Images whose score falls
   below a threshold set on the validation split are flagged.

Fit and measure with `python -m core.guard --data-root DIR` (see `core.guard_fit`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.imaging import Scan
from core.tasks import TaskSpec

logger = logging.getLogger(__name__)

VAL_QUANTILE = 0.01


@dataclass(frozen=True)
class GuardStats:
    """A linear 'belongs to this model' score on standardised penultimate features.

    Attributes:
        mean: float32 (D,) feature mean used for standardising.
        scale: float32 (D,) feature standard deviation.
        weight: float32 (D,) logistic weights.
        bias: Logistic intercept.
        threshold: Images with a belonging probability below this are flagged.
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    threshold: float

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
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "GuardStats":
        return cls(
            mean=tensors["mean"].numpy(),
            scale=tensors["scale"].numpy(),
            weight=tensors["weight"].numpy(),
            bias=float(tensors["bias"][0]),
            threshold=float(tensors["threshold"][0]),
        )


# Body parts a model accepts when a DICOM names one (upper case, as DICOM writes them).
BODY_PARTS: dict[str, tuple[str, ...]] = {
    "MR": ("BRAIN", "HEAD", "SKULL", "HEADNECK", "NEURO"),
    "CR": ("CHEST", "THORAX", "LUNG", "PORT CHEST"),
    "DX": ("CHEST", "THORAX", "LUNG", "PORT CHEST"),
    "CT": ("CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS", "CHESTABDOMEN", "CHEST ABDOMEN", "CHESTABDPELVIS"),
}


def check_tags(scan: Scan, spec: TaskSpec) -> str | None:
    """Reason to flag from DICOM tags, or None when they fit (or are absent)."""
    if scan.kind != "dicom":
        return None
    modality = scan.modality
    if modality and modality not in spec.modalities:
        return f"the DICOM file says its modality is {modality}, but this model is for {'/'.join(spec.modalities)} images"
    body_part = str(scan.info.get("BodyPartExamined", "")).strip().upper()
    expected = set(spec.body_parts) or {part for m in spec.modalities for part in BODY_PARTS.get(m, ())}
    if body_part and expected and body_part not in expected:
        return f"the DICOM file says the body part is {body_part}, but this model is for {spec.page.lower()} images"
    return None


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


def explain_flag(spec: TaskSpec, belonging: float) -> str:
    """The message for an image-level flag."""
    return (
        f"this image does not look like the images this model was trained on ({spec.trained_on}); "
        f"estimated probability that it belongs here: {belonging:.0%}. It may be another modality, "
        "another body part, another population, a photo or a document"
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fit and measure the models' wrong-input guards.")
    parser.add_argument("--data-root", required=True, type=Path, help="folder holding every task's data folder")
    parser.add_argument("--task", action="append", default=None, help="registry key (repeatable; default: all)")
    parser.add_argument("--fit-images", type=int, default=1500, help="own training images used to fit (seeded sample)")
    parser.add_argument("--other-images", type=int, default=400, help="training images per other task used to fit")
    parser.add_argument("--test-images", type=int, default=300, help="test images per other task used to measure")
    parser.add_argument("--weights-dir", type=Path, default=None, help="default: the bundled weights folder")
    parser.add_argument("--non-medical-weight", type=float, default=None,
                        help="weight of each photo / document among the negatives, relative to a scan (default 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.guard_fit import fit_all

    parser = get_args_parser()
    fit_all(parser.parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(main())
