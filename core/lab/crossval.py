"""K-fold cross-validation over patient and near-duplicate groups, to choose a recipe honestly.

    python -m core.lab.crossval --task ct_covid --data ../shared/data/ct_covid --folds 5 \
        --pretrained ../shared/pretrained/mobilenet_v2-features-imagenet-onnxzoo7-webnn.pth \
        --head-epochs 1 --epochs 12 --unfreeze 5 --device cpu --report train/ct_covid_cv.json

Takes every `python -m core.train` option. The groups are the training split's (near-duplicate
groups merged with patients), dealt into K folds stratified by each group's majority label; for
each fold the other K-1 folds are split again by group into train and validation (--val-frac),
the recipe is trained and calibrated as core.train does, and the held-out fold is scored. Prints
each fold and the mean and standard deviation; the fold weights go to a temporary folder and are
deleted (the bundled weights are never touched).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from core.lab.data import (
    check_labels,
    group_records,
    read_records,
    sample_records,
    split_audit,
    split_pixels,
    stratified_group_split,
)
from core.models import recipe_spec
from core.tasks import get_task
from core.lab.train import (
    Runtime,
    fit_and_score,
    get_args_parser,
    parse_steps,
    resolve_args,
    seed_everything,
    split_from_sides,
)

logger = logging.getLogger("core.lab.crossval")

SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")


def assign_folds(labels: list[str], groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per record: whole groups, each label's groups dealt to the fold with the fewest
    images of that label (then the fewest images overall).

    Returns:
        int64 (N,) in 0..folds-1.
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    by_label: dict[str, list[int]] = defaultdict(list)
    for g, idx in members.items():
        by_label[Counter(labels[i] for i in idx).most_common(1)[0][0]].append(g)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    totals = [0] * folds
    for label in sorted(by_label):
        group_ids = sorted(by_label[label])
        rng.shuffle(group_ids)
        sizes = [0] * folds
        for g in group_ids:
            k = min(range(folds), key=lambda f: (sizes[f], totals[f], f))  # this label's smallest, then overall
            fold_of[members[g]] = k
            sizes[k] += len(members[g])
            totals[k] += len(members[g])
    return fold_of


def summarize(rows: list[dict]) -> dict:
    """Mean and sample standard deviation of every score over the folds."""
    summary = {}
    for name in rows[0]:
        values = [r[name] for r in rows if isinstance(r.get(name), (int, float))]
        if len(values) == len(rows) and name != "fold":
            summary[name] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    parser.description = "Cross-validate a core.train recipe over patient / near-duplicate groups."
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--report", type=Path, default=None, help="also write the folds and summary to this JSON file")
    args = resolve_args(parser.parse_args(argv))  # the task's recipe, overridden by the options given
    argv = sys.argv[1:] if argv is None else argv
    spec = recipe_spec(get_task(args.task), args.arch, parse_steps(args.preprocessing))
    arch = spec.arch
    seed_everything(args.seed)
    records = sample_records(read_records(args.data), args.limit, args.seed)
    check_labels(records, spec)
    raw, images = split_pixels(records, spec)
    near_dup, groups = group_records(records, raw)
    labels = [r.label for r in records]
    fold_of = assign_folds(labels, groups, args.folds, args.seed)
    runtime = Runtime(device=torch.device(args.device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="secondlook-cv-") as scratch:
        for k in range(args.folds):
            rest = np.flatnonzero(fold_of != k)
            inner = stratified_group_split([labels[i] for i in rest], groups[rest], args.val_frac, 0.0, args.seed + k)
            sides = np.full(len(records), "test", dtype=object)
            sides[rest] = inner
            audit = split_audit(records, groups, near_dup, sides)
            split = split_from_sides(spec, records, images, sides, audit, f"fold {k + 1} of {args.folds}")
            logger.info("fold %d/%d: %s", k + 1, args.folds, audit["counts"])
            seed_everything(args.seed + k)
            scored, history = fit_and_score(spec, split, args, runtime, arch, Path(scratch) / f"fold{k}.safetensors")
            m = scored["metrics"]
            row = {"fold": k + 1, "n": m["n"], **{name: m[name] for name in SCORES},
                   "leaks_across_sides": audit["near_duplicate_groups_across_splits"], "best_epoch": history.best_epoch}
            if spec.positive in m["per_class"]:  # a single positive class (a group has no F1 of its own)
                row[f"f1_{spec.positive}"] = m["per_class"][spec.positive]["f1"]
            if scored["threshold"] is not None:
                row["threshold"] = scored["threshold"]
                row.update({f"{key}_at_threshold": value for key, value in m["at_threshold"].items()})
            rows.append(row)
            logger.info("fold %d: %s", k + 1, row)
    summary = summarize(rows)
    result = {"task": spec.key, "arch": arch, "preprocessing": list(spec.preprocessing), "folds": rows, "summary": summary,
              "command": "python -m core.lab.crossval " + " ".join(argv),
              "groups": "near-duplicate groups merged with patients, dealt to folds by majority label"}
    for row in rows:
        print(json.dumps(row))
    print(" ".join(f"{name} {s['mean']:.3f} +- {s['sd']:.3f}" for name, s in summary.items() if name != "n"))
    if args.report:
        args.report.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
