"""`python -m core.lab.audit audit`: near-duplicate groups, label conflicts and split leaks of any folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.lab.data import audit_near_duplicates, read_records
from tests.conftest import REPO, data_folder, encode


def pattern(seed: int, size: int = 160) -> np.ndarray:
    """A smooth random grayscale image: distinct images get distinct hashes."""
    coarse = np.random.default_rng(seed).random((6, 6)).astype(np.float32)
    return (cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Six originals on the train side; on the test side an exact copy, a resized copy, a mirrored
    copy, a brightness/contrast change (one of them relabelled), and two images of their own."""
    root = tmp_path_factory.mktemp("audit")
    originals = [pattern(seed) for seed in range(6)]
    rows = []

    def add(name: str, pixels: np.ndarray, label: str, side: str) -> None:
        (root / name).write_bytes(encode(pixels))
        rows.append(f"{name},{label},{side}")

    for i, image in enumerate(originals):
        add(f"orig{i}.png", image, "a" if i % 2 else "b", "train")
    add("exact.png", originals[0], "b", "test")
    add("resized.png", cv2.resize(originals[1], (97, 97), interpolation=cv2.INTER_AREA), "a", "test")
    add("mirrored.png", originals[2][:, ::-1].copy(), "a", "test")  # orig2 is "b": a label conflict
    add("contrast.png", np.clip(originals[3].astype(np.float32) * 0.6 + 70, 0, 255).astype(np.uint8), "a", "test")
    add("new1.png", pattern(50), "a", "test")
    add("new2.png", pattern(51), "b", "val")
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root


def test_audit_catches_copies_and_counts_leaks(folder: Path) -> None:
    from core.lab.audit import _scan_pixels

    records = read_records(folder)
    audit = audit_near_duplicates(records, _scan_pixels(records), [r.split for r in records])
    assert audit["images"] == 12
    assert audit["groups_of_two_or_more"] == 4 and audit["grouped_images"] == 8  # 4 originals, each with its copy
    assert audit["groups"] == 8
    assert audit["groups_mixing_labels"] == 1 and audit["images_in_mixed_groups"] == 2
    assert audit["sides"] == {"test": {"images": 5, "with_train_duplicate": 4}, "val": {"images": 1, "with_train_duplicate": 0}}


def test_audit_command(folder: Path) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "core.lab.audit", "audit", *a], capture_output=True, text=True,
                                    cwd=REPO, timeout=300)
    text = run("--data", str(folder))
    assert text.returncode == 0, text.stderr
    assert "near-duplicate groups: 8" in text.stdout and "groups mixing labels: 1" in text.stdout
    assert "side 'test': 4 of 5 images (80.0%) have a near-duplicate on the train side" in text.stdout
    as_json = json.loads(run("--data", str(folder), "--json", "--split", "none").stdout)
    assert "sides" not in as_json and as_json["groups"] == 8
    wrong = run("--data", str(folder), "--task", "brain_mri")
    assert wrong.returncode == 2 and "not classes of brain_mri" in wrong.stderr
    missing = run("--data", str(folder / "nowhere"))
    assert missing.returncode == 2 and "data folder not found" in missing.stderr


def test_audit_of_a_bundled_models_split_finds_no_leak() -> None:
    """The split recorded in ct_covid's card, re-carved, has no near-duplicate across its sides."""
    data = data_folder("ct_covid")
    result = subprocess.run([sys.executable, "-m", "core.lab.audit", "audit", "--data", str(data), "--task", "ct_covid",
                             "--split", "card", "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    audit = json.loads(result.stdout)
    assert set(audit["sides"]) == {"val", "test"}
    assert all(side["with_train_duplicate"] == 0 for side in audit["sides"].values())


def test_window_facts_read_grey_levels_back_in_hu() -> None:
    from core.lab.audit import window_facts

    image = np.zeros((10, 10), np.uint8)
    image[:5] = 255  # half clipped white
    image[5:8] = 128  # the commonest tissue grey
    facts = window_facts([image, image.astype(np.float32) / 255.0], 40.0, 80.0)
    assert facts["white_share"] == 0.5 and facts["black_share"] == 0.2
    assert facts["tissue_mode_grey"] == 128 and facts["tissue_mode_hu"] == pytest.approx(128 / 255 * 80)
