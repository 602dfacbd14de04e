"""Do test-time augmentation or a small ensemble earn their latency? Scored on the card's own split.

    python -m core.lab.ensemble --task ct_covid --data ../shared/data/ct_covid --tta 8
    python -m core.lab.ensemble --task head_ct --data ../shared/data/head_ct \\
        --weights runs/head_ct-mobilenet_v2/head_ct.safetensors runs/head_ct-efficientnet_lite0/head_ct.safetensors

Every member (the bundled model, or the weights given, each with its own card) is scored on the
validation and test sides of the split its card recorded (they must all record the same split).
Variants: each member alone; each with test-time augmentation (the mean calibrated probability over
the input and `--tta` augmented views at model resolution, the stability check's views); the mean of
the members' calibrated probabilities; and that mean with TTA. The threshold of a thresholded model
is chosen again on validation for every variant, by the first member's rule (`--min-sensitivity`
or Youden's J), so no variant is scored on the threshold of another. Prints validation and test
figures and the CPU milliseconds per image of each variant (measured on 16 images, one at a time).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from core.calibration import choose_threshold
from core.decision import card_probabilities, decide, positive_mask, positive_score
from core.lab.data import check_labels, read_records, recorded_split
from core.lab.evaluate import compute_metrics, threshold_figures
from core.models import Classifier, WeightsError, load_candidate
from core.preprocess import EvalPreset, TrainPreset
from core.tasks import TASKS, TaskSpec, get_task

logger = logging.getLogger(__name__)


def member_probabilities(classifier: Classifier, images: list[np.ndarray], views: int, seed: int = 0) -> np.ndarray:
    """Calibrated class probabilities (N, C) of 8-bit images (after the steps), averaged over `views` augmented
    views and the image itself when `views` > 0."""
    spec = classifier.spec
    preset, draw = EvalPreset(spec), TrainPreset(spec)
    rows = []
    for start in range(0, len(images), 16):
        greys = [preset.grey(image) for image in images[start:start + 16]]
        stack = []
        for grey in greys:
            rng = np.random.default_rng((seed, start))
            stack += [grey] + [draw(grey, rng) for _ in range(views)]
        logits = classifier.runner.logits(preset.tensor(np.stack(stack)))
        probs = card_probabilities(logits, spec, classifier.card)[0]
        rows.append(probs.reshape(len(greys), views + 1, -1).mean(axis=1))
    return np.concatenate(rows)


def scored(spec: TaskSpec, probs: dict[str, np.ndarray], targets: dict[str, np.ndarray],
           min_sensitivity: float | None) -> dict:
    """Validation and test figures of one variant, its threshold chosen on its own validation probabilities."""
    threshold = None
    if spec.positive is not None:
        mask = positive_mask(spec.labels, spec.positive)
        threshold = choose_threshold(positive_score(probs["val"], spec.labels, spec.positive),
                                     mask[targets["val"]], min_sensitivity)
    out: dict = {"threshold": threshold}
    for side in ("val", "test"):
        decided = decide(probs[side], spec.labels, spec.positive, threshold)
        m = compute_metrics(targets[side], probs[side], decided, spec)
        figures = {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")}
        if threshold is not None:
            figures.update(threshold_figures(probs[side], targets[side], spec.labels, spec.positive, threshold))
        out[side] = figures
    return out


def latency_ms(members: list[Classifier], images: list[np.ndarray], views: int) -> float:
    """Median CPU milliseconds to score one image (one at a time) with these members and views."""
    times = []
    for image in images[:16]:
        start = time.perf_counter()
        for member in members:
            member_probabilities(member, [image], views)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Test-time augmentation and small ensembles on a card's own split.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--weights", nargs="*", type=Path, default=None,
                        help="members' weights (each with its card beside it); default: the bundled model")
    parser.add_argument("--tta", type=int, default=8, help="augmented views per image for the TTA variants")
    parser.add_argument("--min-sensitivity", type=float, default=None,
                        help="threshold rule (default: the first member's card configuration)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    spec = get_task(args.task)
    try:
        members = [load_candidate(spec, w) for w in (args.weights or [None])]
        configs = [{**{k: m.card.training.config.get(k) for k in ("seed", "val_frac", "test_frac", "limit")},
                    "stratify": m.card.training.config.get("stratify") or "majority"} for m in members]
        if any(c != configs[0] for c in configs):
            parser.exit(2, "error: the members' cards record different splits; they cannot be compared\n")
        records = read_records(args.data)
        check_labels(records, spec)
        every, images, sides = recorded_split(records, members[0].spec, members[0].card.training.config)
    except (ValueError, WeightsError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    config = members[0].card.training.config
    min_sensitivity = args.min_sensitivity if args.min_sensitivity is not None else config.get("min_sensitivity")
    chosen = {side: [i for i, s in enumerate(sides) if s == side] for side in ("val", "test")}
    targets = {side: np.array([spec.label_index(every[i].label) for i in idx]) for side, idx in chosen.items()}
    side_images = {side: [images[i] for i in idx] for side, idx in chosen.items()}
    torch.manual_seed(0)
    plain = {side: [member_probabilities(m, side_images[side], 0) for m in members] for side in chosen}
    with_tta = {side: [member_probabilities(m, side_images[side], args.tta) for m in members] for side in chosen}
    variants: dict[str, tuple[dict, list[Classifier], int]] = {}
    for j, member in enumerate(members):
        name = f"{member.card.arch} ({Path(args.weights[j]).parent.name if args.weights else 'bundled'})"
        variants[name] = ({s: plain[s][j] for s in chosen}, [member], 0)
        variants[f"{name} + TTA x{args.tta}"] = ({s: with_tta[s][j] for s in chosen}, [member], args.tta)
    if len(members) > 1:
        variants["ensemble (mean)"] = ({s: np.mean(plain[s], axis=0) for s in chosen}, members, 0)
        variants[f"ensemble + TTA x{args.tta}"] = ({s: np.mean(with_tta[s], axis=0) for s in chosen}, members, args.tta)
    print(f"{spec.key}: validation {len(targets['val'])} images, test {len(targets['test'])} images; threshold rule: "
          + (f"validation sensitivity >= {min_sensitivity}" if min_sensitivity else "Youden's J on validation"))
    print("| variant | ms / image | val accuracy | val ROC-AUC | test accuracy | test balanced acc. | test macro-F1 "
          "| test ROC-AUC | test sens / spec at its threshold |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (probs, used, views) in variants.items():
        figures = scored(spec, probs, targets, min_sensitivity)
        v, t = figures["val"], figures["test"]
        at = (f"{t['sensitivity']:.3f} / {t['specificity']:.3f} (>= {figures['threshold']:.3f})"
              if figures["threshold"] is not None else "argmax")
        auc = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {name} | {latency_ms(used, side_images['test'], views):.0f} | {v['accuracy']:.3f} | {auc(v['roc_auc'])} "
              f"| {t['accuracy']:.3f} | {t['balanced_accuracy']:.3f} | {t['macro_f1']:.3f} | {auc(t['roc_auc'])} | {at} |")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
