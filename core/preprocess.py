"""Scan -> `ModelInput` and Scan -> display RGB: the one path the app, the trainer and every tool share.

The training images are 8-bit grayscale files, so every input is brought to 8-bit levels first
(DICOM after the model's own window), then through the spec's preprocessing steps (border crop,
CLAHE) once, then resized to the model's square input, repeated to 3 channels and normalised with
the spec's mean and std. `EvalPreset` does this at inference and evaluation and returns a typed
`ModelInput` (the 8-bit pixels, the region of the scan the model saw, the tensor); `TrainPreset`
adds the training augmentation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from core.imaging import Scan, window_values
from core.tasks import TaskSpec

FLAT_LEVELS = 4  # an edge row or column whose grey levels span at most this many is "flat"
MAX_FLAT_TRIM = 0.25  # at most this share of a side is trimmed as flat edge
BORDER_MARGIN = 0.08  # then this share is cut off each side
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)


def _check_unit_range(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {array.shape}")
    if array.size and (float(np.nanmin(array)) < -1e-6 or float(np.nanmax(array)) > 1 + 1e-6):
        raise ValueError(f"{name} must lie in [0, 1], got [{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]")


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to (size, size), area-averaging when shrinking.

    Args:
        pixels: float32 (H, W) in [0, 1].
        size: Output side in pixels.

    Returns:
        float32 (size, size) in [0, 1].
    """
    _check_unit_range(pixels, "pixels")
    height, width = pixels.shape
    interpolation = cv2.INTER_AREA if size < min(height, width) else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(pixels, dtype=np.float32), (size, size), interpolation=interpolation)
    return np.clip(out, 0.0, 1.0)


def _flat_run(lines: np.ndarray, limit: int) -> int:
    """How many leading rows of `lines` (N, W) are flat (grey levels spanning <= FLAT_LEVELS), up to `limit`."""
    if limit <= 0 or lines.shape[0] == 0 or lines.shape[1] == 0:
        return 0
    done, chunk = 0, 8
    while done < min(limit, lines.shape[0]):  # in growing chunks: most edges stop at the first row
        block = lines[done:min(done + chunk, limit)]
        flat = (block.max(axis=1).astype(np.int16) - block.min(axis=1)) <= FLAT_LEVELS
        if not flat.all():
            return done + int(np.argmin(flat))
        done, chunk = done + flat.size, chunk * 2
    return min(done, limit)


Box = tuple[int, int, int, int]  # (top, bottom, left, right) in pixels, bottom and right exclusive


def border_box(image: np.ndarray) -> Box:
    """The region `border_crop` keeps: flat edges trimmed (up to a quarter of each side), then 8% off each side.

    Rows are judged within the columns kept and columns within the rows kept, alternately, so a
    frame on one side does not hide a frame on the next. An image too small to crop (under
    32 px left on a side) keeps its whole extent.

    Args:
        image: uint8 (H, W).

    Returns:
        (top, bottom, left, right).
    """
    height, width = image.shape
    top, bottom, left, right = 0, height, 0, width
    rows_limit, cols_limit = int(height * MAX_FLAT_TRIM), int(width * MAX_FLAT_TRIM)
    for _ in range(3):
        before = (top, bottom, left, right)
        inner = image[top:bottom, left:right]
        top += _flat_run(inner, rows_limit - top)
        bottom -= _flat_run(inner[::-1], rows_limit - (height - bottom))
        inner = image[top:bottom, left:right]
        left += _flat_run(inner.T, cols_limit - left)
        right -= _flat_run(inner.T[::-1], cols_limit - (width - right))
        if (top, bottom, left, right) == before:
            break
    dy, dx = round((bottom - top) * BORDER_MARGIN), round((right - left) * BORDER_MARGIN)
    top, bottom, left, right = top + dy, bottom - dy, left + dx, right - dx
    if bottom - top < 32 or right - left < 32:
        return 0, height, 0, width
    return top, bottom, left, right


def border_crop(image: np.ndarray) -> np.ndarray:
    """Cut uint8 (H, W) to its `border_box`: black or white frames, collimator edges and most corner markers
    and burnt-in labels go (in pooled chest X-ray collections they tell the source apart). Returns a view."""
    top, bottom, left, right = border_box(image)
    return image[top:bottom, left:right]


