"""A tiny train + evaluate run on synthetic data: writes loadable weights and an honest card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.cards import read_card
from core.lab.data import BalancedSampler
from core.models import load_model
from core.tasks import get_task
from core.lab.train import get_args_parser, main
from tests.conftest import REPO, encode, synthetic_slice

LABELS = ("normal", "benign", "malignant")


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for kind, label in enumerate(LABELS):
        (root / label).mkdir()
        for i in range(24):
            (root / label / f"{label}_{i}.png").write_bytes(encode(synthetic_slice(96, seed=100 * kind + i, kind=kind)))
    return root


@pytest.fixture(scope="module")
def trained(synthetic_folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights")
    argv = ["--task", "ct_cancer", "--data", str(synthetic_folder), "--recipe", "none", "--pretrained", "none",
            "--head-epochs", "0", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    main(get_args_parser().parse_args(argv), argv)
    return out


def test_training_writes_loadable_weights_and_a_card(trained: Path) -> None:
    weights = trained / "ct_cancer.safetensors"
    card = read_card(trained / "ct_cancer.json")
    assert weights.is_file() and weights.stat().st_size < 10 * 2**20
    classifier = load_model(get_task("ct_cancer"), weights, require_guard=False)
    assert classifier.card.sha256 == card.sha256
    assert card.metrics.split == "test"
    split_sizes = {side: sum(counts.values()) for side, counts in card.split.counts.items()}
    assert card.metrics.n == split_sizes["test"] and sum(split_sizes.values()) == 72
    assert card.split.near_duplicate_groups_across_splits == 0
    assert card.training.command.startswith("python -m core.train --task ct_cancer")
    assert card.training.epochs_run == 2 and len(card.training.history) == 2
    assert card.temperature > 0 and card.positive == "malignant" and 0 < card.threshold < 1  # a threshold on 1 of 3
    assert card.metrics.at_threshold is not None and "Youden" in card.threshold_rule
    assert card.metrics.per_class and card.metrics.confusion_matrix.labels == list(card.labels)


def test_calibrate_only_refits_the_threshold_and_keeps_the_weights(synthetic_folder: Path, trained: Path,
                                                                   tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "recalibrated"
    shutil.copytree(trained, out)
    before = read_card(out / "ct_cancer.json")
    argv = ["--task", "ct_cancer", "--data", str(synthetic_folder), "--out", str(out), "--min-sensitivity", "1.0",
            "--device", "cpu", "--calibrate-only"]
    main(get_args_parser().parse_args(argv), argv)
    after = read_card(out / "ct_cancer.json")
    assert after.sha256 == before.sha256 and after.training.history == before.training.history
    assert after.threshold_rule == "highest threshold with validation sensitivity >= 1.0"
    assert after.validation.at_threshold.sensitivity == 1.0
    assert after.training.calibration["command"].endswith("--calibrate-only")
    assert after.split == before.split and after.metrics.n == before.metrics.n
    load_model(get_task("ct_cancer"), out / "ct_cancer.safetensors", require_guard=False)


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.evaluate", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_evaluate_json_and_predictions(trained: Path, synthetic_folder: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "preds.csv"
    result = run_evaluate("--task", "ct_cancer", "--data", str(synthetic_folder), "--weights",
                          str(trained / "ct_cancer.safetensors"), "--json", "--predictions", str(predictions))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 72
    assert {"n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["confusion_matrix"]["labels"] == list(LABELS)
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 72
    assert 0.0 <= metrics["accuracy"] <= 1.0
    rows = predictions.read_text().splitlines()
    assert rows[0] == "path,label,pred,prob_normal,prob_benign,prob_malignant" and len(rows) == 73
    text = run_evaluate("--task", "ct_cancer", "--data", str(synthetic_folder), "--weights", str(trained / "ct_cancer.safetensors"))
    assert text.returncode == 0 and "balanced_accuracy" in text.stdout and "confusion matrix" in text.stdout


def test_evaluate_refuses_unknown_labels(synthetic_folder: Path, trained: Path) -> None:
    result = run_evaluate("--task", "brain_mri", "--data", str(synthetic_folder))
    assert result.returncode == 2
    assert "not classes of brain_mri" in result.stderr and "glioma" in result.stderr


def test_training_imports_stay_lean() -> None:
    """The GPU machines have torch/timm/numpy/opencv/sklearn but not streamlit, grad-cam or pydicom."""
    code = (
        "import sys\n"
        "for name in ('streamlit', 'pytorch_grad_cam', 'pydicom', 'plotly'):\n"
        "    sys.modules[name] = None\n"
        "import core.lab.train, core.lab.evaluate\n"
        "core.lab.train.get_args_parser().parse_args(['--task', 'brain_mri', '--data', '.'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_torchrun_two_cpu_processes_match_the_single_process_format(synthetic_folder: Path, trained: Path,
                                                                    tmp_path: Path) -> None:
    """core.lab.train under torchrun (2 ranks, gloo): one card and one weights file, same format, loadable."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "core.train", "--task", "ct_cancer", "--data", str(synthetic_folder), "--recipe", "none", "--pretrained", "none",
               "--head-epochs", "0", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone wrote (the checkpoint too)
    assert sorted(p.name for p in out.iterdir()) == ["ct_cancer.checkpoint.pt", "ct_cancer.json", "ct_cancer.safetensors"]
    assert "[rank 0]" in result.stderr and "wrote" in result.stderr
    single, ddp = read_card(trained / "ct_cancer.json"), read_card(out / "ct_cancer.json")
    assert set(vars(ddp)) == set(vars(single)) and ddp.metrics.to_dict().keys() == single.metrics.to_dict().keys()
    assert ddp.training.config.keys() == single.training.config.keys()
    assert ddp.training.world_size == 2 and single.training.world_size == 1
    assert ddp.training.epochs_run == 2 and len(ddp.training.history) == 2
    assert ddp.split == single.split  # every rank carved the same split as one process does
    classifier = load_model(get_task("ct_cancer"), out / "ct_cancer.safetensors", require_guard=False)
    assert classifier.card.sha256 == ddp.sha256


