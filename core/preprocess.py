"""Scan -> model tensor and Scan -> display RGB: the one path the app and the trainer share.

The training images are 8-bit grayscale files, so every input is brought to 8-bit
levels first (DICOM after the model's own window), then through the spec's preprocessing
steps (border crop, CLAHE), then resized to the model's square input, repeated to 3 channels
and normalised with the spec's mean and std.
"""

from __future__ import annotations

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


def quantize_8bit(pixels: np.ndarray) -> np.ndarray:
    """Round [0, 1] floats to the 256 levels of an 8-bit file.

    Args:
        pixels: float array (H, W) in [0, 1].

    Returns:
        float32 (H, W) in [0, 1], multiples of 1/255.
    """
    _check_unit_range(pixels, "pixels")
    return (np.round(pixels * 255.0) / 255.0).astype(np.float32)


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


def preprocess_8bit(image: np.ndarray, steps: tuple[str, ...]) -> np.ndarray:
    """Apply preprocessing steps in order to uint8 (H, W); returns uint8 (h, w) (the input if no steps).

    Raises:
        ValueError: On an unknown step or a non-uint8 / non-2-D input.
    """
    return _run_steps(image, steps)[0]


def _run_steps(image: np.ndarray, steps: tuple[str, ...]) -> tuple[np.ndarray, Box]:
    """`preprocess_8bit`, and the region of the input the result covers."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"preprocessing needs uint8 (H, W), got {image.dtype} {image.shape}")
    top, bottom, left, right = 0, image.shape[0], 0, image.shape[1]
    for step in steps:
        if step not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing step {step!r}; one of {', '.join(PREPROCESSING)}")
        if step in CROPS:
            t, b, l, r = CROPS[step](image)
            image = image[t:b, l:r]
            top, left = top + t, left + l
            bottom, right = top + (b - t), left + (r - l)
        else:
            image = PREPROCESSING[step](image)
    return image, (top, bottom, left, right)


def steps_region(image: np.ndarray, steps: tuple[str, ...]) -> Box:
    """The region of uint8 (H, W) that `preprocess_8bit(image, steps)` keeps: (top, bottom, left, right)."""
    return _run_steps(image, steps)[1]


def _quantized(scan: Scan, spec: TaskSpec) -> np.ndarray:
    pixels = scan.pixels
    if scan.values is not None and scan.modality == "CT" and spec.ct_window is not None:
        pixels = window_values(scan.values, *spec.ct_window)
    return quantize_8bit(pixels)


def model_region(scan: Scan, spec: TaskSpec) -> Box:
    """The region of the scan (top, bottom, left, right in its pixels) that the model input covers:
    the whole scan unless a preprocessing step crops it. Heatmaps belong in this region."""
    if not spec.preprocessing:
        return 0, scan.shape[0], 0, scan.shape[1]
    return steps_region(np.round(_quantized(scan, spec) * 255.0).astype(np.uint8), spec.preprocessing)


def base_pixels(scan: Scan, spec: TaskSpec) -> np.ndarray:
    """The grayscale image a model sees, at the scan's own size, before resizing.

    For a CT DICOM with a model window in the spec, the Hounsfield values are re-windowed
    with that window (the one the training images were exported in), whatever the viewer
    shows. Every input is then quantised to 8-bit levels, as the training files are, and
    goes through the spec's preprocessing steps (which may crop it).

    Args:
        scan: The read scan.
        spec: The model's spec.

    Returns:
        float32 (h, w) in [0, 1], multiples of 1/255 (smaller than the scan after a border crop).
    """
    pixels = _quantized(scan, spec)
    if not spec.preprocessing:
        return pixels
    image = preprocess_8bit(np.round(pixels * 255.0).astype(np.uint8), spec.preprocessing)
    return image.astype(np.float32) / 255.0


def model_pixels(scan: Scan, spec: TaskSpec) -> np.ndarray:
    """`base_pixels` resized to the model input: float32 (S, S) in [0, 1]."""
    return resize_square(base_pixels(scan, spec), spec.input_size)


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


def model_input(scan: Scan, spec: TaskSpec) -> torch.Tensor:
    """Scan -> float32 tensor (1, 3, S, S) ready for the model."""
    return pixels_input(model_pixels(scan, spec), spec)


def pixels_input(pixels: np.ndarray, spec: TaskSpec) -> torch.Tensor:
    """Pixels that already went through `base_pixels` (uint8, or float in [0, 1]; any size) -> (1, 3, S, S).

    For images read once with `core.data.load_pixels`: going back through `model_input` would
    apply the preprocessing steps a second time.
    """
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255.0
    if pixels.shape != (spec.input_size, spec.input_size):
        pixels = resize_square(pixels, spec.input_size)
    return normalize(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None], spec)


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
