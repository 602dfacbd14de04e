"""Fit a model's wrong-input guard and measure it; writes weights/guard/<key>.safetensors and the card.

Run as `python -m core.lab.guard_fit --data-root ../shared/data [--task KEY]`. Measured on:
- the right task: the test side of the split recorded in the card (never used to fit);
- every other task's test split (a seeded sample per task);
- non-medical images: the half of scikit-image's sample photos not used to fit (whole,
  mirrored, cropped) and synthetic documents and screenshots drawn with another seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from core.cards import read_card, write_card
from core.lab.data import ScanDataset, read_records, recorded_split
from core.guard import GuardStats, read_tags
from core.imaging import ScanError, read_scan
from core.models import WEIGHTS_DIR, Classifier, load_model, sha256_file
from core.preprocess import EvalPreset, apply_steps, eight_bit
from core.tasks import TASKS, get_task

logger = logging.getLogger("core.guard")

NON_MEDICAL_WEIGHT = 10.0
FIT_CROPS = 12
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "moon", "page", "text", "coins", "clock",
          "hubble_deep_field", "immunohistochemistry", "colorwheel", "logo", "horse", "cat", "brick", "grass",
          "gravel", "checkerboard", "cell", "shepp_logan_phantom")


def features_of(classifier: Classifier, images: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Pooled penultimate features (N, D) of 8-bit model pixels, exactly as at inference."""
    spec = classifier.spec
    loader = DataLoader(ScanDataset(images, [0] * len(images), spec, train=False), batch_size=batch_size)
    preset = EvalPreset(spec)
    rows = [classifier.runner.run(preset.tensor(batch[:, 0])).features for batch, *_ in loader]
    return np.concatenate(rows) if rows else np.zeros((0, 1), dtype=np.float32)


def _to_model_pixels(array: np.ndarray, spec) -> np.ndarray | None:
    """An array through PNG bytes and read_scan, as an upload would go; None where the upload is refused before
    the model (unreadable, or a colour image: `core.guard.read_tags`)."""
    from PIL import Image

    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    try:
        scan = read_scan(buffer.getvalue(), "upload.png")
    except ScanError:
        return None
    if read_tags(scan, spec).reason is not None:
        return None
    return apply_steps(eight_bit(scan, spec), spec.preprocessing)[0]


def refusal_rate(stats: GuardStats, classifier: Classifier, pixels: list[np.ndarray | None]) -> dict:
    """Share of uploads refused: before the model (None: unreadable or a colour image), or by the guard's score."""
    kept = [p for p in pixels if p is not None]
    scored = flag_rate(stats, features_of(classifier, kept)) if kept else {"flagged": 0.0, "n": 0}
    refused = len(pixels) - len(kept) + (scored["flagged"] or 0.0) * len(kept)
    return {"flagged": refused / len(pixels) if pixels else None, "n": len(pixels),
            "refused_before_the_model": len(pixels) - len(kept)}


