"""Bundled models on the real data folders (skipped with a reason where ../shared/data is absent)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.lab.data import read_records
from core.imaging import read_scan
from core.models import WEIGHTS_DIR, load_model
from core.pipeline import predict_scan
from core.tasks import TASKS, get_task
from tests.conftest import REPO, data_folder


@pytest.mark.parametrize("key", list(TASKS))
def test_real_images_read_and_predict(key: str) -> None:
    spec = get_task(key)
    records = read_records(data_folder(spec.data_folder))
    assert {r.label for r in records} == set(spec.labels)
    classifier = load_model(spec)
    by_label = {label: [r for r in records if r.label == label][:3] for label in spec.labels}
    for label, chosen in by_label.items():
        for record in chosen:
            prediction = predict_scan(classifier, read_scan(record.path.read_bytes(), record.path.name))
            assert prediction.probabilities.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("key", ["ct_covid", "ct_cancer", "head_ct"])
def test_card_test_metrics_reproduce_from_the_command(key: str) -> None:
    """The card's held-out numbers come from a command anyone can rerun: re-carve the split, score it."""
    folder = data_folder(get_task(key).data_folder)
    card = json.loads((WEIGHTS_DIR / f"{key}.json").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "core.evaluate", "--task", key, "--data", str(folder), "--card-split", "test", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == card["metrics"]["n"]
    assert metrics["accuracy"] == pytest.approx(card["metrics"]["accuracy"], abs=1e-9)
    assert metrics["confusion_matrix"] == card["metrics"]["confusion_matrix"]
    for name, finding in card.get("findings", {}).items():  # a multi-label model: every finding too
        assert metrics["findings"][name]["positives"] == finding["test"]["positives"]
        assert metrics["findings"][name]["roc_auc"] == pytest.approx(finding["test"]["roc_auc"], abs=1e-9)
