"""Class activation maps and overlays: the one place that imports pytorch_grad_cam.

CAM objects register hooks on the model they explain, so each request builds its own inside
`with ... as cam:` (hooks released on exit), on a replica of its own from the model's runner
(`core.models.Runner.gradients`) for the whole forward
and backward pass, and turns gradients on for its own thread (grad mode is per thread, and
Streamlit may call from a thread that runs under inference mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from core.decision import card_probabilities
from core.models import Classifier, resolve_layer
from core.tasks import TaskSpec

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


# Methods whose map does not depend on the class asked for (EigenCAM: the first principal component
# of the layer's activations): the page says so instead of naming a class.
CLASS_INDEPENDENT: frozenset[str] = frozenset({"EigenCAM"})


def cam_layers(classifier: Classifier) -> tuple[str, ...]:
    """The layers a model's heatmaps are computed on: the card's measured choice (`explanations.cam_layers`,
    `core.lab.appraisal`), else the backbone's finer block fused with the registry's CAM layer (14 x 14: the
    last block alone, 7 x 7, gave empty Grad-CAM maps for a third of head CT outputs), else the CAM layer."""
    explanations = classifier.card.explanations
    chosen = explanations.cam_layers.get("chosen") if explanations is not None else None
    if chosen:
        return tuple(chosen)
    fine = classifier.spec.backbone.fine_cam_layer
    return (fine, classifier.spec.cam_layer) if fine else (classifier.spec.cam_layer,)


def body_mask(grey: np.ndarray) -> np.ndarray:
    """Where the body (head, chest) is in a model input: float32 (S, S), 1 inside, 0 outside, soft at the edge.

    The outside of a scan is near-black air, the table, corners and the frame. The mask is the convex
    hull of the large, bulky connected regions above a low threshold (a third of Otsu's; at least a
    tenth of the largest, once speckle is closed and thin bridges are opened; long thin ones such as a
    CT table are not the body), dilated by 1.5% of the side so skin and skull stay in, and blurred.
    Where that region covers less than a tenth of the image (no clear body), nothing is masked.

    Args:
        grey: float (S, S) in [0, 1]: the model input's grey image.
    """
    size = grey.shape[0]
    image = cv2.GaussianBlur(np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8), (5, 5), 0)
    otsu, _ = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    foreground = (image > max(otsu / 3.0, 8.0)).astype(np.uint8)
    # A closing joins a speckled body (a noisy soft-tissue window); an opening a few percent of the side wide
    # then cuts thin structures and bridges (a CT table, a cable, text) off it.
    width = 2 * max(1, round(0.015 * size)) + 1
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count <= 1:
        return np.ones(grey.shape, dtype=np.float32)
    areas = stats[1:, cv2.CC_STAT_AREA]
    # mean thickness along the longer side: a table or a line is long and thin, a body is not
    thickness = areas / np.maximum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT])
    bulky = thickness >= 0.05 * size
    if not bulky.any():
        return np.ones(grey.shape, dtype=np.float32)
    kept = 1 + np.flatnonzero(bulky & (areas >= 0.1 * areas[bulky].max()))  # the body, in pieces where it breaks up
    # Its convex hull: lungs and ventricles lie inside the body even where they are darker than the
    # threshold, and a thin chest wall that breaks the ring must not let the lungs out.
    points = cv2.findNonZero(np.isin(labels, kept).astype(np.uint8))
    body = np.zeros(grey.shape, dtype=np.uint8)
    cv2.fillConvexPoly(body, cv2.convexHull(points), 1)
    if body.mean() < 0.1:
        return np.ones(grey.shape, dtype=np.float32)
    grow = max(1, round(0.015 * size))
    body = cv2.dilate(body, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    return np.clip(cv2.GaussianBlur(body.astype(np.float32), (0, 0), grow / 2.0), 0.0, 1.0)


def input_grey(tensor: torch.Tensor, spec: TaskSpec) -> np.ndarray:
    """The grey image (S, S) in [0, 1] a normalised model input (1, 3, S, S) was made from."""
    return np.clip(tensor[0, 0].detach().cpu().numpy().astype(np.float32) * spec.std[0] + spec.mean[0], 0.0, 1.0)


def compute_cam(classifier: Classifier, tensor: torch.Tensor, class_index: int, method: str = DEFAULT_METHOD,
                layers: tuple[str, ...] | None = None, suppress_background: bool = True) -> np.ndarray:
    """Heatmap of the evidence for one output.

    Args:
        classifier: A loaded model.
        tensor: Normalised model input, float32 (1, 3, S, S).
        class_index: Output to explain: a class, or a finding of a multi-label model
            (0 <= index < `spec.num_outputs`; findings follow the classes).
        method: One of `METHODS`.
        layers: Layers to compute it on (several: each map normalised, then averaged, as pytorch-grad-cam
            does); default `cam_layers(classifier)`.
        suppress_background: Multiply by `body_mask` of the input (air, table and corners outside the
            body carry no finding), then renormalise.

    Returns:
        float32 (S, S) in [0, 1], normalised per image (1 = the strongest evidence in this
        image, not an absolute scale). All zeros when the method finds no positive evidence.

    Raises:
        ValueError: For an unknown method, a class index out of range, or a wrong tensor shape.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; one of {', '.join(METHODS)}")
    n_outputs = classifier.spec.num_outputs
    # BaseCAM.__exit__ swallows IndexError, so an out-of-range class must be caught here.
    if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)) or not 0 <= class_index < n_outputs:
        raise ValueError(f"output index {class_index!r} out of range for {classifier.spec.key} ({n_outputs} outputs)")
    size = classifier.spec.input_size
    if tuple(tensor.shape) != (1, 3, size, size):
        raise ValueError(f"tensor must be (1, 3, {size}, {size}), got {tuple(tensor.shape)}")
    cam_class = _cam_class(method)
    names = layers or cam_layers(classifier)
    with classifier.runner.gradients() as module:
        targets = [resolve_layer(module, name) for name in names]
        with cam_class(model=module, target_layers=targets) as cam:
            heatmap = cam(input_tensor=tensor.clone(), targets=[ClassifierOutputTarget(int(class_index))])
    heatmap = np.clip(np.nan_to_num(np.asarray(heatmap[0], dtype=np.float32), nan=0.0), 0.0, 1.0)
    if suppress_background:
        heatmap = suppress(heatmap, body_mask(input_grey(tensor, classifier.spec)))
    return heatmap.astype(np.float32)


