"""Train a SecondLook model and write `weights/<key>.safetensors` with its card.

Runnable commands (the recipes that made the bundled files are in train/<key>/):

    # ImageNet MobileNetV2 from a local file, staged fine-tuning, on the CPU
    python -m core.train --task brain_mri --data ../shared/data/brain_mri \
        --pretrained ../shared/pretrained/mobilenet_v2-features-imagenet-onnxzoo7-webnn.pth \
        --head-epochs 1 --epochs 4 --unfreeze 5 --device cpu

    # the same on a GPU, longer, whole backbone unfrozen
    python -m core.train --task brain_mri --data DIR --pretrained FILE --epochs 30 --unfreeze all --device cuda

    # from scratch, another backbone, to a scratch folder
    python -m core.train --task ct_covid --data DIR --arch resnet18 --pretrained none --out runs/

    # the same script on several GPUs (or nodes) with DistributedDataParallel; on CPUs: gloo
    torchrun --nproc_per_node 4 -m core.train --task brain_mri --data DIR --pretrained FILE --device cuda
    torchrun --nproc_per_node 2 -m core.train --task ct_covid --data DIR --device cpu --out runs/

Under torchrun every rank reads the data and carves the same split; each draws its own share
of one balanced epoch (`BalancedSampler`), validates on its shard of the validation side, and
the ranks pool their logits so that every rank sees the same metrics and stops together;
gradients are averaged by DDP; only rank 0 writes the weights and the card. --batch-size is
per process.

Steps: read the folder -> near-duplicate (and patient) groups -> stratified group split
train/val/test -> class-balanced sampling with augmentation -> stage 1 (head only) ->
stage 2 (last blocks unfrozen) with early stopping on validation -> save -> reload the saved
file -> temperature and threshold fitted on validation -> metrics on the test split -> card.

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
    recipe_spec,
    save_weights,
    sha256_file,
)
from core.decision import decide, positive_mask, positive_score
from core.preprocess import EvalPreset
from core.tasks import PREPROCESSING_STEPS, TASKS, TaskSpec, get_task

logger = logging.getLogger("core.train")

INTENDED_USE = (
    "Research and education: a second look at a single 2-D image for readers who already have a diagnosis "
    "pathway. Not a medical device; not for diagnosis or treatment decisions."
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a SecondLook model.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key")
    parser.add_argument("--data", required=True, type=Path, help="folder with manifest.csv or class subfolders")
    parser.add_argument("--arch", default=None, help="backbone (default: the registry's); another one gets its own "
                                                      "CAM layer (core.models.CAM_LAYERS)")
    parser.add_argument("--preprocessing", default=None,
                        help="comma-separated steps of core.tasks.PREPROCESSING_STEPS, or 'none' (default: the "
                             "registry's); recorded in the card")
    parser.add_argument("--pretrained", default="none", help="ImageNet weights: a local FILE, 'hub', or 'none'")
    parser.add_argument("--head-epochs", type=int, default=1, help="stage 1: epochs training the head only")
    parser.add_argument("--epochs", type=int, default=10, help="stage 2: epochs with the last blocks unfrozen")
    parser.add_argument("--unfreeze", default="all", help="stage 2: number of last backbone blocks to train, or 'all'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate (backbone: lr * --backbone-lr-scale)")
    parser.add_argument("--backbone-lr-scale", type=float, default=0.3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--patience", type=int, default=4, help="early stopping: epochs without validation gain")
    parser.add_argument("--select", choices=("balanced_accuracy", "auc"), default="balanced_accuracy",
                        help="validation score that picks the best epoch: balanced accuracy of the argmax, or the "
                             "ROC-AUC of the positive class (for a thresholded model: its threshold is set afterwards)")
    parser.add_argument("--val-frac", type=float, default=0.15)
    parser.add_argument("--test-frac", type=float, default=0.15)
    parser.add_argument("--stratify", choices=STRATIFY, default="majority",
                        help="how a split group counts for stratification: its commonest label, or 'positive' "
                             "(a group with any image of the positive class counts as positive: patients with a "
                             "few positive slices)")
    parser.add_argument("--min-sensitivity", type=float, default=None,
                        help="models with a positive class: choose its threshold for this validation sensitivity "
                             "(default: Youden's J)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: 0 on cpu, 8 on cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("weights"), help="folder for <task>.safetensors and <task>.json")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="no training: refit temperature and threshold of the weights in --out on the validation "
                             "side of the split their card recorded (e.g. after the registry gave the model a positive "
                             "class or --min-sensitivity changed), rescore the test side, rewrite the card")
    return parser


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
    """Per-epoch validation record and the best state seen."""

    epochs: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None


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


def set_stage(model: nn.Module, arch: str, unfreeze: int | None, freeze_bn: bool) -> list[dict]:
    """Freeze all but the head and the last `unfreeze` blocks (None: all); return param groups."""
    head = head_parameters(model, arch)
    head_ids = {id(p) for p in head}
    for p in model.parameters():
        p.requires_grad = id(p) in head_ids
    blocks = backbone_blocks(model, arch)
    trainable = blocks if unfreeze is None else blocks[len(blocks) - unfreeze:] if unfreeze > 0 else []
    backbone = [p for block in trainable for p in block.parameters()]
    for p in backbone:
        p.requires_grad = True
    set_bn_mode(model, freeze_bn)
    return [{"params": head, "name": "head"}, {"params": backbone, "name": "backbone"}]


def set_bn_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode, except BatchNorm layers kept in eval mode when their statistics are frozen.

    The local ImageNet MobileNetV2 file has BatchNorm folded into the convolutions (identity
    statistics); train-mode BN would re-normalise with batch statistics and destroy the
    pretrained function, so fine-tuning keeps those layers in eval mode.
    """
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
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
    """Cross-entropy on the exclusive classes plus, for multi-label models, weighted BCE on each finding."""

    def __init__(self, num_classes: int, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classes = nn.CrossEntropyLoss()
        self.findings = nn.BCEWithLogitsLoss(pos_weight=pos_weight) if pos_weight is not None and len(pos_weight) else None

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, findings: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        loss = self.classes(outputs[:, :self.num_classes], targets)
        if self.findings is not None:
            loss = loss + self.findings(outputs[:, self.num_classes:], findings.float())
        return loss


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, spec: TaskSpec, runtime: Runtime,
                    freeze_bn: bool, desc: str) -> tuple[float, float, float]:
    """One pass over this rank's share of the balanced sampler.

    Returns:
        (mean loss over all ranks, training images per second over all ranks, share of this
        rank's time spent waiting for the data loader). `loss.item()` synchronises each step,
        so on a GPU the wait is real idle time, not queued kernels.
    """
    from tqdm import tqdm

    set_bn_mode(model, freeze_bn)
    pos_weight = finding_pos_weight(loader.sampler, loader.dataset.findings) if spec.findings else None
    criterion = OutputLoss(spec.num_classes, pos_weight.to(runtime.device) if pos_weight is not None else None)
    device = runtime.device
    preset = EvalPreset(spec)
    use_amp = device.type == "cuda"
    total, count = 0.0, 0
    progress = tqdm(loader, desc=desc, mininterval=5, leave=False, file=sys.stderr, disable=None if runtime.main else True)
    waited, started = 0.0, time.perf_counter()
    asked = started
    for images, targets, findings in progress:
        waited += time.perf_counter() - asked
        batch = preset.tensor(images[:, 0].to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        findings = findings.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(batch)
        loss = criterion(outputs, targets, findings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(targets)
        count += len(targets)
        asked = time.perf_counter()
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


def run_stage(model: nn.Module, loaders: dict[str, DataLoader], spec: TaskSpec, args: argparse.Namespace,
              runtime: Runtime, history: History, stage: str, epochs: int, unfreeze: int | None, freeze_bn: bool) -> None:
    """Train for up to `epochs`, keeping the state with the best validation score (`--select`)."""
    if epochs <= 0:
        return
    groups = set_stage(model, spec.arch, unfreeze, freeze_bn)
    net = wrap_for_training(model, runtime)  # after freezing: DDP syncs the parameters that train in this stage
    groups[1]["lr"] = args.lr * args.backbone_lr_scale
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    steps = max(1, epochs * len(loaders["train"]))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g.get("lr", args.lr) for g in groups], total_steps=steps, pct_start=0.1)
    stale = 0
    for epoch in range(1, epochs + 1):
        loaders["train"].dataset.epoch = len(history.epochs)
        loaders["train"].sampler.set_epoch(len(history.epochs))
        start = time.time()
        loss, speed, waiting = train_one_epoch(net, loaders["train"], optimizer, scheduler, spec, runtime, freeze_bn,
                                               f"{stage} {epoch}/{epochs}")
        val = evaluate(model, loaders["val_shard"], spec, runtime)
        record = {"stage": stage, "epoch": epoch, "train_loss": round(loss, 4), "val_loss": round(val["loss"], 4),
                  "val_balanced_accuracy": round(val["balanced_accuracy"], 4), "seconds": round(time.time() - start, 1),
                  **({"val_roc_auc": round(val["roc_auc"], 4)} if val["roc_auc"] is not None else {}),
                  **({"val_findings_mean_auc": round(val["findings_mean_auc"], 4)} if val.get("findings_mean_auc") else {}),
                  "train_images_per_s": round(speed, 1), "data_wait_share": round(waiting, 3)}
        history.epochs.append(record)
        logger.info("%s", record)
        if args.select == "auc" and val["roc_auc"] is not None:
            score = val["roc_auc"] - 1e-3 * val["loss"]
        else:
            score = val["balanced_accuracy"] - 1e-3 * val["loss"]
        if score > history.best_score:
            history.best_score, history.best_epoch, stale = score, len(history.epochs), 0
            history.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= args.patience:
                logger.info("early stop: no validation gain in %d epochs", stale)
                break


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


