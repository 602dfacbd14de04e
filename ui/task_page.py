"""One task page: pick a model -> upload -> validation message or result -> CAM controls.

Per-session results live in `st.session_state` (never in `st.cache_data`, which is shared
across users). The prediction is computed once per (upload, model); the heatmap once per
(upload, model, class, method); opacity, colormap and threshold only re-blend, inside a
fragment, with no forward pass.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import streamlit as st
import torch

from core.explain import COLORMAPS, DEFAULT_METHOD, METHODS, compute_cam, overlay
from core.guard import plane_mismatch
from core.imaging import CT_WINDOW_PRESETS, Scan
from core.models import Classifier, WeightsError
from core.predict import Prediction, predict_tensor, read_upload, upload_digest
from core.preprocess import display_rgb
from core.tasks import TaskSpec, tasks_for_page
from ui.cache import get_classifier, keep_uploads_in_memory
from ui.widgets import card_summary, disclaimer, png_bytes, probability_chart

logger = logging.getLogger(__name__)

MAX_ANALYSES = 4
UPLOAD_TYPES_HELP = "PNG, JPEG, WebP, TIFF, BMP, or DICOM (.dcm or any file with the DICOM header)"


@dataclass
class Analysis:
    """What one session keeps for one (upload, model): never written anywhere."""

    digest: str
    scan: Scan
    tensor: torch.Tensor
    prediction: Prediction
    rgb: np.ndarray
    cams: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)


def _count(name: str) -> None:
    """Per-session counters of model work, shown to nobody; tests read them."""
    st.session_state[name] = st.session_state.get(name, 0) + 1


def choose_model(specs: list[TaskSpec], page: str) -> TaskSpec:
    """A radio button when the page holds several models, each with what it was trained on."""
    if len(specs) == 1:
        st.caption(f"Model trained on: {specs[0].trained_on}.")
        return specs[0]
    titles = [spec.title for spec in specs]
    chosen = st.radio("Model", titles, captions=[f"Trained on: {s.trained_on}" for s in specs], key=f"model_{page}")
    return specs[titles.index(chosen)]


def _failed(reason: str) -> str:
    return f"This file could not be analysed ({reason}). Try another export of the image."


def analyse(classifier: Classifier, data: bytes, filename: str) -> Analysis | str:
    """Read and predict one upload, once per session; a string is the message for a bad file."""
    digest = upload_digest(data)
    store: OrderedDict = st.session_state.setdefault("analyses", OrderedDict())
    key = (digest, classifier.spec.key)
    if key in store:
        store.move_to_end(key)
        return store[key]
    read = read_upload(filename, data, classifier.spec)
    if isinstance(read, dict):  # refused or failed, with the reason
        return read["reason"] if read["status"] == "rejected" else _failed(read["reason"])
    scan, tensor = read
    try:
        prediction = predict_tensor(classifier, tensor, scan)
        _count("forward_passes")
    except Exception as exc:  # noqa: BLE001 - the page must survive any file; the reason is logged, not the file
        logger.error("upload %s failed for %s: %s", digest, classifier.spec.key, type(exc).__name__)
        return _failed(f"internal error: {type(exc).__name__}")
    logger.info("upload %s -> %s: %s", digest, classifier.spec.key, prediction.label)
    analysis = Analysis(digest, scan, tensor, prediction, display_rgb(scan))
    store[key] = analysis
    while len(store) > MAX_ANALYSES:
        store.popitem(last=False)
    return analysis


def show_scan_notes(scan: Scan) -> None:
    """What was read from the file and what was done to it."""
    facts = [f"{scan.shape[1]} x {scan.shape[0]} px", scan.kind.upper()]
    for name in ("Modality", "BodyPartExamined", "orientation", "TransferSyntax"):
        if name in scan.info:
            facts.append(f"{name}: {scan.info[name]}")
    st.caption("Read as: " + ", ".join(facts) + (". Steps: " + "; ".join(scan.steps) if scan.steps else "."))


def show_prediction(classifier: Classifier, prediction: Prediction) -> None:
    """The decided class, its calibrated probability, and every class in a bar chart."""
    p = float(prediction.probabilities[prediction.index])
    st.subheader(f"Model output: {prediction.label} ({p:.1%})")
    if prediction.threshold is not None:
        st.caption(
            f"Calls {prediction.positive} when its probability is at least {prediction.threshold:.2f} "
            f"(operating threshold chosen on validation data)."
        )
    st.plotly_chart(probability_chart(prediction), key=f"probs_{classifier.spec.key}")


@st.fragment
def cam_panel(classifier: Classifier, analysis: Analysis) -> None:
    """CAM controls and the side-by-side viewer; re-runs alone when a control moves."""
    spec = classifier.spec
    prefix = f"{spec.key}_{analysis.digest}"
    col_class, col_method, col_map = st.columns(3)
    target = col_class.selectbox("Explain class", spec.labels, index=analysis.prediction.index, key=f"cam_class_{prefix}")
    method = col_method.selectbox("Method", METHODS, index=METHODS.index(DEFAULT_METHOD), key=f"cam_method_{prefix}")
    colormap = col_map.selectbox("Colormap", list(COLORMAPS), key=f"cam_cmap_{prefix}")
    col_opacity, col_threshold = st.columns(2)
    opacity = col_opacity.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key=f"cam_opacity_{prefix}")
    threshold = col_threshold.slider("Hide activations below", 0.0, 0.95, 0.2, 0.05, key=f"cam_threshold_{prefix}")

    cam_key = (spec.label_index(target), method)
    if cam_key not in analysis.cams:
        try:
            with st.spinner(f"Computing {method} for {target}..."):
                analysis.cams[cam_key] = compute_cam(classifier, analysis.tensor, cam_key[0], method)
        except Exception as exc:  # noqa: BLE001 - a failed heatmap must not take the page down
            logger.error("CAM %s failed for %s: %s", method, spec.key, type(exc).__name__)
            st.error(f"{method} could not be computed for this image ({type(exc).__name__}); try another method.")
            return
        _count("cam_runs")
    heatmap = analysis.cams[cam_key]
    rgb = viewer_image(spec, analysis, prefix)
    blended = overlay(rgb, heatmap, opacity, colormap, threshold)
    left, right = st.columns(2)
    left.image(rgb, caption="As read" if rgb is analysis.rgb else "In the display window", width="stretch")
    right.image(blended, caption=f"{method} for '{target}'", width="stretch")
    right.download_button("Download the overlay (PNG)", data=png_bytes(blended), mime="image/png", on_click="ignore",
                          file_name=f"secondlook-{spec.key}-{target}-{method.lower().replace('+', 'plus')}.png",
                          key=f"cam_download_{prefix}")
    if float(heatmap.max()) <= 0.0:
        st.info(f"{method} finds no region that raises the score of '{target}' in this image.")
    st.caption(
        f"Heatmaps are coarse ({spec.cam_layer} gives a 7 x 7 grid, smoothed to the image) and normalised per "
        "image: red marks where this image's evidence is strongest, not how strong it is. "
        "They show what drove the model, not where disease is."
    )


def viewer_image(spec: TaskSpec, analysis: Analysis, prefix: str) -> np.ndarray:
    """The image to show: for a CT DICOM, in the display window the reader picks (presets or free).

    The display window never reaches the model: its input was made once, in the training
    window, when the upload was analysed.
    """
    scan = analysis.scan
    if scan.values is None or scan.modality != "CT":
        return analysis.rgb
    names = [*CT_WINDOW_PRESETS, "Custom"]
    default = next((n for n, w in CT_WINDOW_PRESETS.items() if scan.window and np.allclose(w, scan.window)), "Custom")
    col_preset, col_center, col_width = st.columns(3)
    preset = col_preset.selectbox("Display window", names, index=names.index(default), key=f"window_{prefix}")
    center, width = CT_WINDOW_PRESETS.get(preset, scan.window or CT_WINDOW_PRESETS["Lung"])
    if preset == "Custom":
        center = col_center.number_input("Centre (HU)", -1500.0, 3000.0, float(center), 10.0, key=f"window_c_{prefix}")
        width = col_width.number_input("Width (HU)", 1.0, 5000.0, float(width), 10.0, key=f"window_w_{prefix}")
    model_window = f"{spec.ct_window[0]:g} / {spec.ct_window[1]:g} HU" if spec.ct_window else "its training window"
    col_center.caption(f"Shown at centre {center:g} / width {width:g} HU.")
    col_width.caption(f"The model always sees centre / width {model_window}.")
    return display_rgb(scan, (center, width))


def show_plane_warning(spec: TaskSpec, scan: Scan) -> None:
    """Warn when a DICOM slice's plane is not the plane the model was trained on."""
    message = plane_mismatch(scan, spec)
    if message:
        st.warning(message)