def photo_arrays(names: tuple[str, ...], seed: int = 0, crops: int = 4, grey_copies: bool = False) -> list[np.ndarray]:
    """scikit-image sample photos: each whole, mirrored and in `crops` random crops; with `grey_copies`, a colour
    photo's views also in grey (colour photos are refused before the model, grey ones reach the guard's score)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        views = [image, image[:, ::-1]]
        height, width = image.shape[:2]
        for _ in range(crops):
            h, w = int(height * rng.uniform(0.4, 0.8)), int(width * rng.uniform(0.4, 0.8))
            y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            views.append(image[y : y + h, x : x + w])
        out += views
        if grey_copies and image.ndim == 3:
            out += [np.round(view[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8) for view in views]
    return out


def document_arrays(count: int = 120, seed: int = 0) -> list[np.ndarray]:
    """Synthetic documents (text pages, forms, tables) and screenshots (windows, buttons, text)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    words = "patient report findings impression history scan clinic date signed normal follow up dose".split()
    out = []
    for i in range(count):
        width, height = rng.choice([(600, 800), (800, 600), (1024, 640), (420, 600)])
        screenshot = i % 2 == 1
        background = (rng.randint(30, 60),) * 3 if screenshot and rng.random() < 0.5 else (rng.randint(225, 255),) * 3
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        ink = (20, 20, 20) if background[0] > 128 else (230, 230, 230)
        y = rng.randint(10, 40)
        if screenshot:
            draw.rectangle([0, 0, width, 28], fill=(rng.randint(40, 200), rng.randint(40, 200), rng.randint(40, 200)))
            for _ in range(rng.randint(2, 6)):
                x0, y0 = rng.randint(0, width - 120), rng.randint(40, height - 40)
                draw.rectangle([x0, y0, x0 + rng.randint(60, 200), y0 + rng.randint(20, 40)],
                               outline=ink, fill=(rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
        while y < height - 20:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            draw.text((rng.randint(10, 40), y), line, fill=ink)
            if rng.random() < 0.15:
                draw.line([10, y + 16, width - 10, y + 16], fill=ink)
            y += rng.randint(14, 26)
        out.append(np.asarray(image))
    return out


def dicom_outcomes(classifier: Classifier, paths: list[Path]) -> dict:
    """The guard's verdicts on real DICOM files read as uploads are (tags first, then the score)."""
    from core.pipeline import Refusal, analyse

    outcomes = {"in_range": 0, "borderline": 0, "out_of_range": 0}
    planes = {}
    for path in paths:
        result = analyse(classifier, path.read_bytes(), path.name)
        if isinstance(result, Refusal):
            continue
        outcomes[result.prediction.guard.outcome] += 1
        planes[result.scan.info.get("orientation", "unknown")] = planes.get(result.scan.info.get("orientation", "unknown"), 0) + 1
    n = sum(outcomes.values())
    return {"n": n, "flagged": outcomes["out_of_range"] / n if n else None, "borderline": outcomes["borderline"],
            "in_range": outcomes["in_range"], "planes": planes}


def flag_rate(stats: GuardStats, features: np.ndarray) -> dict:
    """Share of rows the guard flags, and how many were scored."""
    if len(features) == 0:
        return {"flagged": None, "n": 0}
    return {"flagged": float(stats.flags(features).mean()), "n": int(len(features))}


@dataclass
class Dataset:
    """One data folder read once: 8-bit pixels and the split side of each image."""

    pixels: list[np.ndarray]
    sides: np.ndarray

    def side(self, name: str, limit: int | None, seed: int) -> list[np.ndarray]:
        chosen = [p for p, s in zip(self.pixels, self.sides) if s == name]
        return random.Random(seed).sample(chosen, min(limit, len(chosen))) if limit else chosen


def read_dataset(root: Path, key: str, folder: Path) -> Dataset:
    """A task's folder with the split its card records."""
    config = read_card(folder / f"{key}.json").training.config
    _, pixels, sides = recorded_split(read_records(root / get_task(key).data_folder), get_task(key), config)
    return Dataset(pixels, sides)


# Thresholds, chosen on validation (never on the test sides they are measured on):
OWN_REFUSED = 0.01  # at most this share of the model's own validation scans is refused...
OTHERS_REFUSED = 0.99  # ...and the threshold is as low as refusing this share of other images allows
OWN_BORDERLINE = 0.05  # this share of its own validation scans is answered with a warning (or refused)


def choose_thresholds(own: np.ndarray, others: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """(refusal threshold, borderline threshold, the rule in words) from validation scores.

    The refusal threshold is as low as possible, so that own scans from other scanners and hospitals
    (shifted from the training images) still get an answer, while at least `OTHERS_REFUSED` of each
    group of other images (other tasks' scans, documents, photos) stays refused; never higher than the
    `OWN_REFUSED` quantile of the model's own scans.
    """
    groups = [scores for scores in others.values() if len(scores)]
    for_others = max(float(np.quantile(scores, OTHERS_REFUSED)) for scores in groups) if groups else 0.5
    for_own = float(np.quantile(own, OWN_REFUSED)) if len(own) else 0.5
    threshold = float(np.clip(min(for_others, for_own), 1e-4, 1 - 1e-4))
    borderline = max(float(np.quantile(own, OWN_BORDERLINE)) if len(own) else threshold, threshold)
    rule = (f"refused below {threshold:.3f}: the lowest score that still refuses {OTHERS_REFUSED:.0%} of each of the "
            f"other tasks' validation scans, validation documents and photo crops, capped at the {OWN_REFUSED:.0%} quantile of its own "
            f"validation scans; borderline below {borderline:.3f} (the {OWN_BORDERLINE:.0%} quantile of its own "
            "validation scans); a DICOM whose tags confirm the model's modality and body part is borderline, not refused, "
            "below the threshold")
    return threshold, borderline, rule


def fit_stats(positive: np.ndarray, negative: np.ndarray, validation: np.ndarray, weights: np.ndarray,
              others_validation: dict[str, np.ndarray] | None = None) -> tuple[GuardStats, str]:
    """Weighted logistic regression, positives against negatives; thresholds from validation (`choose_thresholds`).

    Args:
        positive: Features (P, D) of the model's own training images.
        negative: Features (M, D) of other images.
        validation: Features of the model's own validation images.
        weights: (M,) relative weight of each negative; the positives together weigh as much as
            all negatives together.
        others_validation: Features of other images not used to fit, by group (other tasks' validation sides,
            documents, photo crops).

    Returns:
        (the guard, its threshold rule in words).
    """
    from sklearn.linear_model import LogisticRegression

    features = np.concatenate([positive, negative])
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    sample_weight = np.concatenate([np.full(len(positive), weights.sum() / len(positive)), weights])
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    model = LogisticRegression(C=0.05, max_iter=3000)
    model.fit((features - mean) / scale, labels, sample_weight=sample_weight)
    stats = GuardStats(mean.astype(np.float32), scale.astype(np.float32), model.coef_[0].astype(np.float32),
                       float(model.intercept_[0]), 0.5)
    others = {name: stats.belonging(features) for name, features in (others_validation or {}).items()}
    threshold, borderline, rule = choose_thresholds(stats.belonging(validation), others)
    return GuardStats(stats.mean, stats.scale, stats.weight, stats.bias, threshold, borderline), rule


def fit_all(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Fit and measure the guard of every chosen task; write guard files and cards."""
    from safetensors.torch import save_file

    folder = args.weights_dir or WEIGHTS_DIR
    keys = args.task or list(TASKS)
    datasets = {key: read_dataset(args.data_root, key, folder) for key in TASKS}
    reference = get_task(keys[0])
    photos_fit = [_to_model_pixels(a, reference)
                  for a in photo_arrays(PHOTOS[::2], seed=1, crops=FIT_CROPS, grey_copies=True)]
    photos_test = [_to_model_pixels(a, reference) for a in photo_arrays(PHOTOS[1::2], seed=2)]
    docs_fit = [_to_model_pixels(a, reference) for a in document_arrays(80, seed=1)]
    docs_test = [_to_model_pixels(a, reference) for a in document_arrays(120, seed=2)]
    docs_val = [_to_model_pixels(a, reference) for a in document_arrays(60, seed=3)]
    # other crops of the fitting photos, drawn with another seed: for choosing thresholds, never for measuring
    photos_val = [_to_model_pixels(a, reference) for a in photo_arrays(PHOTOS[::2], seed=3, grey_copies=True)]
    results = {}
    non_medical_weight = args.non_medical_weight or NON_MEDICAL_WEIGHT
    for key in keys:
        spec = get_task(key)
        classifier = load_model(spec, folder / f"{key}.safetensors", require_guard=False)  # the guard is what is being fitted
        own = datasets[key]
        positive = features_of(classifier, own.side("train", args.fit_images, 0))
        others = {k: d for k, d in datasets.items() if get_task(k).data_folder != spec.data_folder}
        medical = [p for d in others.values() for p in d.side("train", args.other_images, 0)]
        non_medical = [p for p in photos_fit + docs_fit if p is not None]
        negative = features_of(classifier, medical + non_medical)
        # Photos and documents are few next to the other tasks' scans; weigh each of them more.
        weights = np.concatenate([np.ones(len(medical)), np.full(len(non_medical), non_medical_weight)])
        others_validation = {
            "scans": features_of(classifier, [p for d in others.values() for p in d.side("val", args.other_images, 0)]),
            "documents": features_of(classifier, [p for p in docs_val if p is not None]),
            "photos": features_of(classifier, [p for p in photos_val if p is not None])}
        stats, rule = fit_stats(positive, negative, features_of(classifier, own.side("val", None, 0)), weights,
                                others_validation)
        own_test = features_of(classifier, own.side("test", None, 0))
        measured = {
            "right_task_test": flag_rate(stats, own_test),
            "right_task_test_borderline": flag_rate(
                dataclasses.replace(stats, threshold=stats.borderline or stats.threshold), own_test),
            "other_tasks_test": {
                k: flag_rate(stats, features_of(classifier, d.side("test", args.test_images, 0))) for k, d in others.items()
            },
            "photos_held_out": refusal_rate(stats, classifier, photos_test),
            "documents_screenshots_held_out": refusal_rate(stats, classifier, docs_test),
        }
        if spec.ct_window is not None and (args.data_root / "dicom_ct").is_dir():
            measured["dicom_ct_slices"] = dicom_outcomes(classifier, sorted((args.data_root / "dicom_ct").glob("*.dcm")))
        parts = list(measured["other_tasks_test"].values())
        measured["other_tasks_all"] = {
            "flagged": sum(p["flagged"] * p["n"] for p in parts) / max(sum(p["n"] for p in parts), 1),
            "n": sum(p["n"] for p in parts),
        }
        path = folder / "guard" / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stats.as_tensors(), str(path))
        card = classifier.card
        card.guard = {
            "file": f"guard/{path.name}",
            "sha256": sha256_file(path),
            "method": (
                "DICOM Modality / BodyPartExamined checked first where present; then a logistic 'belongs' score on this "
                f"model's penultimate features, fitted on {len(positive)} of its training images against "
                f"{len(negative)} training images of the other tasks, scikit-image photos ({len(PHOTOS[::2])} "
                f"of them, whole, mirrored and {FIT_CROPS} crops each) and synthetic documents/screenshots; photos and "
                f"documents weigh {non_medical_weight:g} times a scan among the negatives; {rule}"
            ),
            "threshold": stats.threshold,
            "borderline": stats.borderline,
            "measured": measured,
            "measured_on": ("own test split; other tasks' test splits (seeded sample); the other "
                            f"{len(PHOTOS[1::2])} scikit-image photos (whole, mirrored, cropped); "
                            "documents/screenshots drawn with another seed; for CT models the real chest CT DICOM "
                            "slices of dicom_ct (read as an upload is)"),
            "command": "python -m core.lab.guard_fit " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        card.log(f"guard: {card.guard.command}")
        write_card(card, folder / f"{key}.json")
        results[key] = measured
        logger.info("%s guard: %s", key, json.dumps(measured))
    print(json.dumps(results, indent=1))
    return results


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
    parser = get_args_parser()
    fit_all(parser.parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(main())
