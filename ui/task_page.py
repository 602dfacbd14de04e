"""One task page: pick a model -> upload -> validation message or result -> CAM controls.

Per-session results live in `st.session_state` (never in `st.cache_data`, which is shared
across users). The prediction is computed once per (upload, model); the heatmap once per
(upload, model, class, method); opacity, colormap and threshold only re-blend, inside a
fragment, with no forward pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import streamlit as st
import torch

from core.explain import (COLORMAPS, DEFAULT_METHOD, LOCALISATION_THRESHOLD, METHODS, Faithfulness, compute_cam,
                          draw_region, locate, overlay, place_in_region, road_score)
from core.feedback import VERDICTS, make_feedback, record_feedback
from core.guard import plane_mismatch
from core.imaging import CT_WINDOW_PRESETS, Scan
from core.models import Classifier, WeightsError
from core.predict import Prediction, positive_score, predict_tensor, read_upload, short_digest
from core.preprocess import Box, display_rgb, model_region
from core.report import ReportContent, render_pdf
from core.tasks import TaskSpec, describe_preprocessing, positive_title, tasks_for_page
from core.uncertainty import TTA_VIEWS, Spread, tta_spread
from ui.cache import get_classifier, keep_uploads_in_memory
from ui.widgets import (VIEWER_CONFIG, card_summary, disclaimer, findings_chart, png_bytes, probability_chart,
                        spread_chart, synced_viewer)

logger = logging.getLogger(__name__)

MAX_ANALYSES = 4
UPLOAD_TYPES_HELP = "PNG, JPEG, WebP, TIFF, BMP, or DICOM (.dcm or any file with the DICOM header)"


@dataclass
class Analysis:
    """What one session keeps for one (upload, model): never written anywhere."""

    sha256: str
    scan: Scan
    tensor: torch.Tensor
    prediction: Prediction
    rgb: np.ndarray
    region: Box  # the part of the scan the model input covers (core.preprocess.model_region)
    cams: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    faithfulness: dict[tuple[int, str], Faithfulness] = field(default_factory=dict)
    spread: Spread | None = None

    @property
    def cropped(self) -> bool:
        """Whether the model saw only part of the scan (a preprocessing crop)."""
        return self.region != (0, self.scan.shape[0], 0, self.scan.shape[1])

    @property
    def digest(self) -> str:
        """The upload's short hash: what logs, keys and the report carry."""
        return short_digest(self.sha256)


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
    sha256 = hashlib.sha256(data).hexdigest()
    digest = short_digest(sha256)
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
    analysis = Analysis(sha256, scan, tensor, prediction, display_rgb(scan), model_region(scan, classifier.spec))
    store[key] = analysis
    while len(store) > MAX_ANALYSES:
        store.popitem(last=False)
    return analysis


def show_scan_notes(scan: Scan, spec: TaskSpec) -> None:
    """What was read from the file, what was done to it, and what the model does to it before it looks."""
    facts = [f"{scan.shape[1]} x {scan.shape[0]} px", scan.kind.upper()]
    for name in ("Modality", "BodyPartExamined", "orientation", "TransferSyntax"):
        if name in scan.info:
            facts.append(f"{name}: {scan.info[name]}")
    caption = "Read as: " + ", ".join(facts) + (". Steps: " + "; ".join(scan.steps) if scan.steps else ".")
    if spec.preprocessing:
        caption += f" Before the model sees it, as in its training: {describe_preprocessing(spec.preprocessing)}."
    st.caption(caption)


def show_prediction(classifier: Classifier, prediction: Prediction) -> None:
    """The decided class (or "uncertain" inside the indeterminate band), its calibrated
    probability, and every class in a bar chart."""
    p = float(prediction.probabilities[prediction.index])
    card = classifier.card
    if prediction.uncertain:
        st.subheader(f"Model output: uncertain (likelier {prediction.label}, {p:.1%})")
        test = card.indeterminate.get("test", {})
        measured = ""
        if test.get("share_uncertain") is not None and test.get("accuracy_inside") is not None:
            measured = (f" On the held-out split {test['share_uncertain']:.0%} of images fell in this band and the model "
                        f"was right on {test['accuracy_inside']:.0%} of them (vs {test['accuracy_outside']:.0%} outside).")
        st.warning(f"This output lies inside the indeterminate band ({card.indeterminate.get('rule', '')}): the model "
                   f"cannot tell the classes apart here.{measured}")
    else:
        st.subheader(f"Model output: {prediction.label} ({p:.1%})")
    if prediction.threshold is not None:
        at = card.metrics.get("at_threshold", {})
        measured = (f"; on held-out images sensitivity {at['sensitivity']:.2f}, specificity {at['specificity']:.2f}"
                    if at.get("sensitivity") is not None and at.get("specificity") is not None else "")
        score = float(positive_score(prediction.probabilities[None], prediction.labels, prediction.positive)[0])
        st.caption(
            f"Calls {positive_title(prediction.positive)} when its probability is at least {prediction.threshold:.2f} "
            f"(operating threshold chosen on validation data{measured}); here it is {score:.1%}."
        )
    st.plotly_chart(probability_chart(prediction), key=f"probs_{classifier.spec.key}")
    if prediction.findings:
        show_findings(classifier, prediction)


