"""Multi-label outputs through core: exclusive classes plus independent findings (the head_ct spec).

A tiny synthetic head-CT-like folder (patients, a few positive slices each, finding columns) goes
through core.lab.train, core.lab.evaluate, core.predict, the CAM and ROAD code; the pieces that decide the
figures (loss, pos_weight, temperatures, split stratification, finding columns) are checked on
inputs whose answer is known.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.calibration import fit_binary_temperature, output_probabilities
from core.cards import check_card, read_card
from core.lab.data import BalancedSampler, Record, carve_split, finding_targets, read_records
from core.lab.evaluate import compute_finding_metrics
from core.explain import compute_cam, road_score
from core.models import load_model
from core.pipeline import Answer, predict_uploads, result_row
from core.preprocess import EvalPreset
from core.imaging import read_scan
from core.tasks import get_task
from core.lab.train import OutputLoss, finding_pos_weight, get_args_parser, main
from tests.conftest import REPO, encode, synthetic_slice

SPEC = get_task("head_ct")
FINDINGS = SPEC.findings


def _slice(seed: int, findings: dict[str, int]) -> np.ndarray:
    image = synthetic_slice(96, seed=seed, kind=0).astype(np.float32)
    yy, xx = np.mgrid[0:96, 0:96]
    for j, name in enumerate(FINDINGS):  # each present finding adds a bright spot at its own place
        if findings[name]:
            cx, cy = 20 + 11 * j, 25 + 8 * (j % 3)
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < 30] = 250
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def head_folder(tmp_path_factory) -> Path:
    """12 patients x 8 slices; half the patients have 3 hemorrhage slices with one or two findings."""
    root = tmp_path_factory.mktemp("head")
    rows = []
    for patient in range(12):
        for slice_no in range(8):
            positive = patient % 2 == 0 and slice_no in (3, 4, 5)
            findings = {name: 0 for name in FINDINGS}
            if positive:
                findings[FINDINGS[(patient // 2 + slice_no) % 5]] = 1  # one of the five hemorrhage types
                findings["fracture"] = int(slice_no == 4)
            label = "hemorrhage" if positive else "normal"
            rel = f"train/{label}/{patient}_{slice_no}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode(_slice(1000 * patient + slice_no, findings)))
            rows.append({"path": rel, "label": label, "split": "train", "patient": f"p{patient}",
                         "slice": slice_no, **findings})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def trained(head_folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head_weights")
    argv = ["--task", "head_ct", "--data", str(head_folder), "--pretrained", "none", "--head-epochs", "0",
            "--epochs", "2", "--batch-size", "8", "--val-frac", "0.25", "--test-frac", "0.25", "--stratify", "positive",
            "--device", "cpu", "--out", str(out)]
    main(get_args_parser().parse_args(argv), argv)
    return out


def test_spec_orders_classes_then_findings() -> None:
    assert SPEC.outputs == ("normal", "hemorrhage", *FINDINGS) and SPEC.num_outputs == 8
    assert SPEC.output_index("sdh") == 6 and SPEC.output_title("sdh") == "subdural" and SPEC.output_title("normal") == "normal"
    with pytest.raises(ValueError, match="unknown output"):
        SPEC.output_index("ischemia")


def test_finding_columns_are_read_and_checked(head_folder: Path) -> None:
    records = read_records(head_folder)
    truth = finding_targets(records, SPEC)
    assert truth.shape == (96, 6) and set(np.unique(truth)) == {0.0, 1.0}
    assert truth[[r.label == "normal" for r in records]].sum() == 0
    broken = Record(Path("x.png"), "x.png", "normal", columns=(("ivh", "2"),))
    with pytest.raises(ValueError, match="0/1 value"):
        finding_targets([broken], SPEC)
    with pytest.raises(ValueError, match="missing"):
        finding_targets([Record(Path("x.png"), "x.png", "normal")], SPEC)
    assert finding_targets([Record(Path("x.png"), "x.png", "glioma")], get_task("brain_mri")).shape == (1, 0)


def test_output_probabilities_split_softmax_and_sigmoid() -> None:
    logits = np.array([[2.0, 0.0, 0.0, 3.0], [0.0, 1.0, -3.0, 0.0]])
    classes, findings = output_probabilities(logits, 2, temperature=2.0, finding_temperatures=[1.0, 0.5])
    assert np.allclose(classes.sum(axis=1), 1.0) and classes[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert findings[0, 1] == pytest.approx(1 / (1 + np.exp(-6.0))) and findings[1, 0] == pytest.approx(1 / (1 + np.exp(3.0)))
    with pytest.raises(ValueError, match="finding temperatures"):
        output_probabilities(logits, 2, 1.0, [1.0])


def test_binary_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20000)
    truth = rng.random(20000) < 1 / (1 + np.exp(-z / 2.5))  # the true probabilities are sigmoid(z / 2.5)
    assert fit_binary_temperature(z, truth) == pytest.approx(2.5, rel=0.08)
    assert fit_binary_temperature(z, np.zeros(20000, bool)) == 1.0  # no positive: nothing to fit


def test_loss_weighs_rare_findings_and_reaches_every_output() -> None:
    targets = [0, 0, 0, 1]  # balanced draw: the hemorrhage image weighs 3x each normal one
    findings = np.array([[0, 0], [0, 0], [0, 0], [1, 0]], np.float32)
    weight = finding_pos_weight(BalancedSampler(targets), findings)
    # prevalence of finding 0 under the draw is 0.5 -> weight 1; finding 1 never positive -> clipped to 20
    assert weight.tolist() == pytest.approx([1.0, 20.0])
    outputs = torch.zeros(4, 4, requires_grad=True)
    loss = OutputLoss(2, weight)(outputs, torch.tensor(targets), torch.from_numpy(findings))
    loss.backward()
    assert loss.item() == pytest.approx(np.log(2) + np.log(2) * (1 + 3 * 1 + 4 * 1) / 8, rel=1e-5)
    assert (outputs.grad[:, 2:] != 0).any() and (outputs.grad[:, :2] != 0).any()
    plain = OutputLoss(2)(outputs.detach(), torch.tensor(targets), torch.from_numpy(findings))
    assert plain.item() == pytest.approx(np.log(2))  # without findings: cross-entropy only


def test_positive_stratification_puts_positive_patients_on_every_side(head_folder: Path) -> None:
    records = read_records(head_folder)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in records]  # noise: no near-duplicates
    for seed in range(3):
        sides, audit, method = carve_split(records, images, 0.25, 0.25, seed, "positive", "hemorrhage")
        per_side = audit["patients_per_split"]
        assert all(per_side[s]["with hemorrhage"] >= 1 for s in ("train", "val", "test")), per_side
        assert audit["patients_across_splits"] == 0 and "counts as hemorrhage" in method
    with pytest.raises(ValueError, match="stratify"):
        carve_split(records, images, 0.25, 0.25, 0, "positive", None)


def test_training_writes_a_card_with_every_finding(trained: Path, head_folder: Path) -> None:
    card = read_card(trained / "head_ct.json")
    assert check_card(card, SPEC) == []
    assert list(card.findings) == list(FINDINGS)
    test_truth = card.split.findings["test"]
    for name, finding in card.findings.items():
        assert finding.temperature > 0 and 0 < finding.threshold < 1
        assert finding.test.positives == test_truth[name]  # the split's own count, not a guess
        assert finding.test.n == card.metrics.n
    assert card.split.patients_per_split["test"]["with hemorrhage"] >= 1
    loaded = load_model(SPEC, trained / "head_ct.safetensors", require_guard=False)
    out = loaded.module(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 8)


def test_evaluate_scores_each_finding_and_reproduces_the_card(trained: Path, head_folder: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "preds.csv"
    result = subprocess.run(
        [sys.executable, "-m", "core.evaluate", "--task", "head_ct", "--data", str(head_folder), "--weights",
         str(trained / "head_ct.safetensors"), "--card-split", "test", "--json", "--predictions", str(predictions),
         "--batch-size", "8"],  # the training run's batch: an untrained model's near-equal scores are batch-sensitive
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    card = read_card(trained / "head_ct.json")
    assert metrics["accuracy"] == pytest.approx(card.metrics.accuracy, abs=1e-9)
    for name in FINDINGS:
        assert metrics["findings"][name]["positives"] == card.findings[name].test.positives
        assert metrics["findings"][name]["roc_auc"] == pytest.approx(card.findings[name].test.roc_auc, abs=1e-9)
    header = predictions.read_text().splitlines()[0].split(",")
    assert header[3:] == [f"prob_{key}" for key in SPEC.outputs]
    text = subprocess.run(
        [sys.executable, "-m", "core.evaluate", "--task", "head_ct", "--data", str(head_folder), "--weights",
         str(trained / "head_ct.safetensors")], capture_output=True, text=True, cwd=REPO, timeout=300).stdout
    assert "findings (independent)" in text and "fracture" in text


def test_finding_metrics_on_known_scores() -> None:
    truth = np.array([[1], [1], [0], [0], [0]])
    scores = np.array([[0.9], [0.4], [0.5], [0.1], [0.2]])
    single = get_task("head_ct")
    row = compute_finding_metrics(np.repeat(truth, 6, 1), np.repeat(scores, 6, 1), [0.45] * 6, single.findings)["sdh"]
    assert row["positives"] == 2 and row["roc_auc"] == pytest.approx(5 / 6)
    assert row["sensitivity"] == 0.5 and row["specificity"] == pytest.approx(2 / 3)


def test_predictions_cams_and_road_cover_the_findings(trained: Path, head_folder: Path) -> None:
    classifier = load_model(SPEC, trained / "head_ct.safetensors", require_guard=False)
    path = next(head_folder.glob("train/hemorrhage/*.png"))
    rows = [result_row(name, outcome) for name, outcome in
            predict_uploads(classifier, [(path.name, path.read_bytes()), ("bad.png", b"not an image")])]
    assert rows[0]["status"] in ("ok", "rejected")  # the guard may flag a synthetic slice; findings need an ok row
    row = result_row("x.png", Answer("0" * 16, _prediction(classifier, path)))
    assert set(row["findings"]) == set(FINDINGS) and set(row["present"]) <= set(FINDINGS)
    assert all(0 < p < 1 for p in row["findings"].values())
    assert rows[1]["status"] == "rejected"
    tensor = EvalPreset(SPEC)(read_scan(path.read_bytes(), path.name)).tensor
    finding_map = compute_cam(classifier, tensor, SPEC.output_index("edh"))
    assert finding_map.shape == (224, 224) and 0 <= finding_map.min() <= finding_map.max() <= 1
    road = road_score(classifier, tensor, finding_map, SPEC.output_index("edh"))
    assert 0 < road.probability < 1
    with pytest.raises(ValueError, match="out of range"):
        compute_cam(classifier, tensor, SPEC.num_outputs)


def test_bundled_head_ct_explains_each_output_separately() -> None:
    """On the bundled model, the map for a finding is not the map for the main class."""
    from tests.conftest import data_folder

    folder = data_folder("head_ct")
    classifier = load_model(SPEC)
    path = next((folder / "train" / "hemorrhage").glob("*.webp"))
    tensor = EvalPreset(SPEC)(read_scan(path.read_bytes(), path.name)).tensor
    maps = {key: compute_cam(classifier, tensor, SPEC.output_index(key)) for key in ("hemorrhage", "edh", "fracture")}
    assert any(m.max() > 0 for m in maps.values())
    assert not np.allclose(maps["hemorrhage"], maps["edh"]) and not np.allclose(maps["edh"], maps["fracture"])


def _prediction(classifier, path: Path):
    from core.pipeline import predict_scan

    prediction = predict_scan(classifier, read_scan(path.read_bytes(), path.name))
    assert prediction.probabilities.sum() == pytest.approx(1.0)
    assert len(prediction.findings) == 6 and prediction.findings[4].title == "subdural"
    assert all(f.above_threshold == (f.probability >= f.threshold) for f in prediction.findings)
    assert all(f.above_threshold for f in prediction.findings if f.present)
    return prediction


def test_batch_table_has_a_column_per_finding() -> None:
    from ui.batch_page import table_rows

    row = {"file": "a.dcm", "status": "ok", "prediction": "hemorrhage", "probabilities": {"normal": 0.2, "hemorrhage": 0.8},
           "uncertain": False, "findings": {name: 0.1 * (j + 1) for j, name in enumerate(FINDINGS)}, "present": ["sdh"]}
    flat = table_rows([row, {"file": "b.png", "status": "rejected", "reason": "not a scan"}], SPEC)
    assert flat[0]["findings"] == "sdh" and flat[0]["p_sdh"] == pytest.approx(0.5)
    assert [k for k in flat[0] if k.startswith("p_")] == [f"p_{key}" for key in SPEC.outputs]
    assert flat[1]["p_sdh"] is None and flat[1]["findings"] == ""
