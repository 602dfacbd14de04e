"""Labelled image folders, near-duplicate groups, group-aware splits, sampling, augmentation.

A data folder holds `manifest.csv` (columns `path,label`, optional `split`, `patient`, and
one 0/1 column per finding of a multi-label model; paths relative to the folder) or one subfolder per class. Images are read with the same
`core.imaging.read_scan` the app uses.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from core.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES, read_scan
from core.preprocess import EvalPreset, TrainPreset, apply_steps, eight_bit, resize_square
from core.tasks import TaskSpec

logger = logging.getLogger(__name__)

HASH_THRESHOLD = 10
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One labelled image: absolute path, path relative to the data folder, label, patient,
    the manifest's own `split` value where it has one (e.g. an official train/test), and its
    other manifest columns as (name, value) pairs (finding columns among them)."""

    path: Path
    rel: str
    label: str
    patient: str | None = None
    split: str | None = None
    columns: tuple[tuple[str, str], ...] = ()


def read_records(root: Path) -> list[Record]:
    """List the labelled images of a data folder.

    Args:
        root: Folder with `manifest.csv` or class subfolders.

    Returns:
        Records in manifest order (or sorted path order for class folders).

    Raises:
        ValueError: If the folder is missing, the manifest lacks `path`/`label`, or no
            image is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    manifest = root / "manifest.csv"
    records: list[Record] = []
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            if not {"path", "label"} <= columns:
                raise ValueError(f"{manifest} needs columns path,label; it has {', '.join(sorted(columns))}")
            extra = sorted(columns - {"path", "label", "patient", "split"})
            for row in reader:
                patient = (row.get("patient") or "").strip() or None
                split = (row.get("split") or "").strip() or None
                values = tuple((name, (row.get(name) or "").strip()) for name in extra)
                records.append(Record(root / row["path"], row["path"], row["label"].strip(), patient, split, values))
    else:
        suffixes = IMAGE_SUFFIXES + DICOM_SUFFIXES
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in suffixes:
                    records.append(Record(path, str(path.relative_to(root)), class_dir.name))
    if not records:
        raise ValueError(f"no labelled images found in {root} (expected manifest.csv or class subfolders)")
    return records


def check_labels(records: list[Record], spec: TaskSpec) -> None:
    """Raise ValueError naming any label the model does not know."""
    unknown = sorted({r.label for r in records} - set(spec.labels))
    if unknown:
        raise ValueError(
            f"labels {', '.join(map(repr, unknown))} are not classes of {spec.key}; its classes are {', '.join(spec.labels)}"
        )


def finding_targets(records: list[Record], spec: TaskSpec) -> np.ndarray:
    """The 0/1 finding columns of a multi-label model, float32 (N, F); (N, 0) for a model without findings.

    Raises:
        ValueError: If a finding column is missing or holds anything but 0 or 1.
    """
    out = np.zeros((len(records), len(spec.findings)), dtype=np.float32)
    for i, record in enumerate(records):
        values = dict(record.columns)
        for j, name in enumerate(spec.findings):
            value = values.get(name)
            if value not in ("0", "1"):
                where = f"column {name!r} missing" if value is None else f"{name}={value!r}"
                raise ValueError(f"{record.rel}: {spec.key} needs a 0/1 value for each finding ({where})")
            out[i, j] = float(value)
    return out


# ---------------------------------------------------------------- near-duplicates


def difference_hash(pixels: np.ndarray) -> np.ndarray:
    """256-bit difference hash of a grayscale image (17 x 16 grid, left-right gradients).

    Robust to resizing and to monotonic brightness/contrast changes.

    Args:
        pixels: float (H, W) in [0, 1].

    Returns:
        uint8 array of 32 bytes (the packed bits).
    """
    small = cv2.resize(np.asarray(pixels, dtype=np.float32), (17, 16), interpolation=cv2.INTER_AREA)
    return np.packbits(small[:, 1:] > small[:, :-1])


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed hashes a (n, 32) and b (m, 32) -> (n, m)."""
    a64, b64 = np.ascontiguousarray(a).view(np.uint64), np.ascontiguousarray(b).view(np.uint64)
    xor = a64[:, None, :] ^ b64[None, :, :]
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(xor).sum(axis=2, dtype=np.int32)
    return _POPCOUNT[xor.view(np.uint8)].sum(axis=2, dtype=np.int32)