def show_findings(classifier: Classifier, prediction: Prediction) -> None:
    """A multi-label model's independent findings: each probability against its own threshold."""
    present = [f.title for f in prediction.findings if f.present]
    st.markdown("**Findings** (independent outputs: several can be present at once): "
                + (", ".join(present) + " above threshold." if present else "none above threshold."))
    st.plotly_chart(findings_chart(prediction), key=f"findings_{classifier.spec.key}")
    rows = []
    for finding in prediction.findings:
        test = classifier.card.findings.get(finding.key, {}).get("test", {})
        auc = test.get("roc_auc")
        rows.append({"finding": finding.title, "probability": f"{finding.probability:.1%}",
                     "threshold": f"{finding.threshold:.2f}", "above threshold": "yes" if finding.present else "no",
                     "held-out ROC-AUC": f"{auc:.2f}" if auc is not None else "n/a",
                     "held-out positive slices": test.get("positives", "n/a")})
    st.dataframe(rows, hide_index=True)
    st.caption("Each finding has its own threshold, chosen on validation data. They are read from the same image "
               "as the main call and are shown whatever it says; few positive cases stand behind some of them "
               "(see the held-out columns).")


def stability_panel(classifier: Classifier, analysis: Analysis) -> None:
    """Test-time augmentation on request: the spread of each class's probability over augmented views."""
    prefix = f"{classifier.spec.key}_{analysis.digest}"
    if analysis.spread is None:
        if not st.button(f"Check stability ({TTA_VIEWS} slightly shifted, rotated and re-contrasted views)",
                         key=f"tta_{prefix}"):
            return
        try:
            with st.spinner("Predicting augmented views..."):
                analysis.spread = tta_spread(classifier, analysis.scan)
        except Exception as exc:  # noqa: BLE001 - the result above stays on screen whatever happens here
            logger.error("TTA failed for %s: %s", classifier.spec.key, type(exc).__name__)
            st.error(f"The stability check could not be run ({type(exc).__name__}).")
            return
        _count("tta_runs")
    spread, index = analysis.spread, analysis.prediction.index
    agree = spread.agreement(index)
    st.markdown(f"**Stability:** {spread.summary(index)}")
    st.plotly_chart(spread_chart(spread, index), key=f"spread_{prefix}")
    if agree < 0.8:
        st.warning("The call changes under small changes of the image: treat it as uncertain.")


def default_method(classifier: Classifier) -> str:
    """The CAM method the card measured as most faithful on held-out images, else `DEFAULT_METHOD`."""
    method = classifier.card.explanations.get("default_method")
    return method if method in METHODS else DEFAULT_METHOD


def heatmap_for(classifier: Classifier, analysis: Analysis, cam_key: tuple[int, str], target: str) -> np.ndarray | None:
    """The heatmap for (class, method), computed once per analysis; None (with a message) if it fails."""
    method = cam_key[1]
    if cam_key not in analysis.cams:
        try:
            with st.spinner(f"Computing {method} for {target}..."):
                analysis.cams[cam_key] = compute_cam(classifier, analysis.tensor, cam_key[0], method)
        except Exception as exc:  # noqa: BLE001 - a failed heatmap must not take the page down
            logger.error("CAM %s failed for %s: %s", method, classifier.spec.key, type(exc).__name__)
            st.error(f"{method} could not be computed for this image ({type(exc).__name__}); try another method.")
            return None
        _count("cam_runs")
    return analysis.cams[cam_key]