def suppress(heatmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A heatmap times a body mask, renormalised to a maximum of 1 (all zeros stay zeros)."""
    heatmap = np.asarray(heatmap, dtype=np.float32) * mask
    peak = float(heatmap.max())
    return heatmap / peak if peak > 0 else heatmap


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of a heatmap's mass inside a mask (> 0.5); None for an empty map."""
    total = float(np.sum(heatmap))
    return float(np.sum(heatmap * (mask > 0.5)) / total) if total > 0 else None


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
    np.clip(resized, 0.0, 1.0, out=resized)
    levels = cv2.convertScaleAbs(resized, alpha=255.0)  # uint8, rounded
    colored = cv2.cvtColor(cv2.applyColorMap(levels, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)
    # Blended in uint8 by OpenCV (float32 inside, rounded): a 40-megapixel DICOM took 3.6 GB and 18 s in
    # float64 numpy (`python -m benchmarks.hostile --through app --cases dicom_40mp_16bit`).
    blended = cv2.addWeighted(rgb, 1.0 - opacity, colored, opacity, 0.0)
    if threshold > 0:
        below = resized < threshold
        blended[below] = rgb[below]
    return blended


# ---------------------------------------------------------------- faithfulness (ROAD)

ROAD_PERCENTILES: tuple[int, ...] = (20, 40, 60, 80)
ROAD_IMPUTE_SIDE = 56  # the removed pixels are filled at this resolution (see `impute`)


@dataclass(frozen=True)
class Faithfulness:
    """How much a heatmap's ranking of pixels matters to the model (ROAD, Rong et al. 2022).

    Attributes:
        score: (drop when the most relevant pixels are removed - drop when the least relevant
            are removed) / 2, averaged over `ROAD_PERCENTILES`; in probability units, from -0.5
            to 0.5. Positive: the highlighted pixels carry more of the evidence than the rest.
        most_relevant_drop: Mean fall of the class probability when the top-ranked pixels are removed.
        least_relevant_drop: Mean fall when the same share of the lowest-ranked pixels is removed.
        probability: The calibrated class probability on the untouched image.
    """

    score: float
    most_relevant_drop: float
    least_relevant_drop: float
    probability: float

    def reading(self, label: str) -> str:
        """One plain sentence saying what the score means for this image."""
        morf, lerf = self.most_relevant_drop, self.least_relevant_drop
        facts = (f"removing the most highlighted pixels changes P({label}) by {-morf:+.0%} on average, "
                 f"removing the least highlighted by {-lerf:+.0%}")
        if self.score >= 0.1:
            verdict = "the heatmap points at pixels the model relies on"
        elif self.score > 0.02:
            verdict = "the heatmap points only weakly at what the model relies on"
        elif self.score > -0.02:
            verdict = "the heatmap does not tell which pixels matter; do not read it as evidence"
        else:
            verdict = "the heatmap is misleading here: the model relies more on the pixels it leaves dark"
        return f"Faithfulness (ROAD) {self.score:+.2f}: {facts}; {verdict}."


def impute(tensor: torch.Tensor, remove: np.ndarray, spec: TaskSpec, rng: np.random.Generator,
           noise: float = 0.01) -> torch.Tensor:
    """Fill removed pixels from their neighbours (ROAD's noisy linear imputation).

    The sparse system of pytorch-grad-cam's `NoisyLinearImputer` is solved once, on the grey
    image (the model input is one grey image normalised into three channels) at
    `ROAD_IMPUTE_SIDE` pixels (a whole ROAD score: 0.3 s instead of 4 s on the 2-core CPU; the
    removed regions follow a heatmap that is a 7 x 7 grid upsampled anyway, 8 pixels a cell).
    Kept pixels are untouched.

    Args:
        tensor: Normalised model input (1, 3, S, S).
        remove: bool (S, S), True where pixels are removed.
        spec: The model's spec (its normalisation).
        rng: Noise generator (N(0, noise) is added to filled pixels, in [0, 1] grey units).

    Returns:
        A new normalised (1, 3, S, S) tensor.
    """
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    size = tensor.shape[-1]
    grey = tensor[0, 0].detach().cpu().numpy().astype(np.float64) * spec.std[0] + spec.mean[0]
    side = min(ROAD_IMPUTE_SIDE, size)
    small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA)
    small_remove = cv2.resize(remove.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA) > 0.0
    filled = small.copy()
    if small_remove.all():
        filled[:] = small.mean()
    elif small_remove.any():
        keep = (~small_remove).astype(np.float64)
        matrix, rhs = NoisyLinearImputer.setup_sparse_system(keep, small[None], neighbors_weights)
        filled.flat[np.flatnonzero(small_remove)] = np.asarray(spsolve(csc_matrix(matrix), rhs)).reshape(-1)
    upsampled = cv2.resize(filled, (size, size), interpolation=cv2.INTER_LINEAR) + rng.normal(0.0, noise, (size, size))
    grey = np.where(remove, np.clip(upsampled, 0.0, 1.0), grey)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (torch.from_numpy(grey).float().expand(1, 3, size, size) - mean) / std


def road_score(classifier: Classifier, tensor: torch.Tensor, heatmap: np.ndarray, class_index: int,
               percentiles: tuple[int, ...] = ROAD_PERCENTILES, seed: int = 0) -> Faithfulness:
    """ROAD faithfulness of one heatmap for one class (higher: more faithful).

    For each percentile p, the top p% of pixels by heatmap value are removed and imputed
    (most relevant first, MoRF), and separately the bottom p% (least relevant first, LeRF);
    all perturbed images go through the model's runner in one batch. Ties in a flat
    heatmap are broken at random, so a constant heatmap scores about 0.

    Args:
        classifier: A loaded model.
        tensor: Normalised model input (1, 3, S, S).
        heatmap: float (S, S) in [0, 1], as from `compute_cam`.
        class_index: The output (class or finding) the heatmap explains.
        percentiles: Shares of pixels removed.
        seed: Seed of the tie-breaking and imputation noise (the score is reproducible).

    Raises:
        ValueError: On a class index out of range or a heatmap of the wrong shape.
    """
    spec = classifier.spec
    if isinstance(class_index, bool) or not 0 <= int(class_index) < spec.num_outputs:
        raise ValueError(f"output index {class_index!r} out of range for {spec.key}")
    size = tensor.shape[-1]
    if np.shape(heatmap) != (size, size):
        raise ValueError(f"heatmap must be ({size}, {size}), got {np.shape(heatmap)}")
    rng = np.random.default_rng(seed)
    # Rank pixels by heatmap value, ties at random (most relevant = rank 0).
    order = np.lexsort((rng.random(size * size), -np.asarray(heatmap, dtype=np.float64).reshape(-1)))
    rank = np.empty(size * size, dtype=np.int64)
    rank[order] = np.arange(size * size)
    rank = rank.reshape(size, size)
    perturbed = [tensor]
    for p in percentiles:
        count = int(round(size * size * p / 100.0))
        perturbed.append(impute(tensor, rank < count, spec, rng))  # most relevant first
        perturbed.append(impute(tensor, rank >= size * size - count, spec, rng))  # least relevant first
    logits = classifier.runner.logits(torch.cat(perturbed))
    classes, findings = card_probabilities(logits, spec, classifier.card)
    probability = np.concatenate([classes, findings], axis=1)[:, int(class_index)]
    morf = float(np.mean(probability[0] - probability[1::2]))
    lerf = float(np.mean(probability[0] - probability[2::2]))
    return Faithfulness(score=(morf - lerf) / 2.0, most_relevant_drop=morf, least_relevant_drop=lerf,
                        probability=float(probability[0]))


# ---------------------------------------------------------------- weak localisation

LOCALISATION_THRESHOLD = 0.5  # share of the heatmap's maximum that outlines its strongest region


@dataclass(frozen=True)
class Region:
    """The heatmap's strongest region: the connected area at or above a share of its maximum.

    Coordinates are fractions of the image width and height (0..1), so the region can be
    drawn on an image of any size.

    Attributes:
        box: (x0, y0, x1, y1) bounding box.
        outline: float (K, 2) polygon of (x, y) points.
        area: Share of the image the region covers.
    """

    box: tuple[float, float, float, float]
    outline: np.ndarray
    area: float


def locate(heatmap: np.ndarray, threshold: float = LOCALISATION_THRESHOLD) -> Region | None:
    """Weakly supervised localisation: the connected component around the heatmap's peak.

    The heatmap is thresholded at `threshold` times its maximum (as in CAM localisation work,
    Zhou et al. 2016) and the component holding the maximum is kept.

    Args:
        heatmap: float (h, w) in [0, 1].
        threshold: In (0, 1].

    Returns:
        The region, or None for an empty (all-zero) heatmap.

    Raises:
        ValueError: On a threshold outside (0, 1] or a heatmap that is not 2-D.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    peak = float(heat.max()) if heat.size else 0.0
    if peak <= 0.0:
        return None
    mask = (heat >= threshold * peak).astype(np.uint8)
    _, components = cv2.connectedComponents(mask, connectivity=8)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    region = (components == components[row, col]).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    height, width = heat.shape
    x, y, w, h = cv2.boundingRect(region)
    return Region(box=(x / width, y / height, (x + w) / width, (y + h) / height),
                  outline=outline / [width, height], area=float(region.mean()))


def draw_region(rgb: np.ndarray, region: Region, style: str = "outline", color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """A copy of a uint8 (H, W, 3) image with the region drawn as an "outline" or a "box"."""
    if style not in ("outline", "box"):
        raise ValueError(f"unknown style {style!r}; one of outline, box")
    out = np.ascontiguousarray(rgb.copy())
    height, width = out.shape[:2]
    thickness = max(1, round(min(height, width) / 160))
    if style == "box":
        x0, y0, x1, y1 = region.box
        cv2.rectangle(out, (round(x0 * width), round(y0 * height)),
                      (round(x1 * width) - 1, round(y1 * height) - 1), color, thickness)
    else:
        points = np.round(region.outline * [width, height]).astype(np.int32)
        cv2.polylines(out, [points.reshape(-1, 1, 2)], True, color, thickness)
    return out