class _Components:
    """Union-find over 0..n-1: join pairs, then read connected-component labels."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        """int64 component id per element, numbered 0..G-1."""
        roots = np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
        return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def near_duplicate_groups(hashes: np.ndarray, mirrored: np.ndarray, threshold: int = HASH_THRESHOLD) -> np.ndarray:
    """Group images whose hashes (or one's mirror image) lie within `threshold` bits.

    Args:
        hashes: uint8 (N, 32) packed difference hashes.
        mirrored: uint8 (N, 32) hashes of the horizontally mirrored images.
        threshold: Largest Hamming distance counted as a near-duplicate.

    Returns:
        int64 (N,) group id per image (connected components; ids are 0..G-1).
    """
    components = _Components(len(hashes))
    chunk = 256
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        close = (_hamming(block, hashes) <= threshold) | (_hamming(block, mirrored) <= threshold)
        for i, j in zip(*np.nonzero(close)):
            components.join(start + int(i), int(j))
    return components.labels()


def hash_images(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Difference hashes (N, 32) of images and of their mirror images, for `near_duplicate_groups`."""
    hashes = np.stack([difference_hash(img) for img in images])
    mirrored = np.stack([difference_hash(img[:, ::-1]) for img in images])
    return hashes, mirrored


def audit_near_duplicates(records: list[Record], images: list[np.ndarray], sides: list[str | None] | None = None,
                          threshold: int = HASH_THRESHOLD) -> dict:
    """How a dataset's near-duplicates fall: groups, groups mixing labels, and leaks across a split.

    Args:
        records: The labelled images.
        images: Their pixels (H, W), uint8 or float in [0, 1].
        sides: Optional split side per record ("train" and anything else); an image on a
            non-train side leaks when its near-duplicate group holds a train image.
        threshold: Largest Hamming distance (of 256 bits) counted as a near-duplicate.

    Returns:
        A JSON-ready dict: images, groups, grouped_images, largest_group, groups_mixing_labels,
        images_in_mixed_groups and, with sides, per non-train side: images, with_train_duplicate.
    """
    near_dup = near_duplicate_groups(*hash_images(images), threshold=threshold)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(near_dup):
        members[int(g)].append(i)
    multi = [idx for idx in members.values() if len(idx) > 1]
    mixed = [idx for idx in multi if len({records[i].label for i in idx}) > 1]
    audit: dict = {
        "images": len(records), "groups": len(members), "grouped_images": sum(map(len, multi)),
        "groups_of_two_or_more": len(multi), "largest_group": max(map(len, members.values()), default=0),
        "groups_mixing_labels": len(mixed), "images_in_mixed_groups": sum(map(len, mixed)), "threshold": threshold,
    }
    if sides is not None:
        train_groups = {int(near_dup[i]) for i, side in enumerate(sides) if side == "train"}
        leaks: dict[str, dict[str, int]] = {}
        for i, side in enumerate(sides):
            if side in (None, "train"):
                continue
            entry = leaks.setdefault(str(side), {"images": 0, "with_train_duplicate": 0})
            entry["images"] += 1
            entry["with_train_duplicate"] += int(near_dup[i]) in train_groups
        audit["sides"] = dict(sorted(leaks.items()))
    return audit


def split_groups(records: list[Record], near_dup: np.ndarray) -> np.ndarray:
    """Final split groups: near-duplicate groups merged with patients where known.

    Returns:
        int64 (N,) group id per record.
    """
    components = _Components(len(records))
    first_of: dict[tuple[str, object], int] = {}
    for i, record in enumerate(records):
        keys = [("dup", int(near_dup[i]))] + ([("patient", record.patient)] if record.patient else [])
        for key in keys:
            components.join(i, first_of.setdefault(key, i))
    return components.labels()


def group_records(records: list[Record], images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(near-duplicate group, split group) per record: the grouping every split of the project uses."""
    near_dup = near_duplicate_groups(*hash_images(images))
    return near_dup, split_groups(records, near_dup)


STRATIFY = ("majority", "positive")


def stratified_group_split(
    labels: list[str], groups: np.ndarray, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0,
    stratify: str = "majority", positive: str | None = None,
) -> np.ndarray:
    """Assign whole groups to train/val/test, stratified by each group's majority label.

    Args:
        labels: Label per record.
        groups: Group id per record; a group never straddles two splits.
        val_frac: Share of each label's groups (by image count) for validation.
        test_frac: Share for test.
        seed: Shuffle seed.
        stratify: "majority" (a group counts under its commonest label) or "positive" (a group
            with any `positive` image counts under `positive`: for patients with a few positive
            slices among many normal ones, so that each side gets its share of positive patients).
        positive: The positive label, for stratify="positive".

    Returns:
        Array of "train" / "val" / "test", one per record.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    by_label: dict[str, list[int]] = defaultdict(list)
    if stratify not in STRATIFY or (stratify == "positive" and positive is None):
        raise ValueError(f"stratify must be one of {STRATIFY} (positive needs a positive label), got {stratify!r}")
    for g, idx in members.items():
        majority = Counter(labels[i] for i in idx).most_common(1)[0][0]
        if stratify == "positive" and any(labels[i] == positive for i in idx):
            majority = positive
        by_label[majority].append(g)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=object)
    for label in sorted(by_label):
        group_ids = sorted(by_label[label])
        rng.shuffle(group_ids)
        total = sum(len(members[g]) for g in group_ids)
        done = 0
        for g in group_ids:
            share = done / max(total, 1)
            split = "test" if share < test_frac else "val" if share < test_frac + val_frac else "train"
            for i in members[g]:
                assignment[i] = split
            done += len(members[g])
    return assignment


def split_audit(records: list[Record], groups: np.ndarray, near_dup: np.ndarray, splits: np.ndarray) -> dict:
    """Facts about a split for the card: sizes, groups, leaks across splits (should be 0)."""
    audit: dict = {"images": len(records), "near_duplicate_groups": int(near_dup.max()) + 1 if len(near_dup) else 0}
    audit["split_groups"] = int(groups.max()) + 1 if len(groups) else 0
    label_sets: dict[int, set[str]] = defaultdict(set)
    split_sets: dict[int, set[str]] = defaultdict(set)
    for i, record in enumerate(records):
        label_sets[int(near_dup[i])].add(record.label)
        split_sets[int(near_dup[i])].add(str(splits[i]))
    audit["near_duplicate_groups_mixing_labels"] = sum(len(s) > 1 for s in label_sets.values())
    audit["near_duplicate_groups_across_splits"] = sum(len(s) > 1 for s in split_sets.values())
    patients: dict[str, set[str]] = defaultdict(set)
    for i, record in enumerate(records):
        if record.patient:
            patients[record.patient].add(str(splits[i]))
    if patients:
        audit["patients"] = len(patients)
        audit["patients_across_splits"] = sum(len(s) > 1 for s in patients.values())
        labels_of: dict[str, set[str]] = defaultdict(set)
        for record in records:
            if record.patient:
                labels_of[record.patient].add(record.label)
        # per side: patients, and patients with at least one image of each label
        audit["patients_per_split"] = {
            split: {"patients": sum(split in s for s in patients.values()),
                    **{f"with {label}": sum(split in patients[p] and label in labels_of[p] for p in patients)
                       for label in sorted({r.label for r in records})}}
            for split in SPLITS
        }
    audit["counts"] = {
        split: dict(sorted(Counter(r.label for r, s in zip(records, splits) if s == split).items())) for split in SPLITS
    }
    return audit


def carve_split(
    records: list[Record], images: list[np.ndarray], val_frac: float, test_frac: float, seed: int,
    stratify: str = "majority", positive: str | None = None,
) -> tuple[np.ndarray, dict, str]:
    """The project's split: near-duplicate groups (merged with patients), stratified by group.

    Args:
        records: The labelled images.
        images: Their 8-bit pixels (uint8, H x W), as from `load_pixels` before the preprocessing steps.
        val_frac: Validation share per class.
        test_frac: Test share per class.
        seed: Shuffle seed.
        stratify: How a group is counted for stratification (see `stratified_group_split`).
        positive: The positive label, for stratify="positive".

    Returns:
        (side per record, audit dict for the card, one-line description of the method).
    """
    near_dup, groups = group_records(records, images)
    sides = stratified_group_split([r.label for r in records], groups, val_frac, test_frac, seed, stratify, positive)
    audit = split_audit(records, groups, near_dup, sides)
    patients = " merged with patients" if any(r.patient for r in records) else ""
    counted = f"; a group with any {positive} image counts as {positive}" if stratify == "positive" else ""
    method = (
        f"stratified group split (seed {seed}; {val_frac:.0%} val, {test_frac:.0%} test by image count per class{counted}); "
        f"groups = near-duplicates (256-bit difference hash, Hamming <= {HASH_THRESHOLD}, mirrored copies included)"
        f"{patients}"
    )
    return sides, audit, method


def sample_records(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    """The first-N subset used by `--limit` (a seeded sample, identical in train and evaluate)."""
    if not limit:
        return records
    return random.Random(seed).sample(records, min(limit, len(records)))


def recorded_split(
    records: list[Record], spec: TaskSpec, config: dict, preprocess: bool = True
) -> tuple[list[Record], list[np.ndarray], np.ndarray]:
    """Re-carve the split a card's training config recorded (seed, val_frac, test_frac, limit).

    Args:
        records: The folder's records.
        spec: The model's spec.
        config: The card's training config.
        preprocess: False: return the pixels before the spec's preprocessing steps (as the split
            grouped them; `preprocess_pixels` gives the model pixels from them without reading again).

    Returns:
        (records used, their 8-bit pixels, side per record).

    Raises:
        ValueError: If the config lacks the split settings.
    """
    try:
        seed, val_frac, test_frac = int(config["seed"]), float(config["val_frac"]), float(config["test_frac"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the model card does not record its split settings (seed, val_frac, test_frac)") from None
    records = sample_records(records, config.get("limit"), seed)
    raw, images = split_pixels(records, spec)
    sides, _, _ = carve_split(records, raw, val_frac, test_frac, seed, config.get("stratify", "majority"), spec.positive)
    return records, images if preprocess else raw, sides


# ---------------------------------------------------------------- loading and augmentation


def load_pixels(records: list[Record], spec: TaskSpec, preprocess: bool = True) -> list[np.ndarray]:
    """Read every record through `read_scan` and keep its 8-bit model pixels (uint8, H x W).

    Args:
        records: The images to read.
        spec: The model's spec (window, preprocessing).
        preprocess: False: stop before the spec's preprocessing steps (for grouping near-duplicates,
            which must not depend on them; `preprocess_pixels` finishes the job).

    Raises:
        ValueError: Naming the first file that cannot be read.
    """
    images = []
    for record in records:
        try:
            scan = read_scan(record.path.read_bytes(), record.path.name)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read training image {record.rel}: {exc}") from None
        image = eight_bit(scan, spec)
        images.append(apply_steps(image, spec.preprocessing)[0] if preprocess else image)
    return images


def preprocess_pixels(images: list[np.ndarray], spec: TaskSpec) -> list[np.ndarray]:
    """The spec's preprocessing steps applied to pixels read with `load_pixels(..., preprocess=False)`."""
    return [apply_steps(image, spec.preprocessing)[0] for image in images] if spec.preprocessing else images


def split_pixels(records: list[Record], spec: TaskSpec) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(pixels before the preprocessing steps, for grouping near-duplicates; model pixels), both uint8 (H, W)."""
    raw = load_pixels(records, spec, preprocess=False)
    return raw, preprocess_pixels(raw, spec)


class ScanDataset(Dataset):
    """In-memory 8-bit images (after the registry's steps) -> (float tensor (1, S, S) in [0, 1], label index, findings (F,)).

    Training items come from `core.preprocess.TrainPreset` (augmented), the others from
    `EvalPreset.grey`. Unnormalised on purpose: the presets normalise the batch, on the device.
    `findings` holds the 0/1 finding targets (N, F) of a multi-label model; without it each
    item's findings tensor is empty.
    """

    def __init__(self, images: list[np.ndarray], targets: list[int], spec: TaskSpec, train: bool, seed: int = 0,
                 findings: np.ndarray | None = None):
        self.images = images
        self.targets = targets
        self.findings = np.zeros((len(images), 0), np.float32) if findings is None else np.asarray(findings, np.float32)
        if len(self.findings) != len(images):
            raise ValueError(f"{len(self.findings)} finding rows for {len(images)} images")
        self.spec = spec
        self.train = train
        self.train_preset, self.eval_preset = TrainPreset(spec), EvalPreset(spec)
        self.seed = seed
        self.epoch = 0
        self.size = spec.input_size  # training side of this epoch (progressive resizing); evaluation stays at input_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        if self.train:
            pixels = self.train_preset(self.images[index], np.random.default_rng((self.seed, self.epoch, index)), self.size)
        elif self.size == self.spec.input_size:
            pixels = self.eval_preset.grey(self.images[index])
        else:  # evaluation at another side: the same resize, to that side
            pixels = resize_square(self.images[index].astype(np.float32) / 255.0, self.size)
        return torch.from_numpy(np.ascontiguousarray(pixels))[None], self.targets[index], torch.from_numpy(self.findings[index])


def mix_batch(images: torch.Tensor, targets: torch.Tensor, findings: torch.Tensor, num_classes: int,
              rng: np.random.Generator, mixup: float, cutmix: float, prob: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of a batch with itself reversed (Zhang et al. 2018; Yun et al. 2019).

    With probability `prob` the batch is mixed: by mixup (a weighted average of two images) or
    cutmix (a box of the other image pasted in), chosen evenly when both are on, with the
    weight drawn from Beta(alpha, alpha); the class targets become the same mixture of the two
    one-hot labels, and the finding targets too.

    Args:
        images: float (N, 1, S, S) in [0, 1].
        targets: int (N,) class indices.
        findings: float (N, F) 0/1 finding targets.
        num_classes: Number of classes.
        rng: Random generator (seeded per epoch by the caller, so a resumed run draws the same).
        mixup: Alpha of mixup (0: off).
        cutmix: Alpha of cutmix (0: off).
        prob: Share of batches mixed.

    Returns:
        (images, class target probabilities (N, C), finding targets (N, F)); unmixed batches
        come back with one-hot targets.
    """
    soft = torch.nn.functional.one_hot(targets, num_classes).float()
    kinds = [kind for kind, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not kinds or rng.random() >= prob or len(images) < 2:
        return images, soft, findings.float()
    kind = kinds[int(rng.integers(len(kinds)))]
    lam = float(rng.beta(mixup if kind == "mixup" else cutmix, mixup if kind == "mixup" else cutmix))
    other = torch.arange(len(images) - 1, -1, -1)
    if kind == "mixup":
        mixed = lam * images + (1.0 - lam) * images[other]
    else:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1.0 - lam)), int(width * math.sqrt(1.0 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images[other][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)  # the share actually kept
    return mixed, lam * soft + (1.0 - lam) * soft[other], lam * findings.float() + (1.0 - lam) * findings[other].float()


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Draws every class equally often (weights 1 / class count, with replacement), sharded by rank.

    Every rank draws the same sequence from a generator seeded with (seed, epoch) and keeps
    every `world_size`-th index from its `rank`, so the ranks of a distributed run see disjoint
    shares of one balanced epoch; one process (rank 0 of 1) sees all of it. Call `set_epoch`
    before each epoch for a fresh draw.
    """

    def __init__(self, targets: list[int], seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        counts = Counter(targets)
        self.weights = torch.tensor([1.0 / counts[t] for t in targets], dtype=torch.double)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.per_rank = math.ceil(len(targets) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=generator)
        return iter(drawn[self.rank::self.world_size].tolist())
