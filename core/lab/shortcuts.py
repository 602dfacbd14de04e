"""Shortcut audit for chest X-ray models: does the model read the lungs, or the source?

Usage:
    python -m core.lab.shortcuts --task cxr_covid --data ../shared/data/cxr_covid
    python -m core.lab.shortcuts --task cxr_pneumonia --data ../shared/data/cxr_pneumonia --write-card

On the test side of the card's split, the model is scored three times: on the images as they
are, with the lung fields blanked out, and with only the lung fields kept (everything else
blanked). A model that still scores well without the lungs is reading the source (device,
hospital, markers, borders), not the disease (DeGrave et al. 2021). It also reports the share
of the default CAM's mass that falls inside the lung fields, against the share of the image
the lung fields cover.

Lung-field estimate: a fixed anatomical prior, not a segmentation. Two ellipses on the
whole frontal chest X-ray (for a model whose preprocessing crops the border, mapped into the
crop, so the same anatomy is blanked), centred at 29% and 71% of the width and 47% of
the height, half-axes 17% of the width and 32% of the height (about a third of the image). On
the training images they hold most of each lung field; the lateral edges and the
costophrenic angles of large lungs fall outside, and some mediastinum falls inside. Blanked
pixels take the image's own mean, so no new edge or brightness is added.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import torch

from core.lab.appraisal import stratified_sample
from core.lab.data import preprocess_pixels
from core.lab.evaluate import card_section_parser, card_side, compute_metrics, run_card_section
from core.explain import DEFAULT_METHOD, METHODS, compute_cam
from core.decision import card_probabilities, decide
from core.models import Classifier
from core.preprocess import Box, EvalPreset, apply_steps
from core.tasks import TASKS

logger = logging.getLogger(__name__)

LUNG_CENTRES: tuple[tuple[float, float], ...] = ((0.29, 0.47), (0.71, 0.47))
LUNG_HALF_AXES: tuple[float, float] = (0.17, 0.32)
VARIANTS: tuple[str, ...] = ("original", "lungs_blanked", "lungs_only")


def lung_mask(size: int, region: Box | None = None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """bool (size, size): the two lung-field ellipses of the anatomical prior (see the module docstring).

    The prior is placed on the whole radiograph. For a model whose preprocessing crops it
    (`region` = (top, bottom, left, right) of the image of `shape` (H, W) that the input covers),
    the ellipses are mapped into the crop, so they cover the same anatomy as without the crop.
    """
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    if region is None:
        xx, yy = u, v
    else:
        top, bottom, left, right = region
        height, width = shape
        xx, yy = (left + u * (right - left)) / width, (top + v * (bottom - top)) / height
    mask = np.zeros((size, size), dtype=bool)
    for cx, cy in LUNG_CENTRES:
        mask |= ((xx - cx) / LUNG_HALF_AXES[0]) ** 2 + ((yy - cy) / LUNG_HALF_AXES[1]) ** 2 <= 1.0
    return mask


def variant(pixels: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """The model pixels (S, S) in [0, 1] with the lung fields blanked, kept alone, or as they are."""
    if name == "original":
        return pixels
    fill = np.float32(pixels.mean())
    if name == "lungs_blanked":
        return np.where(mask, fill, pixels).astype(np.float32)
    if name == "lungs_only":
        return np.where(mask, pixels, fill).astype(np.float32)
    raise ValueError(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")


def batch_probabilities(classifier: Classifier, batch_pixels: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Calibrated class probabilities (N, C) of model-sized pixel arrays (S, S) in [0, 1]."""
    spec, out = classifier.spec, []
    preset = EvalPreset(spec)
    for start in range(0, len(batch_pixels), batch_size):
        logits = classifier.runner.logits(preset.tensor(np.stack(batch_pixels[start:start + batch_size])))
        out.append(card_probabilities(logits, spec, classifier.card)[0])
    return np.concatenate(out) if out else np.zeros((0, spec.num_classes))


