"""Class activation maps and overlays: the one place that imports pytorch_grad_cam.

CAM objects register hooks on the shared model, so each request builds its own inside
`with ... as cam:` (hooks released on exit), holds the model's lock for the whole forward
and backward pass, and turns gradients on for its own thread (grad mode is per thread, and
Streamlit may call from a thread that runs under inference mode).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

from core.models import Classifier, resolve_layer

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("Grad-CAM", "Grad-CAM++", "HiResCAM", "XGradCAM", "LayerCAM", "EigenCAM")
DEFAULT_METHOD = "Grad-CAM"

COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "hot": cv2.COLORMAP_HOT,
}


def _cam_class(method: str) -> type:
    import pytorch_grad_cam as pgc

    classes = {
        "Grad-CAM": pgc.GradCAM,
        "Grad-CAM++": pgc.GradCAMPlusPlus,
        "HiResCAM": pgc.HiResCAM,
        "XGradCAM": pgc.XGradCAM,
        "LayerCAM": pgc.LayerCAM,
        "EigenCAM": pgc.EigenCAM,
    }
    return classes[method]


def compute_cam(classifier: Classifier, tensor: torch.Tensor, class_index: int, method: str = DEFAULT_METHOD) -> np.ndarray:
    """Heatmap of the evidence for one class.

    Args:
        classifier: A loaded model.
        tensor: Normalised model input, float32 (1, 3, S, S).
        class_index: Output class to explain (0 <= index < number of classes).
        method: One of `METHODS`.

    Returns:
        float32 (S, S) in [0, 1], normalised per image (1 = the strongest evidence in this
        image, not an absolute scale). All zeros when the method finds no positive evidence.

    Raises:
        ValueError: For an unknown method, a class index out of range, or a wrong tensor shape.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; one of {', '.join(METHODS)}")
    n_classes = classifier.spec.num_classes
    # BaseCAM.__exit__ swallows IndexError, so an out-of-range class must be caught here.
    if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)) or not 0 <= class_index < n_classes:
        raise ValueError(f"class index {class_index!r} out of range for {classifier.spec.key} ({n_classes} classes)")
    size = classifier.spec.input_size
    if tuple(tensor.shape) != (1, 3, size, size):
        raise ValueError(f"tensor must be (1, 3, {size}, {size}), got {tuple(tensor.shape)}")
    layer = resolve_layer(classifier.module, classifier.spec.cam_layer)
    cam_class = _cam_class(method)
    with classifier.lock, torch.inference_mode(False), torch.enable_grad():
        with cam_class(model=classifier.module, target_layers=[layer]) as cam:
            heatmap = cam(input_tensor=tensor.clone(), targets=[ClassifierOutputTarget(int(class_index))])
    heatmap = np.nan_to_num(np.asarray(heatmap[0], dtype=np.float32), nan=0.0)
    return np.clip(heatmap, 0.0, 1.0)


def overlay(rgb: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4, colormap: str = "jet", threshold: float = 0.0) -> np.ndarray:
    """Blend a heatmap over an image; weak activations below `threshold` stay unblended.

    Args:
        rgb: uint8 (H, W, 3) display image.
        heatmap: float (h, w) in [0, 1]; resized to (H, W).
        opacity: Heatmap weight in [0, 1].
        colormap: One of `COLORMAPS`.
        threshold: Activations below this (in [0, 1]) are not coloured.

    Returns:
        uint8 (H, W, 3).

    Raises:
        ValueError: On an unknown colormap or out-of-range parameters.
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; one of {', '.join(COLORMAPS)}")
    if not 0.0 <= opacity <= 1.0 or not 0.0 <= threshold <= 1.0:
        raise ValueError("opacity and threshold must lie in [0, 1]")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    resized = cv2.resize(np.asarray(heatmap, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    resized = np.clip(resized, 0.0, 1.0)
    colored = cv2.applyColorMap(np.round(resized * 255).astype(np.uint8), COLORMAPS[colormap])
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = np.where(resized >= threshold, opacity, 0.0)[..., None] if threshold > 0 else np.full((height, width, 1), opacity)
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colored * alpha
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