def faithfulness_for(classifier: Classifier, analysis: Analysis, cam_key: tuple[int, str]) -> Faithfulness | None:
    """ROAD faithfulness of the shown heatmap, computed once per (class, method)."""
    if cam_key not in analysis.faithfulness:
        try:
            with st.spinner("Measuring how faithful this heatmap is..."):
                analysis.faithfulness[cam_key] = road_score(classifier, analysis.tensor, analysis.cams[cam_key], cam_key[0])
        except Exception as exc:  # noqa: BLE001 - the heatmap stays on screen without its score
            logger.error("ROAD failed for %s: %s", classifier.spec.key, type(exc).__name__)
            return None
        _count("road_runs")
    return analysis.faithfulness[cam_key]


@st.fragment
def cam_panel(classifier: Classifier, analysis: Analysis) -> None:
    """CAM controls, the synced zoom/pan viewer and the downloads; re-runs alone when a control moves."""
    spec = classifier.spec
    prefix = f"{spec.key}_{analysis.digest}"
    col_class, col_method, col_map = st.columns(3)
    target = col_class.selectbox("Explain output" if spec.findings else "Explain class", spec.outputs,
                                 index=analysis.prediction.index, format_func=spec.output_title, key=f"cam_class_{prefix}")
    preferred = default_method(classifier)
    method = col_method.selectbox("Method", METHODS, index=METHODS.index(preferred), key=f"cam_method_{prefix}",
                                  help=f"{preferred} is the default: it was the most faithful method for this model "
                                       "on held-out images (see the Model cards page).")
    colormap = col_map.selectbox("Colormap", list(COLORMAPS), key=f"cam_cmap_{prefix}")
    col_opacity, col_threshold, col_region = st.columns(3)
    opacity = col_opacity.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key=f"cam_opacity_{prefix}")
    threshold = col_threshold.slider("Hide activations below", 0.0, 0.95, 0.2, 0.05, key=f"cam_threshold_{prefix}")
    region_style = col_region.radio("Strongest region", ["off", "outline", "box"], horizontal=True,
                                    key=f"cam_region_{prefix}")

    cam_key = (spec.output_index(target), method)
    target = spec.output_title(target)
    heatmap = heatmap_for(classifier, analysis, cam_key, target)
    if heatmap is None:
        return
    heatmap = place_in_region(heatmap, analysis.region, analysis.scan.shape)
    rgb = viewer_image(spec, analysis, prefix)
    blended = overlay(rgb, heatmap, opacity, colormap, threshold)
    if analysis.cropped:  # outside the model's crop: the image as it is
        top, bottom, left, right = analysis.region
        unseen = np.ones(rgb.shape[:2], dtype=bool)
        unseen[top:bottom, left:right] = False
        blended[unseen] = rgb[unseen]
    region = locate(heatmap) if region_style != "off" else None
    if region is not None:
        blended = draw_region(blended, region, region_style)
    left_title = "As read" if rgb is analysis.rgb else "In the display window"
    overlay_png = png_bytes(blended)  # shown in the viewer and offered as the download: encoded once
    st.plotly_chart(synced_viewer(png_bytes(rgb), overlay_png, rgb.shape[:2], left_title, f"{method} for '{target}'"),
                    config=VIEWER_CONFIG, key=f"viewer_{prefix}")
    st.caption("Drag to zoom, scroll to zoom, double-click to reset: both panels move together.")
    if region is not None:
        st.caption(f"Strongest region: where the heatmap reaches {LOCALISATION_THRESHOLD:.0%} of its maximum, around "
                   f"its peak ({region.area:.0%} of the image). A weak localisation, not a segmentation.")
    reading = st.empty()  # the faithfulness line, filled below once the downloads are on screen
    if analysis.cropped:
        top, bottom, left, right = analysis.region
        st.caption(f"The model looked at rows {top}-{bottom} and columns {left}-{right} of this image (its border crop); "
                   "outside them the heatmap is empty because the model never saw those pixels.")
    st.caption(
        f"Heatmaps are coarse ({spec.cam_layer} gives a 7 x 7 grid, smoothed to the image) and normalised per "
        "image: red marks where this image's evidence is strongest, not how strong it is. "
        "They show what drove the model, not where disease is."
    )
    stem = f"secondlook-{spec.key}-{spec.outputs[cam_key[0]]}-{method.lower().replace('+', 'plus')}"
    col_png, col_pdf = st.columns(2)
    col_png.download_button("Download the overlay (PNG)", data=overlay_png, mime="image/png", on_click="ignore",
                            file_name=f"{stem}.png", key=f"cam_download_{prefix}")
    # The PDF is made when the reader clicks (on another thread), with whatever was measured by then.
    col_pdf.download_button("Download a one-page report (PDF)", mime="application/pdf", on_click="ignore",
                            data=partial(report_pdf, classifier, analysis, rgb, blended, cam_key, target),
                            file_name=f"{stem}-report.pdf", key=f"cam_report_{prefix}")
    if float(heatmap.max()) <= 0.0:
        reading.info(f"{method} finds no region that raises the score of '{target}' in this image.")
        return
    faith = faithfulness_for(classifier, analysis, cam_key)
    if faith is not None:
        reading.markdown(faith.reading(target))


