"""Scan -> model tensor and Scan -> display RGB: the one path the app and the trainer share.

The training images are 8-bit grayscale files, so every input is brought to 8-bit
levels first (DICOM after the model's own window), then resized to the model's square
input, repeated to 3 channels and normalised with the spec's mean and std.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from core.imaging import Scan, window_values
from core.tasks import TaskSpec


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


def base_pixels(scan: Scan, spec: TaskSpec) -> np.ndarray:
    """The grayscale image a model sees, at the scan's own size, before resizing.

    For a CT DICOM with a model window in the spec, the Hounsfield values are re-windowed
    with that window (the one the training images were exported in), whatever the viewer
    shows. Every input is then quantised to 8-bit levels, as the training files are.

    Args:
        scan: The read scan.
        spec: The model's spec.

    Returns:
        float32 (H, W) in [0, 1], multiples of 1/255.
    """
    pixels = scan.pixels
    if scan.values is not None and scan.modality == "CT" and spec.ct_window is not None:
        pixels = window_values(scan.values, *spec.ct_window)
    return quantize_8bit(pixels)


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
    pixels = model_pixels(scan, spec)
    return normalize(torch.from_numpy(pixels)[None, None], spec)


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