def audit(classifier: Classifier, images: list[np.ndarray], labels: list[str], cam_images: int = 60,
          method: str | None = None, regions: list[tuple[Box, tuple[int, int]]] | None = None) -> dict:
    """Scores on the three variants and the CAM mass inside the lung fields.

    Args:
        classifier: A loaded chest X-ray model.
        images: uint8 (H, W) model pixels as `core.lab.data.load_pixels` gives them.
        labels: Their class keys.
        cam_images: How many images (evenly across classes) for the CAM mass.
        method: CAM method (default: the card's default method).
        regions: Per image, (region kept by the preprocessing, shape of the image before it), for a
            model whose preprocessing crops (`lung_mask`); None: the input is the whole image.

    Returns:
        The card's `shortcuts` section.
    """
    spec, card = classifier.spec, classifier.card
    method = method or (card.explanations.default_method if card.explanations is not None else DEFAULT_METHOD)
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}")
    targets = np.asarray([spec.label_index(label) for label in labels])
    preset = EvalPreset(spec)
    base = [preset.grey(img) for img in images]
    if regions is None:
        masks = [lung_mask(spec.input_size)] * len(base)
    else:
        masks = [lung_mask(spec.input_size, region, shape) for region, shape in regions]
    scores, decided = {}, {}
    for name in VARIANTS:
        probabilities = batch_probabilities(classifier, [variant(p, m, name) for p, m in zip(base, masks)])
        decided[name] = decide(probabilities, spec.labels, card.positive, card.threshold)
        m = compute_metrics(targets, probabilities, decided[name], spec)
        scores[name] = {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc")}
        logger.info("%s %s: %s", spec.key, name, scores[name])
    inside = []
    for i in stratified_sample(targets, cam_images):
        tensor = preset.tensor(base[i][None])
        heatmap = compute_cam(classifier, tensor, int(decided["original"][i]), method)
        if heatmap.sum() > 0:
            inside.append(float((heatmap * masks[i]).sum() / heatmap.sum()))
    return {
        "lung_fields": f"fixed anatomical prior: two ellipses centred at {LUNG_CENTRES[0]} and {LUNG_CENTRES[1]} of the "
                       f"radiograph, half-axes {LUNG_HALF_AXES[0]} x {LUNG_HALF_AXES[1]} of its width x height (mapped into "
                       "the model's crop where its preprocessing crops); blanked pixels take the image's mean",
        "lung_area_share": float(np.mean([m.mean() for m in masks])) if masks else float(lung_mask(spec.input_size).mean()),
        "preprocessing": list(spec.preprocessing),
        "scores": scores,
        "cam": {"method": method, "images": len(inside),
                "mass_in_lungs_mean": float(np.mean(inside)) if inside else None,
                "mass_in_lungs_median": float(np.median(inside)) if inside else None},
        "command": f"python -m core.lab.shortcuts --task {spec.key} --data DIR",
    }


def format_audit(section: dict, key: str) -> str:
    """The audit as text."""
    lines = [f"{key}: shortcut audit on the card's test split (lung fields: {section['lung_fields']})"]
    for name, s in section["scores"].items():
        auc = "n/a" if s["roc_auc"] is None else f"{s['roc_auc']:.3f}"
        lines.append(f"  {name:<14} n {s['n']}  accuracy {s['accuracy']:.3f}  balanced {s['balanced_accuracy']:.3f}  "
                     f"macro-F1 {s['macro_f1']:.3f}  ROC-AUC {auc}")
    cam = section["cam"]
    if cam["mass_in_lungs_mean"] is not None:
        lines.append(f"  {cam['method']} mass inside the lung fields: mean {cam['mass_in_lungs_mean']:.1%}, median "
                     f"{cam['mass_in_lungs_median']:.1%} over {cam['images']} images (the fields cover "
                     f"{section['lung_area_share']:.1%} of the image)")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = card_section_parser("Shortcut audit of a chest X-ray model on its card's test split.",
                                 [k for k, spec in TASKS.items() if "lungs" in spec.audits], "shortcuts")
    parser.add_argument("--cam-images", type=int, default=60)
    return parser


def audit_test_side(classifier: Classifier, records: list, args: argparse.Namespace) -> dict:
    """The audit on the test side of the split the model's card recorded."""
    spec = classifier.spec
    test_records, raw = card_side(classifier, records, "test", preprocess=False)
    prepared = [apply_steps(image, spec.preprocessing) for image in raw]
    regions = [(region, image.shape) for (_, region), image in zip(prepared, raw)] if spec.preprocessing else None
    return audit(classifier, [pixels for pixels, _ in prepared], [r.label for r in test_records], args.cam_images,
                 regions=regions)


def main(argv: list[str] | None = None) -> int:
    return run_card_section(get_args_parser(), argv, "shortcuts", audit_test_side, format_audit)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
