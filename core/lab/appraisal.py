"""Appraise a bundled model on its card's held-out split and write what a reader needs into the card.

Usage:
    python -m core.lab.appraisal --task brain_mri --data ../shared/data/brain_mri
    python -m core.lab.appraisal --task ct_covid --data DIR --faithfulness-images 48 --sanity-images 16 --dry-run

Re-carves the card's split (`core.evaluate --card-split test` does the same), scores the
test side once and adds to the card:
- `metrics.intervals`: 95% bootstrap intervals of accuracy, balanced accuracy, macro-F1,
  ROC-AUC (and sensitivity / specificity at the operating threshold), resampling whole
  split groups (near-duplicate groups merged with patients), so correlated images move together;
- `metrics.curves`: ROC curves (the positive class, or one-vs-rest per class) and a
  reliability diagram of the top-class probability;
- `indeterminate`: the band around the decision where the app says "uncertain", with the
  share of test images inside it and the accuracy inside and outside it;
- `findings.<finding>.test.intervals` (multi-label models): the same group-bootstrap intervals of
  each finding's ROC-AUC, sensitivity and specificity at its threshold;
- `explanations`: ROAD faithfulness of every CAM method on a stratified sample of test
  images (the class the model decided), the most faithful method (the app's default), and a
  cascading model-randomisation sanity check (Adebayo et al. 2018).

The weights are not touched; the card's sha256 stays valid.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from core.cards import update_card
from core.lab.data import check_labels, group_records, preprocess_pixels, read_records
from core.lab.data import recorded_split
from core.lab.evaluate import compute_finding_metrics, compute_metrics, score_records
from core.explain import (CLASS_INDEPENDENT, DEFAULT_METHOD, METHODS, ROAD_PERCENTILES, body_mask, compute_cam,
                          input_grey, mass_inside, road_score, suppress)
from core.cards import ModelCard
from core.decision import Band, decide, decision_distance, log_odds, positive_mask, positive_score
from core.models import WEIGHTS_DIR, Classifier, WeightsError, backbone_blocks, card_path, head_module, load_candidate
from core.preprocess import EvalPreset
from core.tasks import TASKS, TaskSpec, get_task

logger = logging.getLogger(__name__)

BAND_WIDTHS = np.round(np.arange(0.1, 3.01, 0.1), 2)  # candidate half-widths of the indeterminate band, log-odds
BAND_MAX_SHARE = 0.15  # a band may hold at most this share of validation images
BAND_ALPHA = 0.05  # accuracy inside must be lower than outside at this significance


# ---------------------------------------------------------------- intervals and curves


def _binary_scores(targets: np.ndarray, predictions: np.ndarray, members: np.ndarray) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of calling a positive class (any of `members`, bool (C,))."""
    is_pos, called = members[targets], members[predictions]
    sens = float(called[is_pos].mean()) if is_pos.any() else None
    spec = float((~called[~is_pos]).mean()) if (~is_pos).any() else None
    return sens, spec


