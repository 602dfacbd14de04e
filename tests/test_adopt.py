"""train/adopt.py: a run is bundled only when its card fits the registry, and every card measurement is rerun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from core.models import WEIGHTS_DIR
from tests.conftest import REPO

ADOPT = [sys.executable, str(REPO / "train" / "adopt.py")]


def run_folder(tmp_path: Path, key: str, edit=None) -> Path:
    folder = tmp_path / f"{key}-mobilenet_v2"
    folder.mkdir()
    shutil.copyfile(WEIGHTS_DIR / f"{key}.safetensors", folder / f"{key}.safetensors")
    card = json.loads((WEIGHTS_DIR / f"{key}.json").read_text())
    if edit is not None:
        edit(card)
    (folder / f"{key}.json").write_text(json.dumps(card))
    (folder / "train.log").write_text("")
    return folder


def test_dry_run_lists_every_measurement_the_card_carries(tmp_path: Path) -> None:
    out = subprocess.run([*ADOPT, str(run_folder(tmp_path, "head_ct")), "--data-root", "DATA", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    steps = [line.split(":")[0] for line in out.stdout.splitlines()[1:]]
    assert steps == ["guard", "appraisal", "study"]
    assert "core.lab.guard_fit --data-root DATA --task head_ct" in out.stdout
    out = subprocess.run([*ADOPT, str(run_folder(tmp_path, "cxr_covid")), "--data-root", "DATA", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert [line.split(":")[0] for line in out.stdout.splitlines()[1:]] == ["guard", "appraisal", "shortcuts"]


def test_a_run_whose_card_disagrees_with_the_registry_is_refused(tmp_path: Path) -> None:
    folder = run_folder(tmp_path, "ct_covid", lambda card: card.update(labels=list(reversed(card["labels"]))))
    out = subprocess.run([*ADOPT, str(folder), "--data-root", "DATA", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "disagrees with the registry entry of ct_covid" in out.stderr
    out = subprocess.run([*ADOPT, str(tmp_path / "head_ct-unfinished"), "--data-root", "DATA"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "has no finished" in out.stderr
    out = subprocess.run([*ADOPT, str(tmp_path / "knee_xray-resnet"), "--data-root", "DATA"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "unknown task 'knee_xray'" in out.stderr