def render_task_page(page: str) -> None:
    """The whole screen for one app page (see `core.tasks.PAGES`)."""
    st.set_page_config(page_title=f"{page} - SecondLook", layout="wide")
    keep_uploads_in_memory()
    st.title(page)
    disclaimer()
    spec = choose_model(tasks_for_page(page), page)
    try:
        classifier = get_classifier(spec.key)
    except (WeightsError, ValueError) as exc:
        st.error(f"The model '{spec.title}' cannot be loaded: {exc}")
        return
    card_summary(classifier.card)
    uploaded = st.file_uploader(f"Upload a scan: {UPLOAD_TYPES_HELP}", type=None, key=f"upload_{page}")
    if uploaded is None:
        st.info("Upload one image to see the model's prediction and heatmap. Nothing you upload is stored.")
        return
    result = analyse(classifier, uploaded.getvalue(), uploaded.name)
    if isinstance(result, str):
        st.error(result)
        return
    show_scan_notes(result.scan)
    show_plane_warning(spec, result.scan)
    if result.prediction.flag and not confirm_flagged(spec, result):
        return
    show_prediction(classifier, result.prediction)
    cam_panel(classifier, result)


def confirm_flagged(spec: TaskSpec, analysis: Analysis) -> bool:
    """Say why the scan was not classified; True only if the reader asks to see the output anyway."""
    st.warning(f"**Not classified:** {analysis.prediction.flag}.", icon="🚫")
    return st.checkbox(
        "Show the model's output anyway (it was not trained for this image; the output is probably meaningless)",
        key=f"override_{spec.key}_{analysis.digest}",
    )