def bootstrap_intervals(targets: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray, groups: np.ndarray,
                        spec: TaskSpec, positive: str | None, resamples: int = 1000, seed: int = 0) -> dict:
    """95% percentile intervals of the headline metrics, resampling whole groups with replacement.

    Args:
        targets: int (N,) true classes.
        probabilities: float (N, C).
        predictions: int (N,) decided classes.
        groups: int (N,) group of each image (resampled as units).
        spec: The model's spec.
        positive: The card's thresholded class, if any (adds sensitivity and specificity).
        resamples: Bootstrap resamples.

    Returns:
        {metric: {"estimate", "low", "high"}, "resamples", "unit", "groups"}.
    """
    members = positive_mask(spec.labels, positive) if positive else None
    names = ["accuracy", "balanced_accuracy", "macro_f1", "roc_auc"] + (["sensitivity", "specificity"] if positive else [])

    def measure(index: np.ndarray) -> dict[str, float | None]:
        t, p, d = targets[index], probabilities[index], predictions[index]
        values = {k: compute_metrics(t, p, d, spec)[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")}
        if members is not None:
            values["sensitivity"], values["specificity"] = _binary_scores(t, d, members)
        return values

    return group_bootstrap(measure, names, groups, resamples, seed)


def group_bootstrap(measure, names: list[str], groups: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """95% percentile intervals of `measure(index) -> {name: value or None}`, resampling whole groups.

    Returns:
        The card's `Intervals`: {"resamples", "unit", "groups", "metrics": {name: {"estimate", "low", "high"}}};
        a resample where a metric is undefined (None, e.g. no positive case drawn) is left out of that
        metric's interval.
    """
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    estimate = measure(np.arange(len(groups)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(resamples):
        chosen = rng.integers(0, len(members), len(members))
        values = measure(np.concatenate([members[g] for g in chosen]))
        for name in names:
            if values[name] is not None:
                samples[name].append(values[name])
    out: dict = {"resamples": resamples, "unit": "split group (near-duplicates merged with patients)",
                 "groups": int(len(members)), "metrics": {}}
    for name in names:
        drawn = np.asarray(samples[name])
        low, high = (float(np.percentile(drawn, 2.5)), float(np.percentile(drawn, 97.5))) if len(drawn) else (None, None)
        out["metrics"][name] = {"estimate": estimate[name], "low": low, "high": high}
    return out


def finding_intervals(truth: np.ndarray, probabilities: np.ndarray, thresholds: list[float], groups: np.ndarray,
                      spec: TaskSpec, resamples: int = 1000, seed: int = 0) -> dict:
    """Per finding of a multi-label model: 95% group-bootstrap intervals of ROC-AUC, sensitivity and
    specificity at its threshold ({finding: intervals as `group_bootstrap` gives them})."""
    names = ["roc_auc", "sensitivity", "specificity"]
    out = {}
    for j, name in enumerate(spec.findings):
        column = truth[:, j:j + 1], probabilities[:, j:j + 1]

        def measure(index: np.ndarray, column=column, name=name, j=j) -> dict:
            row = compute_finding_metrics(column[0][index], column[1][index], [thresholds[j]], (name,))[name]
            return {k: row[k] for k in names}

        out[name] = group_bootstrap(measure, names, groups, resamples, seed)
    return out


def roc_curves(targets: np.ndarray, probabilities: np.ndarray, spec: TaskSpec, positive: str | None) -> dict:
    """ROC points per curve: the positive class for a thresholded binary model, else one-vs-rest per class."""
    from sklearn.metrics import roc_auc_score, roc_curve

    classes = [positive] if positive and spec.num_classes == 2 else list(spec.labels)
    if positive and "+" in positive:  # a thresholded group: its own curve first
        classes = [positive, *classes]
    curves = {}
    for label in classes:
        truth = positive_mask(spec.labels, label)[targets]
        score = positive_score(probabilities, spec.labels, label)
        if truth.all() or not truth.any():
            continue
        fpr, tpr, thresholds = roc_curve(truth, score, drop_intermediate=True)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 120)).round().astype(int))
        curves[label] = {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist(),
                         "threshold": np.clip(thresholds[keep], 0.0, 1.0).round(4).tolist(),
                         "auc": float(roc_auc_score(truth, score))}
    return curves


def reliability(targets: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Reliability diagram of the top-class probability: per equal-width bin, mean confidence, accuracy, count."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = {"edges": edges.round(3).tolist(), "confidence": [], "accuracy": [], "count": []}
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    for b in range(bins):
        chosen = which == b
        rows["count"].append(int(chosen.sum()))
        rows["confidence"].append(float(confidence[chosen].mean()) if chosen.any() else None)
        rows["accuracy"].append(float(correct[chosen].mean()) if chosen.any() else None)
    return rows


def band_rule(width: float, positive_title: str | None, threshold: float | None) -> str:
    """The band in words a reader understands."""
    if width <= 0:
        return "no band: on validation, outputs near the decision were not measurably less accurate"
    if positive_title and threshold is not None:
        low, high = Band(width).interval(threshold)
        return (f"uncertain while P({positive_title}) lies between {low:.3f} and {high:.3f} (within {width:.2f} "
                f"log-odds of the threshold {threshold:.3f})")
    return f"uncertain while the top class is less than {np.exp(width):.2f} times as likely as the second"


def band_figures(distance: np.ndarray, correct: np.ndarray, width: float) -> dict:
    """Share of images inside a band and the accuracy inside and outside it."""
    inside = Band(width).contains(distance) if width > 0 else np.zeros(len(distance), dtype=bool)
    return {"n": int(len(distance)),
            "share_uncertain": float(inside.mean()) if len(inside) else None,
            "accuracy_outside": float(correct[~inside].mean()) if (~inside).any() else None,
            "accuracy_inside": float(correct[inside].mean()) if inside.any() else None}


def interval_summary(intervals: dict) -> str:
    """One line: each metric's estimate and 95% interval."""
    return ", ".join(f"{k} {v['estimate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in intervals["metrics"].items()
                     if v.get("low") is not None)


def band_summary(band: dict) -> str:
    """One line: the width, and the share and accuracy inside and outside on validation and test."""
    def side(name: str) -> str:
        f = band[name]
        inside = "n/a" if f["accuracy_inside"] is None else f"{f['accuracy_inside']:.3f}"
        outside = "n/a" if f["accuracy_outside"] is None else f"{f['accuracy_outside']:.3f}"
        return f"{name} {f['share_uncertain']:.1%} inside (accuracy {inside} inside, {outside} outside)"
    return f"width {band['width']:.2f} log-odds; {side('validation')}; {side('test')}"


def choose_band(distance: np.ndarray, correct: np.ndarray, max_share: float = BAND_MAX_SHARE,
                alpha: float = BAND_ALPHA) -> tuple[float, dict]:
    """The indeterminate band, chosen on validation: the widest one (in log-odds) that holds at most `max_share`
    of the images and inside which accuracy is measurably lower than outside (one-sided Fisher exact test,
    p < alpha). Width 0 (no band) where no width qualifies.

    Args:
        distance: float (N,) log-odds distance of each validation output from its decision boundary.
        correct: bool (N,) whether each call was right.

    Returns:
        (width, {"tried": ..., "p_value": ... of the chosen width}).
    """
    from scipy.stats import fisher_exact

    best, best_p = 0.0, None
    for width in BAND_WIDTHS:
        inside = distance < width
        if not inside.any() or inside.all() or inside.mean() > max_share:
            continue
        table = [[int((~correct[inside]).sum()), int(correct[inside].sum())],
                 [int((~correct[~inside]).sum()), int(correct[~inside].sum())]]
        p_value = float(fisher_exact(table, alternative="greater")[1])  # more errors inside than outside
        if p_value < alpha:
            best, best_p = float(width), p_value
    return best, {"widths_tried": [float(BAND_WIDTHS[0]), float(BAND_WIDTHS[-1]), len(BAND_WIDTHS)],
                  "max_share": max_share, "alpha": alpha, "p_value": best_p}


def indeterminate_band(validation: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       positive_title: str | None, threshold: float | None) -> dict:
    """The card's `indeterminate` section: the band chosen on validation, its figures on validation and test.

    Args:
        validation: (log-odds distance (N,), correct (N,)) of the validation side.
        test: The same for the test side.
        positive_title: The thresholded class or group, for the rule's wording.
        threshold: Its operating threshold, where the output has one.
    """
    width, selection = choose_band(*validation)
    return {"scale": "log-odds", "width": width, "rule": band_rule(width, positive_title, threshold),
            "chosen_on": "validation",
            "selection": (f"widest band with at most {BAND_MAX_SHARE:.0%} of validation images inside and accuracy "
                          f"inside lower than outside (one-sided Fisher exact test, p < {BAND_ALPHA}); none: no band"),
            **selection, "validation": band_figures(*validation, width), "test": band_figures(*test, width)}


def class_band_inputs(targets: np.ndarray, probabilities: np.ndarray, spec: TaskSpec, card: ModelCard
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(log-odds distance, correct) of a model's class calls."""
    decided = decide(probabilities, spec.labels, card.positive, card.threshold)
    return decision_distance(probabilities, spec.labels, card.positive, card.threshold), decided == targets


def finding_band_inputs(truth: np.ndarray, probability: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(log-odds distance, correct) of one finding's calls at its threshold."""
    distance = np.abs(log_odds(probability) - log_odds(threshold))
    return distance, (probability >= threshold) == (truth > 0.5)


# ---------------------------------------------------------------- explanations


def stratified_sample(targets: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` indices, as even across classes as the data allows, in a seeded order."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(targets == c))) for c in np.unique(targets)]
    chosen: list[int] = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(int(pool.pop()))
    return np.asarray(sorted(chosen), dtype=np.int64)


def cam_layer_candidates(spec: TaskSpec) -> dict[str, tuple[str, ...]]:
    """The layer sets a model's heatmaps may use: its last block (7 x 7 at 224 px), and where the backbone table
    names one, its finer block alone and fused with the last (14 x 14)."""
    out = {"last block": (spec.cam_layer,)}
    fine = spec.backbone.fine_cam_layer
    if fine:
        out["finer block"] = (fine,)
        out["finer + last block"] = (fine, spec.cam_layer)
    return out


def choose_cam_layers(classifier: Classifier, tensors: list[torch.Tensor], classes: list[int],
                      method: str = DEFAULT_METHOD) -> dict:
    """Measure each candidate layer set (ROAD of its background-suppressed map; CAM mass inside the body before and
    after suppression) and choose the most faithful one at 14 x 14 or finer (the last block where there is none).

    Returns:
        The card's `explanations.cam_layers`: {"chosen": [...], "rule", "method", "images", "candidates": {name:
        {"layers", "grid", "road", "mass_in_body_raw", "mass_in_body", "empty_maps"}}}.
    """
    spec = classifier.spec
    candidates = {}
    for name, layers in cam_layer_candidates(spec).items():
        roads, raw_mass, kept_mass, empty = [], [], [], 0
        for tensor, index in zip(tensors, classes):
            raw = compute_cam(classifier, tensor, index, method, layers, suppress_background=False)
            mask = body_mask(input_grey(tensor, spec))
            shown = suppress(raw, mask)
            if float(shown.max()) <= 0:  # no map: no ranking of pixels, ROAD 0
                empty += 1
                roads.append(0.0)
                continue
            raw_mass.append(mass_inside(raw, mask))
            kept_mass.append(mass_inside(shown, mask))
            roads.append(road_score(classifier, tensor, shown, index).score)
        grid = spec.backbone.cam_grid(spec.input_size) * (2 if spec.backbone.fine_cam_layer in layers else 1)
        candidates[name] = {"layers": list(layers), "grid": grid,
                            "road": float(np.mean(roads)) if roads else None,
                            "mass_in_body_raw": float(np.mean(raw_mass)) if raw_mass else None,
                            "mass_in_body": float(np.mean(kept_mass)) if kept_mass else None, "empty_maps": empty}
        logger.info("%s CAM layers %s: %s", spec.key, name, candidates[name])
    fine = {n: c for n, c in candidates.items() if c["grid"] >= 14 and c["road"] is not None} or candidates
    chosen = max(fine, key=lambda n: (fine[n]["road"] if fine[n]["road"] is not None else -1.0))
    return {"chosen": candidates[chosen]["layers"], "chosen_name": chosen, "method": method, "images": len(tensors),
            "rule": f"highest mean ROAD of the {method} map (background suppressed) among the sets at 14 x 14 or finer, "
                    "on held-out test images",
            "candidates": candidates}


def faithfulness(classifier: Classifier, tensors: list[torch.Tensor], classes: list[int],
                 layers: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """ROAD score of every CAM method over the same images (each for the class the model decided), on `layers`.

    Returns:
        (the table per method, the heatmaps per method in image order).
    """
    table, heatmaps = {}, {}
    for method in METHODS:
        scores, seconds, heatmaps[method] = [], [], []
        for tensor, index in zip(tensors, classes):
            start = time.perf_counter()
            heatmap = compute_cam(classifier, tensor, index, method, layers)
            seconds.append(time.perf_counter() - start)
            heatmaps[method].append(heatmap)
            scores.append(road_score(classifier, tensor, heatmap, index).score)
        values = np.asarray(scores)
        table[method] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                         "share_positive": float((values > 0).mean()), "cam_ms_median": float(np.median(seconds) * 1000)}
        logger.info("%s %s ROAD %.3f +- %.3f", classifier.spec.key, method, values.mean(), table[method]["sd"])
    return table, heatmaps


def randomisation_stages(model: torch.nn.Module, arch: str) -> list[tuple[str, torch.nn.Module]]:
    """The cascade of Adebayo et al.: the head first, then backbone blocks from the top down."""
    names = {id(module): name for name, module in model.named_modules()}
    blocks = [head_module(model, arch)] + list(reversed(backbone_blocks(model, arch)))
    return [(names.get(id(block), type(block).__name__), block) for block in blocks]


def randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter by Gaussian noise of the same standard deviation, in place."""
    with torch.no_grad():
        for parameter in module.parameters():
            std = float(parameter.std()) if parameter.numel() > 1 else 1.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (std or 1.0))


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0  # a flat map ranks nothing: no similarity to report
    return float(spearmanr(a.reshape(-1), b.reshape(-1)).statistic)


def sanity_check(classifier: Classifier, tensors: list[torch.Tensor], classes: list[int], stages: int = 4,
                 seed: int = 0, layers: tuple[str, ...] | None = None) -> dict:
    """Cascading model randomisation: rank correlation of each method's map with the trained model's.

    A faithful method's map should change (correlation falls towards 0) once the layers it
    depends on are randomised; a map that survives randomisation shows image structure, not
    what the model learned.

    The maps are compared without the background suppression, which would add the same image
    structure (the body's outline) to both.

    Args:
        layers: The layers the maps are computed on.

    Returns:
        {"stages": [names randomised cumulatively], "methods": {method: [mean |Spearman| per stage]}}.
    """
    def cam(model_classifier: Classifier, tensor: torch.Tensor, index: int, method: str) -> np.ndarray:
        return compute_cam(model_classifier, tensor, index, method, layers, suppress_background=False)

    originals = {m: [cam(classifier, t, c, m) for t, c in zip(tensors, classes)] for m in METHODS}
    model = copy.deepcopy(classifier.module)
    cascade = randomisation_stages(model, classifier.spec.arch)[:stages]
    generator = torch.Generator().manual_seed(seed)
    scratch = Classifier(spec=classifier.spec, card=classifier.card, module=model)
    result: dict = {"stages": [], "methods": {m: [] for m in METHODS}, "images": len(tensors),
                    "measure": "mean |Spearman rank correlation| between the trained and the randomised model's map"}
    for name, block in cascade:
        randomise_(block, generator)
        result["stages"].append(name)
        for method in METHODS:
            values = [abs(_rank_correlation(original, cam(scratch, t, c, method)))
                      for original, t, c in zip(originals[method], tensors, classes)]
            result["methods"][method].append(float(np.mean(values)))
        logger.info("%s randomised up to %s: %s", classifier.spec.key, name,
                    {m: round(v[-1], 3) for m, v in result["methods"].items()})
    return result


RANDOMISATION_FAIL = 0.8  # a map this similar (mean |Spearman|) after the whole cascade is randomised: it fails


def explanation_summary(table: dict, sanity: dict, images: int, layers: dict) -> dict:
    """The card's `explanations` section: the table, the chosen default, the sanity check, the CAM layers.

    The default is the most faithful method that depends on the class asked for and passes the
    randomisation check (its map changes once the model's layers are randomised).
    """
    fails = [m for m, values in sanity["methods"].items() if values and values[-1] >= RANDOMISATION_FAIL]
    allowed = [m for m in table if m not in fails and m not in CLASS_INDEPENDENT] or list(table)
    best = max(allowed, key=lambda m: table[m]["mean"])
    return {
        "faithfulness": {"metric": f"ROAD (MoRF - LeRF) / 2 over percentiles {list(ROAD_PERCENTILES)}, "
                                   "calibrated probability of the decided class, background suppressed",
                         "images": images, "methods": table},
        "default_method": best,
        "default_rule": ("highest mean ROAD score on held-out test images among the class-dependent methods that "
                         f"pass the randomisation check (mean |Spearman| below {RANDOMISATION_FAIL} once the "
                         f"cascade through {sanity['stages'][-1] if sanity['stages'] else 'the head'} is randomised)"),
        "sanity_check": sanity,
        "fails_randomisation": fails,
        "cam_layers": layers,
    }


# ---------------------------------------------------------------- command


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Appraise a model on its card's held-out split and update the card.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key of the model")
    parser.add_argument("--data", required=True, type=Path, help="the folder the model was trained on")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/<task>.safetensors)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--faithfulness-images", type=int, default=60, help="test images for the ROAD table")
    parser.add_argument("--sanity-images", type=int, default=16, help="test images for the randomisation check")
    parser.add_argument("--only", choices=("indeterminate",), default=None,
                        help="compute and write only this section (the indeterminate bands: no heatmaps, seconds)")
    parser.add_argument("--dry-run", action="store_true", help="print the sections, do not write the card")
    return parser


def appraise(classifier: Classifier, records: list, args: argparse.Namespace) -> dict:
    """All new card sections for one model (see the module docstring)."""
    spec, card = classifier.spec, classifier.card
    every, raw_every, sides = recorded_split(records, spec, card.training.config, preprocess=False)
    scored = {}
    for side in ("val", "test"):
        chosen = [i for i, s in enumerate(sides) if s == side]
        raw = [raw_every[i] for i in chosen]
        side_records = [every[i] for i in chosen]
        images = preprocess_pixels(raw, spec)
        scored[side] = (side_records, raw, images, score_records(classifier, side_records, images=images))
    test_records, raw, images, (targets, probabilities, finding_truth, finding_probabilities) = scored["test"]
    val_scores = scored["val"][3]
    predictions = decide(probabilities, spec.labels, card.positive, card.threshold)
    _, groups = group_records(test_records, raw)  # bootstrap units: groups as the split made them (before the steps)
    sections = {"indeterminate": {"classes": indeterminate_band(
        class_band_inputs(val_scores.targets, val_scores.probabilities, spec, card),
        class_band_inputs(targets, probabilities, spec, card), spec.positive_title, card.threshold)}}
    if spec.findings:
        thresholds = [card.findings[name].threshold for name in spec.findings]
        sections["indeterminate"]["findings"] = {
            name: indeterminate_band(
                finding_band_inputs(val_scores.finding_targets[:, j], val_scores.finding_probabilities[:, j], thresholds[j]),
                finding_band_inputs(finding_truth[:, j], finding_probabilities[:, j], thresholds[j]),
                spec.output_title(name), thresholds[j])
            for j, name in enumerate(spec.findings)}
    if args.only == "indeterminate":
        return sections
    sections["appraisal"] = {
        "intervals": bootstrap_intervals(targets, probabilities, predictions, groups, spec, card.positive
                                         if card.threshold is not None else None, args.resamples),
        "roc": roc_curves(targets, probabilities, spec, card.positive if card.threshold is not None else None),
        "reliability": reliability(targets, probabilities)}
    chosen = stratified_sample(targets, args.faithfulness_images)
    preset = EvalPreset(spec)
    tensors = [preset.from_pixels(images[i]).tensor for i in chosen]
    classes = [int(predictions[i]) for i in chosen]
    layers = choose_cam_layers(classifier, tensors, classes)
    table, _ = faithfulness(classifier, tensors, classes, tuple(layers["chosen"]))
    sanity_n = min(args.sanity_images, len(tensors))
    sanity = sanity_check(classifier, tensors[:sanity_n], classes[:sanity_n], layers=tuple(layers["chosen"]))
    sections["explanations"] = explanation_summary(table, sanity, len(tensors), layers)
    if spec.findings:
        sections["appraisal"]["findings"] = finding_intervals(finding_truth, finding_probabilities, thresholds, groups,
                                                              spec, args.resamples)
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    spec = get_task(args.task)
    torch.manual_seed(0)
    try:
        records = read_records(args.data)
        check_labels(records, spec)
        classifier = load_candidate(spec, args.weights)
        sections = appraise(classifier, records, args)
    except (ValueError, WeightsError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    bands = sections["indeterminate"]
    print(f"{spec.key}: indeterminate band: {band_summary(bands['classes'])}")
    for name, band in bands.get("findings", {}).items():
        print(f"  finding {name} band: {band_summary(band)}")
    if "appraisal" in sections:
        print("  " + interval_summary(sections["appraisal"]["intervals"]))
        table = sections["explanations"]["faithfulness"]["methods"]
        print("  ROAD: " + ", ".join(f"{m} {v['mean']:+.3f}" for m, v in table.items())
              + f"; default {sections['explanations']['default_method']}")
        for method, values in sections["explanations"]["sanity_check"]["methods"].items():
            print(f"  randomisation {method}: " + " -> ".join(f"{v:.2f}" for v in values))
        for name, found in sections["appraisal"].get("findings", {}).items():
            print(f"  finding {name}: {interval_summary(found)}")
    if not args.dry_run:
        path = card_path(spec, args.weights)
        update_card(path, "appraisal: " + ", ".join(sections), **sections)
        print(f"  wrote {path.relative_to(WEIGHTS_DIR.parent) if path.is_relative_to(WEIGHTS_DIR.parent) else path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