def main(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """Train, save, calibrate, score and write the card; `argv` is recorded as the command."""
    argv = sys.argv[1:] if argv is None else argv
    provenance = environment()  # the code as it was when training started
    runtime = init_runtime(args)
    try:
        train_and_record(args, argv, runtime, provenance)
    finally:
        if runtime.distributed:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's files
            dist.destroy_process_group()


def fit_and_score(spec: TaskSpec, split: Split, args: argparse.Namespace, runtime: Runtime, arch: str,
                  weights: Path) -> tuple[dict, History] | None:
    """Train on the split's train side, save the best state to `weights`, calibrate on val, score test.

    Returns:
        (calibration and test metrics, training history) on rank 0; None on the other ranks.
    """
    loaders = make_loaders(spec, split, args, runtime)
    pretrained = None if args.pretrained == "none" else args.pretrained
    model = build_model(spec, pretrained, arch=arch).to(runtime.device).to(memory_format=torch.channels_last)
    freeze_bn = pretrained is not None
    unfreeze = None if args.unfreeze == "all" else int(args.unfreeze)
    history = History()
    run_stage(model, loaders, spec, args, runtime, history, "head", args.head_epochs if pretrained else 0, 0, freeze_bn)
    run_stage(model, loaders, spec, args, runtime, history, "finetune", args.epochs, unfreeze, freeze_bn)
    if not runtime.main:
        return None
    if history.best_state is not None:
        model.load_state_dict(history.best_state)
    save_weights(model, weights)
    return calibrate_and_score(spec, weights, loaders, args, arch), history


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
    records, images, sides = recorded_split(read_records(args.data), spec, card.training.get("config", {}))
    split = split_from_sides(spec, records, images, sides, card.split, card.split.get("method", ""))
    scored = calibrate_and_score(spec, weights, make_loaders(spec, split, args, runtime), args, card.arch)
    card.positive = spec.positive
    card.temperature, card.threshold, card.threshold_rule = scored["temperature"], scored["threshold"], scored["threshold_rule"]
    card.metrics = {"split": "test", **scored["metrics"]}
    card.validation = scored["validation"]
    card.findings = scored.get("findings", {})
    card.training["calibration"] = {"command": "python -m core.train " + " ".join(shlex.quote(a) for a in argv),
                                    "git_commit": provenance["git_commit"]}
    write_card(card, card_path)
    logger.info("recalibrated %s: threshold %s (%s), test accuracy %.4f", spec.key, card.threshold, card.threshold_rule,
                card.metrics["accuracy"])


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
    fitted = fit_and_score(spec, split, args, runtime, arch, weights)
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
            "epochs_run": len(history.epochs),
            "best_epoch": history.best_epoch,
            "history": history.epochs,
            "seconds": round(time.time() - started),
            **provenance,
        },
        sha256="",
        weights_format=f"safetensors, {QUANT_FORMAT} (int8 kernels with fp32 per-output-channel scales)",
        intended_use=INTENDED_USE,
        limitations=list(spec.limitations),
        findings=scored.get("findings", {}),
    )
    card.sha256 = sha256_file(weights)
    write_card(card, weights.with_suffix(".json"))
    m = scored["metrics"]
    logger.info("wrote %s: test accuracy %.4f, balanced %.4f, macro-F1 %.4f, AUC %s", weights, m["accuracy"],
                m["balanced_accuracy"], m["macro_f1"], m["roc_auc"])