def clahe(image: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (clip 2.0, 8 x 8 tiles) of uint8 (H, W) -> uint8 (H, W)."""
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(np.ascontiguousarray(image))


PREPROCESSING = {"border_crop": border_crop, "clahe": clahe}
CROPS = {"border_crop": border_box}  # steps that cut the image, with the region each keeps


# How many times the registry's steps ran, per step name: they must run once per upload (a test reads it).
STEP_RUNS: Counter[str] = Counter()


def eight_bit(scan: Scan, spec: TaskSpec) -> np.ndarray:
    """The scan as the 8-bit grey image the model's training files were, before the registry's steps.

    For a CT DICOM with a model window in the spec, the Hounsfield values are re-windowed with
    that window (the one the training images were exported in), whatever the viewer shows.

    Args:
        scan: The read scan.
        spec: The model's spec (its CT window).

    Returns:
        uint8 (H, W), the scan's own size.
    """
    pixels = scan.pixels
    if scan.values is not None and scan.modality == "CT" and spec.ct_window is not None:
        pixels = window_values(scan.values, *spec.ct_window)
    _check_unit_range(pixels, "pixels")
    if not np.isfinite(pixels).all():  # NaN would pass the range check and reach the model
        raise ValueError("pixels must be finite")
    return np.round(pixels * 255.0).astype(np.uint8)


def apply_steps(image: np.ndarray, steps: tuple[str, ...]) -> tuple[np.ndarray, Box]:
    """The registry's preprocessing steps on uint8 (H, W), in order; and the region of the input the result covers.

    Returns:
        (uint8 (h, w), (top, bottom, left, right) in the input's pixels); the input itself without steps.

    Raises:
        ValueError: On an unknown step or a non-uint8 / non-2-D input.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"preprocessing needs uint8 (H, W), got {image.dtype} {image.shape}")
    top, bottom, left, right = 0, image.shape[0], 0, image.shape[1]
    for step in steps:
        if step not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing step {step!r}; one of {', '.join(PREPROCESSING)}")
        STEP_RUNS[step] += 1
        if step in CROPS:
            t, b, l, r = CROPS[step](image)
            image = image[t:b, l:r]
            top, left = top + t, left + l
            bottom, right = top + (b - t), left + (r - l)
        else:
            image = PREPROCESSING[step](image)
    return image, (top, bottom, left, right)


@dataclass(frozen=True, eq=False)
class ModelInput:
    """A scan prepared for one model: what the model sees, and where on the scan it looked.

    Attributes:
        pixels: uint8 (h, w): the 8-bit image after the model's window and the registry's steps, at the
            scan's resolution (the `region` of it).
        region: (top, bottom, left, right) of the scan the model input covers: the whole scan unless a
            step crops it.
        scan_shape: (H, W) of the scan.
        grey: float32 (S, S) in [0, 1]: `pixels` resized to the model input.
        tensor: float32 (1, 3, S, S): `grey` repeated to three channels and normalised.
    """

    pixels: np.ndarray
    region: Box
    scan_shape: tuple[int, int]
    grey: np.ndarray
    tensor: torch.Tensor

    @property
    def cropped(self) -> bool:
        """Whether the model saw only part of the scan (a preprocessing crop)."""
        return self.region != (0, self.scan_shape[0], 0, self.scan_shape[1])

    def outside(self) -> np.ndarray:
        """bool (H, W): True on scan pixels the model never saw (outside a crop)."""
        top, bottom, left, right = self.region
        mask = np.ones(self.scan_shape, dtype=bool)
        mask[top:bottom, left:right] = False
        return mask

    def place(self, heatmap: np.ndarray) -> np.ndarray:
        """A map over the model input (any size) put where the model looked on the scan.

        Args:
            heatmap: float (h, w) in [0, 1], over the model input.

        Returns:
            float32 (H, W) in [0, 1], the scan's size; 0 outside the region the model saw.
        """
        top, bottom, left, right = self.region
        out = np.zeros(self.scan_shape, dtype=np.float32)
        out[top:bottom, left:right] = cv2.resize(np.asarray(heatmap, dtype=np.float32), (right - left, bottom - top),
                                                 interpolation=cv2.INTER_LINEAR)
        return np.clip(out, 0.0, 1.0)


class EvalPreset:
    """How a model's input is made at inference and evaluation (torchvision's `Weights.transforms()` in spirit).

    scan -> 8-bit grey in the model's window -> the registry's steps (once) -> resized to S x S ->
    repeated to three channels -> normalised with the spec's mean and std. The app, the command
    lines, the API, the study reader, evaluation, the audits and guard fitting all use it.
    """

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def __call__(self, scan: Scan) -> ModelInput:
        """Scan -> `ModelInput`; the steps run exactly once."""
        pixels, region = apply_steps(eight_bit(scan, self.spec), self.spec.preprocessing)
        return self.from_pixels(pixels, region, scan.shape)

    def from_pixels(self, pixels: np.ndarray, region: Box | None = None,
                    scan_shape: tuple[int, int] | None = None) -> ModelInput:
        """A `ModelInput` from 8-bit pixels that already went through the steps (training files read once).

        Args:
            pixels: uint8 (h, w) after the steps.
            region: Where they lie on the scan (default: they are the whole scan).
            scan_shape: (H, W) of the scan (default: the pixels' own shape).
        """
        if pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise ValueError(f"pixels must be uint8 (H, W), got {pixels.dtype} {pixels.shape}")
        shape = scan_shape or pixels.shape
        grey = self.grey(pixels)
        return ModelInput(pixels, region or (0, shape[0], 0, shape[1]), shape, grey, self.tensor(grey[None]))

    def grey(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (h, w) after the steps -> float32 (S, S) in [0, 1]."""
        return resize_square(pixels.astype(np.float32) / 255.0, self.spec.input_size)

    def tensor(self, greys: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float (N, S, S) in [0, 1] -> normalised float32 (N, 3, S, S)."""
        batch = torch.as_tensor(np.ascontiguousarray(greys, dtype=np.float32) if isinstance(greys, np.ndarray) else greys)
        return normalize(batch[:, None], self.spec)


class TrainPreset:
    """How a model's input is made for training: `EvalPreset`'s pixels with random augmentation.

    Training images are read once through `eight_bit` and `apply_steps` (the same path as the
    app); each draw warps them straight to the model input (`augment`). The stability check
    (test-time augmentation) draws its views from the same augmentation, at model resolution.
    """

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        """uint8 or float [0, 1] (h, w) -> float32 (size, size) in [0, 1], augmented (size: default S)."""
        grey = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else np.asarray(pixels, np.float32)
        return augment(grey, size or self.spec.input_size, rng, self.spec.hflip)


def augment(pixels: np.ndarray, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    """Random geometric and intensity augmentation suited to grayscale medical slices.

    Small rotations (+-10 deg), scales (0.9-1.1) and shifts (+-6%), an optional mirror,
    then contrast, brightness and gamma jitter. The warp also resizes to the model input.

    Args:
        pixels: float32 (H, W) in [0, 1].
        size: Output side.
        rng: Random generator.
        hflip: Whether mirroring is allowed.

    Returns:
        float32 (size, size) in [0, 1].
    """
    height, width = pixels.shape
    angle = rng.uniform(-10.0, 10.0)
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.06, 0.06, size=2) * size
    sx, sy = size / width, size / height
    to_output = np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])
    centre = size / 2.0
    rotation = cv2.getRotationMatrix2D((centre, centre), angle, scale)
    rotation[:, 2] += shift
    matrix = (np.vstack([rotation, [0.0, 0.0, 1.0]]) @ to_output)[:2]
    if hflip and rng.random() < 0.5:
        flip = np.array([[-1.0, 0.0, size], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        matrix = (flip @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    out = cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.08, 0.08)
    out = np.clip((out - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    gamma = math.exp(rng.uniform(-0.2, 0.2))
    return np.power(out, gamma, dtype=np.float32)


def normalize(batch: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Grayscale batch -> normalised 3-channel model input.

    Args:
        batch: float tensor (N, 1, S, S) in [0, 1], on any device.
        spec: The model's spec (mean, std).

    Returns:
        float32 tensor (N, 3, S, S) on the same device.

    Raises:
        ValueError: On a wrong shape or values outside [0, 1].
    """
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ValueError(f"batch must be (N, 1, S, S), got {tuple(batch.shape)}")
    if batch.numel() and (float(batch.min()) < -1e-6 or float(batch.max()) > 1 + 1e-6):
        raise ValueError("batch values must lie in [0, 1]")
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().expand(-1, 3, -1, -1) - mean) / std


def display_rgb(scan: Scan, window: tuple[float, float] | None = None) -> np.ndarray:
    """The image as shown to the reader.

    Args:
        scan: The read scan.
        window: Optional (centre, width) for DICOM values; the viewer's own window, which
            never changes the model input.

    Returns:
        uint8 array (H, W, 3).
    """
    pixels = scan.pixels
    if window is not None and scan.values is not None:
        pixels = window_values(scan.values, *window)
        if scan.info.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = 1.0 - pixels
    gray = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
