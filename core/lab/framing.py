"""Acquisition shortcut check for any model: do image size, aspect ratio or border predict the label?

Usage:
    python -m core.lab.framing --task brain_mri --data ../shared/data/brain_mri
    python -m core.lab.framing --task brain_mri --data ../shared/data/brain_mri --write-card

Where each class comes from a different source, the frame around the anatomy can give the label
away (brain_mri: "no_tumor" comes mostly from Br35H, with other sizes and sequences). On the
split the card recorded, this fits a small classifier (gradient-boosted trees) on the train
side using only frame features, and scores it on the test side next to the model:
- size: height, width and aspect ratio of the image as stored;
- border: mean grey level and share of near-black pixels of the outer 8% frame, and the
  aspect ratio of the non-black content's bounding box.
A high score means the label is readable from the frame: a model may have learnt that too.

It then scores the model on the same test images re-framed to another aspect ratio, as
another scanner or export would frame them: padded with black to 4:3 (wider) or 3:4 (taller),
and centre-cropped to 4:3 and 3:4. A model that reads anatomy should keep its accuracy.
The card's field `acquisition` keeps the result; the Model cards page shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from core.lab.data import recorded_split
from core.lab.evaluate import card_section_parser, compute_metrics, run_card_section
from core.models import Classifier
from core.decision import decide
from core.preprocess import EvalPreset
from core.lab.shortcuts import batch_probabilities
from core.tasks import TASKS

logger = logging.getLogger(__name__)

BORDER = 0.08  # share of the side that counts as the frame
DARK = 10  # grey level (of 255) below which a pixel counts as black
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "size": ("log_height", "log_width", "aspect"),
    "border": ("border_mean", "border_dark", "content_aspect"),
    "size_and_border": ("log_height", "log_width", "aspect", "border_mean", "border_dark", "content_aspect"),
}
REFRAMINGS: tuple[str, ...] = ("pad_4:3", "pad_3:4", "crop_4:3", "crop_3:4")


def frame_features(image: np.ndarray) -> dict[str, float]:
    """Size, aspect and border features of one uint8 (H, W) image (no pixel inside the frame is used
    except to find the non-black content's bounding box)."""
    height, width = image.shape
    band = max(1, int(round(BORDER * min(height, width))))
    frame = np.concatenate([image[:band].ravel(), image[-band:].ravel(), image[:, :band].ravel(), image[:, -band:].ravel()])
    rows, cols = np.flatnonzero((image >= DARK).any(axis=1)), np.flatnonzero((image >= DARK).any(axis=0))
    content_aspect = (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1) if len(rows) and len(cols) else 1.0
    return {"log_height": float(np.log(height)), "log_width": float(np.log(width)), "aspect": width / height,
            "border_mean": float(frame.mean()) / 255.0, "border_dark": float((frame < DARK).mean()),
            "content_aspect": float(content_aspect)}


def reframe(image: np.ndarray, how: str) -> np.ndarray:
    """The image padded with black, or centre-cropped, to another aspect ratio ("pad_4:3", "crop_3:4", ...).

    Raises:
        ValueError: For an unknown re-framing.
    """
    if how not in REFRAMINGS:
        raise ValueError(f"unknown re-framing {how!r}; one of {', '.join(REFRAMINGS)}")
    kind, ratio = how.split("_")
    across, down = (int(v) for v in ratio.split(":"))
    target = across / down  # width / height
    height, width = image.shape
    if kind == "pad":
        new_w, new_h = max(width, int(round(height * target))), max(height, int(round(width / target)))
        if new_w / new_h > target:
            new_h = int(round(new_w / target))
        else:
            new_w = int(round(new_h * target))
        out = np.zeros((new_h, new_w), dtype=image.dtype)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        out[top:top + height, left:left + width] = image
        return out
    new_w, new_h = min(width, int(round(height * target))), min(height, int(round(width / target)))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return image[top:top + new_h, left:left + new_w]


def acquisition_check(train: list[np.ndarray], train_labels: list[str], test: list[np.ndarray],
                      test_labels: list[str], labels: tuple[str, ...], seed: int = 0) -> dict:
    """How well frame features alone predict the label: fitted on `train`, scored on `test`.

    Returns:
        {feature set: {"features", "accuracy", "balanced_accuracy"}}, plus "majority_class_accuracy".
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import balanced_accuracy_score

    names = FEATURE_SETS["size_and_border"]
    x_train = np.array([[f[n] for n in names] for f in map(frame_features, train)])
    x_test = np.array([[f[n] for n in names] for f in map(frame_features, test)])
    y_train = np.array([labels.index(label) for label in train_labels])
    y_test = np.array([labels.index(label) for label in test_labels])
    out: dict = {"majority_class_accuracy": float((y_test == np.bincount(y_train).argmax()).mean())}
    for name, chosen in FEATURE_SETS.items():
        columns = [names.index(n) for n in chosen]
        model = HistGradientBoostingClassifier(max_iter=200, min_samples_leaf=5, random_state=seed, class_weight="balanced")
        model.fit(x_train[:, columns], y_train)
        predicted = model.predict(x_test[:, columns])
        out[name] = {"features": list(chosen), "accuracy": float((predicted == y_test).mean()),
                     "balanced_accuracy": float(balanced_accuracy_score(y_test, predicted))}
    return out


def reframed_scores(classifier: Classifier, images: list[np.ndarray], labels: list[str]) -> dict:
    """The model's scores on the test images as they are and re-framed ({variant: n, accuracy, ...})."""
    spec, card = classifier.spec, classifier.card
    targets = np.array([spec.label_index(label) for label in labels])
    out, preset = {}, EvalPreset(spec)
    for how in ("as_is", *REFRAMINGS):
        pixels = [preset.grey(img if how == "as_is" else reframe(img, how)) for img in images]
        probabilities = batch_probabilities(classifier, pixels)
        m = compute_metrics(targets, probabilities, decide(probabilities, spec.labels, card.positive, card.threshold), spec)
        out[how] = {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")}
        logger.info("%s %s: %s", spec.key, how, out[how])
    return out


def check(classifier: Classifier, records: list, seed: int = 0) -> dict:
    """The card's `acquisition` section for a loaded model on its data folder's records."""
    spec = classifier.spec
    records, images, sides = recorded_split(records, spec, classifier.card.training.config)
    side = {name: [i for i, s in enumerate(sides) if s == name] for name in ("train", "test")}
    frame = acquisition_check([images[i] for i in side["train"]], [records[i].label for i in side["train"]],
                              [images[i] for i in side["test"]], [records[i].label for i in side["test"]],
                              spec.labels, seed)
    test_images, test_labels = [images[i] for i in side["test"]], [records[i].label for i in side["test"]]
    return {"frame_features": frame, "reframed": reframed_scores(classifier, test_images, test_labels),
            "method": f"gradient-boosted trees on frame features (border = outer {BORDER:.0%}; black < {DARK}/255), "
                      "fitted on the card's train side, scored on its test side; re-framing pads with black or "
                      "centre-crops the stored image before the usual resize",
            "command": f"python -m core.lab.framing --task {spec.key} --data DIR"}


def format_check(section: dict, key: str) -> str:
    frame = section["frame_features"]
    lines = [f"{key}: frame features alone on the card's test split (majority class "
             f"{frame['majority_class_accuracy']:.3f})"]
    for name in FEATURE_SETS:
        lines.append(f"  {name:<16} accuracy {frame[name]['accuracy']:.3f}  balanced {frame[name]['balanced_accuracy']:.3f}")
    lines.append("  the model on re-framed test images:")
    for how, s in section["reframed"].items():
        lines.append(f"  {how:<16} n {s['n']}  accuracy {s['accuracy']:.3f}  balanced {s['balanced_accuracy']:.3f}  "
                     f"macro-F1 {s['macro_f1']:.3f}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    return card_section_parser("Do image size, aspect or border give a model's labels away?", TASKS, "acquisition")


def main(argv: list[str] | None = None) -> int:
    return run_card_section(get_args_parser(), argv, "acquisition", lambda model, records, _: check(model, records),
                            format_check)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
