"""Print the bundled models' held-out figures as Markdown tables, read from their cards.

Usage: python train/summarize.py [WEIGHTS_DIR]

The last table sets the chest X-ray models' shortcut audits beside those of the candidate
recipes kept in train/preprocessing/ and train/arch/ (their cards).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def main(folder: Path) -> None:
    print("| key | test n | accuracy | balanced acc. | macro-F1 | ROC-AUC | ECE | threshold (sens / spec on test) | temperature | epochs | train time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.json")):
        card = json.loads(path.read_text())
        m = card["metrics"]
        threshold = "argmax"
        if card.get("threshold") is not None:
            at = m.get("at_threshold", {})
            threshold = f"{card['positive']} >= {card['threshold']:.3f} ({fmt(at.get('sensitivity'))} / {fmt(at.get('specificity'))})"
        t = card["training"]
        print(f"| {card['key']} | {m['n']} | {fmt(m['accuracy'])} | {fmt(m['balanced_accuracy'])} | {fmt(m['macro_f1'])} | "
              f"{fmt(m['roc_auc'])} | {fmt(m['ece'])} | {threshold} | {card['temperature']:.2f} | "
              f"{t['epochs_run']} (best {t['best_epoch']}) | {t['seconds'] / 60:.0f} min |")


def guard_table(folder: Path) -> None:
    """Flag rates of each model's wrong-input guard (share of images flagged, with n)."""
    print("| key | own test images (should be low) | other tasks' test images | photos | documents / screenshots |")
    print("|---|---|---|---|---|")
    for path in sorted(folder.glob("*.json")):
        card = json.loads(path.read_text())
        measured = card.get("guard", {}).get("measured")
        if not measured:
            continue

        def cell(part: dict) -> str:
            return f"{part['flagged']:.1%} of {part['n']}"

        print(f"| {card['key']} | {cell(measured['right_task_test'])} | {cell(measured['other_tasks_all'])} | "
              f"{cell(measured['photos_held_out'])} | {cell(measured['documents_screenshots_held_out'])} |")


def interval_table(folder: Path) -> None:
    """95% bootstrap intervals and the indeterminate band, from each card's appraisal."""
    print("| key | accuracy [95% CI] | macro-F1 [95% CI] | ROC-AUC [95% CI] | sensitivity / specificity [95% CI] "
          "| uncertain band | test images uncertain | accuracy outside / inside |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.json")):
        card = json.loads(path.read_text())
        ci, band = card["metrics"].get("intervals"), card.get("indeterminate")
        if not ci or not band:
            continue

        def cell(name: str) -> str:
            v = ci.get(name)
            return f"{v['estimate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" if v else "-"

        test = band["test"]
        sens = f"{cell('sensitivity')} / {cell('specificity')}" if "sensitivity" in ci else "-"
        print(f"| {card['key']} | {cell('accuracy')} | {cell('macro_f1')} | {cell('roc_auc')} | {sens} | {band['rule'].replace('|', chr(92) + '|')} | "
              f"{test['share_uncertain']:.1%} | {fmt(test['accuracy_outside'])} / {fmt(test['accuracy_inside'])} |")


def explanation_table(folder: Path) -> None:
    """Mean ROAD faithfulness per CAM method, the chosen default, and the randomisation check."""
    cards = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    cards = [c for c in cards if c.get("explanations")]
    if not cards:
        return
    methods = list(cards[0]["explanations"]["faithfulness"]["methods"])
    print("| key | images | " + " | ".join(methods) + " | default |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    for card in cards:
        e = card["explanations"]
        table = e["faithfulness"]["methods"]
        print(f"| {card['key']} | {e['faithfulness']['images']} | "
              + " | ".join(f"{table[m]['mean']:+.3f} ({table[m]['share_positive']:.0%})" for m in methods)
              + f" | {e['default_method']} |")
    print()
    stages = cards[0]["explanations"]["sanity_check"]["stages"]
    print("Randomisation check, mean |Spearman| with the trained model's map after randomising (cumulatively) "
          + ", ".join(stages) + ":")
    print()
    print("| key | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for card in cards:
        s = card["explanations"]["sanity_check"]["methods"]
        print(f"| {card['key']} | " + " | ".join(" -> ".join(f"{v:.2f}" for v in s[m]) for m in methods) + " |")


def findings_table(folder: Path) -> None:
    """Per finding of each multi-label model: held-out positives, ROC-AUC and sens / spec at its threshold, 95% CI."""
    cards = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    cards = [c for c in cards if c.get("findings")]
    if not cards:
        return
    print("| key | finding | test positive slices | ROC-AUC [95% CI] | average precision | threshold "
          "| sensitivity [95% CI] | specificity [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for card in cards:
        for finding in card["findings"].values():
            test, ci = finding["test"], finding["test"].get("intervals", {})

            def cell(name: str) -> str:
                v = ci.get(name)
                if not v or v.get("low") is None:
                    return fmt(test.get(name))
                return f"{v['estimate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"

            print(f"| {card['key']} | {finding['title']} | {test['positives']} | {cell('roc_auc')} | "
                  f"{fmt(test['average_precision'])} | {finding['threshold']:.3f} | {cell('sensitivity')} | "
                  f"{cell('specificity')} |")


def shortcut_table(paths: list[Path]) -> None:
    """The shortcut audit (core.lab.shortcuts) of every card that has one, with its recipe."""
    print("| key | recipe | preprocessing | as is: accuracy / ROC-AUC | sens / spec at threshold | lungs blanked | "
          "only lungs kept | Grad-CAM mass in the lung fields |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        card = json.loads(path.read_text())
        audit = card.get("shortcuts") or {}
        if not audit:
            continue
        scores, at = audit["scores"], card["metrics"].get("at_threshold", {})
        recipe = "bundled" if path.parent.name == "weights" else f"{path.parent.name}/{path.name}"

        def pair(name: str) -> str:
            return f"{fmt(scores[name]['accuracy'])} / {fmt(scores[name]['roc_auc'])}"

        steps = ", ".join(card.get("preprocessing", [])) or "none"
        print(f"| {card['key']} | {card['arch']}, {recipe} | {steps} | {pair('original')} | "
              f"{fmt(at.get('sensitivity'))} / {fmt(at.get('specificity'))} | {pair('lungs_blanked')} | "
              f"{pair('lungs_only')} | "
              f"{audit['cam']['mass_in_lungs_mean']:.1%} (fields: {audit['lung_area_share']:.1%} of the input) |")


if __name__ == "__main__":
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