def test_balanced_sampler_shards_one_balanced_draw() -> None:
    targets = [0] * 90 + [1] * 10
    whole = list(BalancedSampler(targets, seed=3))
    shards = [list(BalancedSampler(targets, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert [i for pair in zip(*shards) for i in pair] == whole  # the ranks split one draw between them
    share = sum(targets[i] for i in whole) / len(whole)
    assert 0.3 < share < 0.7  # the 10% class drawn about as often as the 90% one
    epoch1 = BalancedSampler(targets, seed=3)
    epoch1.set_epoch(1)
    assert list(epoch1) != whole
    with pytest.raises(ValueError):
        BalancedSampler(targets, rank=2, world_size=2)


def test_crossval_folds_hold_whole_groups_and_report_spread(synthetic_folder: Path, tmp_path: Path) -> None:
    from core.lab.crossval import assign_folds

    groups = np.repeat(np.arange(10), 3)
    labels = ["a"] * 15 + ["b"] * 15
    folds = assign_folds(labels, groups, 3, seed=0)
    assert all(len(set(folds[groups == g])) == 1 for g in range(10))  # a group never straddles folds
    assert sorted(np.bincount(folds, minlength=3)) == [9, 9, 12]  # as even as whole groups of 3 allow
    with pytest.raises(ValueError):
        assign_folds(labels, groups, 1, seed=0)

    report = tmp_path / "cv.json"
    result = subprocess.run([sys.executable, "-m", "core.lab.crossval", "--task", "ct_cancer", "--data", str(synthetic_folder),
                             "--pretrained", "none", "--head-epochs", "0", "--epochs", "1", "--batch-size", "8",
                             "--device", "cpu", "--folds", "3", "--report", str(report)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cv = json.loads(report.read_text())
    assert [row["fold"] for row in cv["folds"]] == [1, 2, 3]
    assert sum(row["n"] for row in cv["folds"]) == 72  # every image scored exactly once
    assert all(row["leaks_across_sides"] == 0 for row in cv["folds"])
    assert set(cv["summary"]["accuracy"]) == {"mean", "sd"} and "accuracy" in result.stdout


def test_training_history_records_throughput_and_data_wait(trained: Path) -> None:
    for epoch in read_card(trained / "ct_cancer.json").training.history:
        assert epoch["train_images_per_s"] > 0
        assert 0.0 <= epoch["data_wait_share"] <= 1.0