def report_pdf(classifier: Classifier, analysis: Analysis, rgb: np.ndarray, blended: np.ndarray,
               cam_key: tuple[int, str], target: str) -> bytes:
    """The one-page PDF of what the reader sees (see `core.report`)."""
    faith = analysis.faithfulness.get(cam_key)
    return render_pdf(ReportContent(image=rgb, overlay=blended, prediction=analysis.prediction, card=classifier.card,
                                    upload_hash=analysis.digest, explained=target, method=cam_key[1],
                                    faithfulness=faith.reading(target) if faith is not None else None,
                                    notes=report_notes(analysis)))


def report_notes(analysis: Analysis) -> tuple[str, ...]:
    """Extra report lines: a multi-label model's findings; the stability check, where it was run."""
    notes = []
    if analysis.prediction.findings:
        notes.append("Findings (independent, own thresholds): " + "; ".join(
            f"{f.title} {f.probability:.0%} ({'above' if f.present else 'below'} {f.threshold:.2f})"
            for f in analysis.prediction.findings))
    if analysis.spread is not None:
        notes.append(f"Stability: {analysis.spread.summary(analysis.prediction.index)}")
    return tuple(notes)


def viewer_image(spec: TaskSpec, analysis: Analysis, prefix: str) -> np.ndarray:
    """The image to show: for a CT DICOM, in the display window the reader picks (presets or free).

    The display window never reaches the model: its input was made once, in the training
    window, when the upload was analysed.
    """
    scan = analysis.scan
    if scan.values is None or scan.modality != "CT":
        return analysis.rgb
    names = [*CT_WINDOW_PRESETS, "Custom"]
    shown_first = [w for w in (spec.ct_window, scan.window) if w is not None]  # the model's window where it is a preset
    default = next((n for w in shown_first for n, p in CT_WINDOW_PRESETS.items() if np.allclose(p, w)), "Custom")
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
    show_scan_notes(result.scan, spec)
    show_plane_warning(spec, result.scan)
    if result.prediction.flag and not confirm_flagged(spec, result):
        return
    show_prediction(classifier, result.prediction)
    stability_panel(classifier, result)
    cam_panel(classifier, result)
    feedback_form(classifier, result)


def feedback_form(classifier: Classifier, analysis: Analysis) -> None:
    """Agree / disagree with an optional class and comment; stored as hashes and words, never the image."""
    card, prediction = classifier.card, analysis.prediction
    prefix = f"{classifier.spec.key}_{analysis.digest}"
    with st.expander("Your read: agree or disagree with the model"):
        with st.form(f"feedback_{prefix}", clear_on_submit=True):
            verdict = st.radio("Verdict", VERDICTS, horizontal=True, key=f"fb_verdict_{prefix}")
            label = st.selectbox("Your class (optional)", ["", *classifier.spec.labels], key=f"fb_label_{prefix}")
            comment = st.text_area("Comment (optional; no patient names or identifiers)", max_chars=1000,
                                   key=f"fb_comment_{prefix}")
            if not st.form_submit_button("Save my read"):
                return
        output = "uncertain" if prediction.uncertain else prediction.label
        try:
            path = record_feedback(make_feedback(analysis.sha256, card.key, card.version, card.sha256,
                                                 f"{output} ({float(prediction.probabilities[prediction.index]):.3f})",
                                                 verdict, label, comment))
        except (ValueError, OSError) as exc:
            st.error(f"Your read could not be saved: {exc}")
            return
        logger.info("feedback %s on upload %s: %s", card.key, analysis.digest, verdict)
        st.success(f"Saved: {verdict}. Stored on this server in {path.name} (the image hash, model, verdict and comment; "
                   "never the image). Export it from the Model cards page.")


def confirm_flagged(spec: TaskSpec, analysis: Analysis) -> bool:
    """Say why the scan was not classified; True only if the reader asks to see the output anyway."""
    st.warning(f"**Not classified:** {analysis.prediction.flag}.", icon="🚫")
    return st.checkbox(
        "Show the model's output anyway (it was not trained for this image; the output is probably meaningless)",
        key=f"override_{spec.key}_{analysis.digest}",
    )
