"""Print the bundled models' held-out figures as Markdown tables, read from their cards (`core.cards.read_card`).

Usage: python train/summarize.py [WEIGHTS_DIR]
       python train/summarize.py --runs     # every recorded run (train/runs/cards), and which is bundled

The last table sets the chest X-ray models' shortcut audits beside those of the candidate
recipes kept in train/preprocessing/ and train/arch/ (their cards).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from core.cards import Intervals, ModelCard, read_card  # noqa: E402


def fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def cards(folder: Path) -> list[ModelCard]:
    return [read_card(path) for path in sorted(folder.glob("*.json"))]


def interval(intervals: Intervals | None, name: str, fallback: float | None = None) -> str:
    v = intervals.metrics.get(name) if intervals is not None else None
    if v is None or v.low is None:
        return fmt(fallback)
    return f"{v.estimate:.3f} [{v.low:.3f}, {v.high:.3f}]"


def main(folder: Path) -> None:
    print("| key | test n | accuracy | balanced acc. | macro-F1 | ROC-AUC | ECE | threshold (sens / spec on test) | temperature | epochs | train time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for card in cards(folder):
        m, t = card.test_figures, card.training
        threshold = "argmax"
        if card.threshold is not None:
            at = m.at_threshold
            threshold = (f"{card.positive} >= {card.threshold:.3f} ({fmt(at and at.sensitivity)} / "
                         f"{fmt(at and at.specificity)})")
        print(f"| {card.key} | {m.n} | {fmt(m.accuracy)} | {fmt(m.balanced_accuracy)} | {fmt(m.macro_f1)} | "
              f"{fmt(m.roc_auc)} | {fmt(m.ece)} | {threshold} | {card.temperature:.2f} | "
              f"{t.epochs_run} (best {t.best_epoch}) | {t.seconds / 60:.0f} min |")


def runs_table(records: Path, weights: Path) -> None:
    """Validation and test figures of every recorded run (`train/runs/cards/<run>.json`; `<key>-former_recipe.json`
    is the card bundled before the whole-backbone round), and whether it is the bundled file (same weights sha256)."""
    print("| run | validation bal. acc / ROC-AUC | test acc / bal. acc / macro-F1 / ROC-AUC | epochs (best) | train time "
          "| bundled now |")
    print("|---|---|---|---|---|---|")
    for path in sorted(records.glob("*.json")):
        card = read_card(path)
        v, m, t = card.validation, card.test_figures, card.training
        bundled = weights / f"{card.key}.json"
        same = bundled.is_file() and read_card(bundled).sha256 == card.sha256
        epochs = f"{t.epochs_run} ({t.best_epoch})" if t is not None else "n/a"
        minutes = f"{t.seconds / 60:.0f} min" if t is not None and t.seconds else "n/a"
        print(f"| {path.stem} | {fmt(v and v.balanced_accuracy)} / {fmt(v and v.roc_auc)} | {fmt(m.accuracy)} / "
              f"{fmt(m.balanced_accuracy)} / {fmt(m.macro_f1)} / {fmt(m.roc_auc)} | {epochs} | {minutes} | "
              f"{'yes' if same else 'no'} |")


def guard_table(folder: Path) -> None:
    """Flag rates of each model's wrong-input guard (share of images flagged, with n)."""
    print("| key | own test images (should be low) | other tasks' test images | photos | documents / screenshots |")
    print("|---|---|---|---|---|")
    for card in cards(folder):
        if card.guard is None:
            continue
        measured = card.guard.measured

        def cell(part: dict) -> str:
            return f"{part['flagged']:.1%} of {part['n']}"

        print(f"| {card.key} | {cell(measured['right_task_test'])} | {cell(measured['other_tasks_all'])} | "
              f"{cell(measured['photos_held_out'])} | {cell(measured['documents_screenshots_held_out'])} |")


