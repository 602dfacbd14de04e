"""`python -m core.lab.audit`: data folder tools.

    python -m core.lab.audit audit --data ../shared/data/brain_mri
    python -m core.lab.audit audit --data ../shared/data/ct_covid --task ct_covid --split card
    python -m core.lab.audit window --data ../shared/data/head_ct --window 40 80

`audit`: near-duplicate groups, groups mixing labels, and how many images of a split's other sides
have a copy on the train side. `window`: how a CT folder exported in a window fills its grey range,
read back in HU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from core.imaging import read_scan
from core.lab.data import (HASH_THRESHOLD, Record, audit_near_duplicates, check_labels, load_pixels, read_records,
                           recorded_split, sample_records)

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core.lab.audit", description="Data folder tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="near-duplicate groups, label conflicts and split leaks of a folder")
    audit.add_argument("--data", required=True, type=Path, help="folder with manifest.csv or class subfolders")
    audit.add_argument("--split", choices=("manifest", "card", "none"), default="manifest",
                       help="which split to check for leaks: the manifest's `split` column (default), the split "
                            "recorded in a model's card (--task, re-carved as core.train did), or none")
    audit.add_argument("--task", default=None, help="registry key: read pixels as that model does (CT window); "
                                                    "needed for --split card")
    audit.add_argument("--threshold", type=int, default=HASH_THRESHOLD, help="Hamming distance (of 256 bits)")
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    window = commands.add_parser("window", help="grey-level facts of a CT folder exported in a window, read back in HU")
    window.add_argument("--data", required=True, type=Path, help="folder with manifest.csv or class subfolders")
    window.add_argument("--window", nargs=2, type=float, default=(40.0, 80.0), metavar=("CENTRE", "WIDTH"),
                        help="the window (HU) the images are thought to be exported in (default: brain 40 / 80)")
    window.add_argument("--sample", type=int, default=300, help="images read (a seeded sample)")
    return parser


def window_facts(images: list[np.ndarray], center: float, width: float) -> dict:
    """How 8-bit CT exports (uint8, or float in [0, 1] as `read_scan` gives them) fill their grey range,
    and what the commonest tissue grey means in HU.

    Pixels at 0 and 255 are clipped by the window; the mode of the grey levels between them is
    the commonest soft tissue (brain parenchyma on a head CT, 20-45 HU), read back through the
    window as HU = centre - width / 2 + grey / 255 * width.
    """
    grey = [im if im.dtype == np.uint8 else np.round(np.clip(im, 0, 1) * 255).astype(np.uint8) for im in images]
    counts = np.bincount(np.concatenate([im.ravel() for im in grey]), minlength=256).astype(np.float64)
    inner = counts[5:250]
    mode = int(5 + inner.argmax())
    return {"images": len(images), "pixels": int(counts.sum()), "black_share": counts[0] / counts.sum(),
            "white_share": counts[255] / counts.sum(), "tissue_mode_grey": mode,
            "tissue_mode_hu": center - width / 2.0 + mode / 255.0 * width, "window": [center, width]}


def _scan_pixels(records: list[Record]) -> list[np.ndarray]:
    """Displayed pixels of every record (no model window), for folders audited without a task."""
    images = []
    for record in records:
        try:
            images.append(read_scan(record.path.read_bytes(), record.path.name).pixels)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {record.rel}: {exc}") from None
    return images


def format_audit(audit: dict, source: str) -> str:
    lines = [
        f"images: {audit['images']}",
        f"near-duplicate groups: {audit['groups']} ({audit['groups_of_two_or_more']} with two or more images, "
        f"holding {audit['grouped_images']}; largest {audit['largest_group']}; Hamming <= {audit['threshold']} of 256 bits, "
        "mirrored copies included)",
        f"groups mixing labels: {audit['groups_mixing_labels']} ({audit['images_in_mixed_groups']} images)",
    ]
    for side, leak in audit.get("sides", {}).items():
        share = leak["with_train_duplicate"] / max(leak["images"], 1)
        lines.append(f"{source} split, side '{side}': {leak['with_train_duplicate']} of {leak['images']} images "
                     f"({share:.1%}) have a near-duplicate on the train side")
    if "sides" in audit and not audit["sides"]:
        lines.append(f"{source} split: every image is on the train side; nothing to check")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "window":
        try:
            records = sample_records(read_records(args.data), args.sample, 0)
            facts = window_facts(_scan_pixels(records), *args.window)
        except ValueError as exc:
            parser.exit(2, f"error: {exc}\n")
        center, width = facts["window"]
        print(f"{facts['images']} images: {facts['black_share']:.1%} of pixels black (at or below {center - width / 2:g} HU "
              f"if exported at centre {center:g} / width {width:g}), {facts['white_share']:.1%} white (at or above "
              f"{center + width / 2:g} HU); commonest tissue grey {facts['tissue_mode_grey']} -> "
              f"{facts['tissue_mode_hu']:.0f} HU")
        return 0
    try:
        records = read_records(args.data)
        spec = None
        if args.task:
            from core.tasks import get_task

            spec = get_task(args.task)
            check_labels(records, spec)
        sides: list | None = None
        if args.split == "card":
            if spec is None:
                parser.error("--split card needs --task")
            from core.cards import read_card
            from core.models import WEIGHTS_DIR

            card = read_card(WEIGHTS_DIR / f"{spec.key}.json")
            # the images as grouped when the split was carved: before any preprocessing step
            records, images, carved = recorded_split(records, spec, card.training.config, preprocess=False)
            sides = list(carved)
        else:
            images = load_pixels(records, spec, preprocess=False) if spec else _scan_pixels(records)
            if args.split == "manifest":
                sides = [r.split for r in records]
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    audit = audit_near_duplicates(records, images, sides, args.threshold)
    print(json.dumps(audit) if args.json else format_audit(audit, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
