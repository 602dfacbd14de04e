"""Print the bundled models' held-out figures as a Markdown table, read from their cards.

Usage: python train/summarize.py [WEIGHTS_DIR]
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


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "weights"
    main(folder)
    print()
    guard_table(folder)