def interval_table(folder: Path) -> None:
    """95% bootstrap intervals and the indeterminate band, from each card's appraisal."""
    print("| key | accuracy [95% CI] | macro-F1 [95% CI] | ROC-AUC [95% CI] | sensitivity / specificity [95% CI] "
          "| uncertain band (chosen on validation) | test images uncertain | accuracy outside / inside |")
    print("|---|---|---|---|---|---|---|---|")
    for card in cards(folder):
        if card.appraisal is None or card.indeterminate is None:
            continue
        ci, band = card.appraisal.intervals, card.indeterminate.classes
        sens = (f"{interval(ci, 'sensitivity')} / {interval(ci, 'specificity')}" if "sensitivity" in ci.metrics
                else "-")
        print(f"| {card.key} | {interval(ci, 'accuracy')} | {interval(ci, 'macro_f1')} | {interval(ci, 'roc_auc')} | "
              f"{sens} | {band.rule.replace('|', chr(92) + '|')} | {band.test.share_uncertain:.1%} | "
              f"{fmt(band.test.accuracy_outside)} / {fmt(band.test.accuracy_inside)} |")


def explanation_table(folder: Path) -> None:
    """Mean ROAD faithfulness per CAM method, the chosen default, and the randomisation check."""
    explained = [c for c in cards(folder) if c.explanations is not None]
    if not explained:
        return
    methods = list(explained[0].explanations.faithfulness.methods)
    print("| key | images | " + " | ".join(methods) + " | default |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    for card in explained:
        e = card.explanations
        table = e.faithfulness.methods
        print(f"| {card.key} | {e.faithfulness.images} | "
              + " | ".join(f"{table[m].mean:+.3f} ({table[m].share_positive:.0%})" if m in table else "-"
                           for m in methods)
              + f" | {e.default_method} |")
    print()
    stages = explained[0].explanations.sanity_check.stages
    print("Randomisation check, mean |Spearman| with the trained model's map after randomising (cumulatively) "
          + ", ".join(stages) + ":")
    print()
    print("| key | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for card in explained:
        s = card.explanations.sanity_check.methods
        print(f"| {card.key} | " + " | ".join(" -> ".join(f"{v:.2f}" for v in s.get(m, [])) for m in methods) + " |")


def findings_table(folder: Path) -> None:
    """Per finding of each multi-label model: held-out positives, ROC-AUC and sens / spec at its threshold, 95% CI."""
    with_findings = [c for c in cards(folder) if c.findings]
    if not with_findings:
        return
    print("| key | finding | test positive slices | ROC-AUC [95% CI] | average precision | threshold "
          "| sensitivity [95% CI] | specificity [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for card in with_findings:
        for name, finding in card.findings.items():
            test = finding.test
            ci = card.appraisal.findings.get(name) if card.appraisal is not None else None
            print(f"| {card.key} | {finding.title} | {test.positives} | {interval(ci, 'roc_auc', test.roc_auc)} | "
                  f"{fmt(test.average_precision)} | {finding.threshold:.3f} | "
                  f"{interval(ci, 'sensitivity', test.sensitivity)} | {interval(ci, 'specificity', test.specificity)} |")


def shortcut_table(paths: list[Path]) -> None:
    """The shortcut audit (core.lab.shortcuts) of every card that has one, with its recipe."""
    print("| key | recipe | preprocessing | as is: accuracy / ROC-AUC | sens / spec at threshold | lungs blanked | "
          "only lungs kept | Grad-CAM mass in the lung fields |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        card = read_card(path)
        audit = card.shortcuts
        if audit is None:
            continue
        scores, at = audit.scores, card.test_figures.at_threshold
        recipe = "bundled" if path.parent.name == "weights" else f"{path.parent.name}/{path.name}"

        def pair(name: str) -> str:
            return f"{fmt(scores[name]['accuracy'])} / {fmt(scores[name]['roc_auc'])}"

        steps = ", ".join(card.preprocessing) or "none"
        print(f"| {card.key} | {card.arch}, {recipe} | {steps} | {pair('original')} | "
              f"{fmt(at and at.sensitivity)} / {fmt(at and at.specificity)} | {pair('lungs_blanked')} | "
              f"{pair('lungs_only')} | "
              f"{audit.cam['mass_in_lungs_mean']:.1%} (fields: {audit.lung_area_share:.1%} of the input) |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--runs"]:
        here = Path(__file__).resolve().parent
        runs_table(here / "runs" / "cards", here.parent / "weights")
        raise SystemExit(0)
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "weights"
    main(folder)
    print()
    guard_table(folder)
    print()
    interval_table(folder)
    print()
    explanation_table(folder)
    print()
    findings_table(folder)
    print()
    records = Path(__file__).resolve().parent
    shortcut_table(sorted(folder.glob("cxr_*.json")) + sorted(records.glob("preprocessing/cxr_*.json"))
                   + sorted(records.glob("arch/cxr_*.json")))
