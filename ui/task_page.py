"""One task page: pick a model -> upload -> the answer beside the image and its heatmap -> details below.

The first screen holds the call, its probability, the image and its heatmap (the viewer on the
left, the answer on the right); the heatmap controls, findings, stability, downloads, feedback and
the scan's notes follow. Per-session results live in `st.session_state` (never in
`st.cache_data`, which is shared across users). The analysis (`core.pipeline.Analysis`) is made
once per (upload, model); each heatmap once per (output, method); opacity, colormap and threshold
only re-blend, inside a fragment, with no forward pass.

Untrusted text (file names, DICOM tag values) never reaches Markdown: the scan notes carry only
the fixed vocabulary of `core.pipeline.scan_facts`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from functools import partial

import numpy as np
import streamlit as st

from core.decision import FINDING_MIN_AUC, FINDING_MIN_SENSITIVITY, Prediction
from core.explain import (CLASS_INDEPENDENT, COLORMAPS, DEFAULT_METHOD, LOCALISATION_THRESHOLD, METHODS, cam_layers,
                          draw_region, locate, overlay)
from core.feedback import VERDICTS, make_feedback, record_feedback
from core.guard import plane_mismatch
from core.models import Classifier, WeightsError
from core.pipeline import Analysis, Refusal, analyse, scan_facts, short_digest
from core.preprocess import display_rgb
from core.report import ReportContent, render_pdf
from core.tasks import CT_WINDOW_PRESETS, TaskSpec, describe_preprocessing, tasks_for_page
from core.study import is_study
from ui import plain
from ui.cache import get_classifier
from ui.dicom_downloads import ImageSource, image_downloads, image_source
from ui.study_page import SlicePanels, accepts_studies, render_study_view
from ui.widgets import (VIEWER_CONFIG, card_summary, disclaimer, findings_chart, png_bytes, probability_chart,
                        spread_chart, synced_viewer)

logger = logging.getLogger(__name__)

MAX_ANALYSES = 2  # analyses a session keeps (the one shown and the one before it)
UPLOAD_TYPES_HELP = "PNG, JPEG, WebP, TIFF, BMP, or DICOM (.dcm or any file with the DICOM header)"
STUDY_TYPES_HELP = "or a whole series: several DICOM files, a ZIP of them, a multi-frame DICOM or NIfTI (.nii, .nii.gz)"


def _count(name: str, by: int = 1) -> None:
    """Per-session counters of model work, shown to nobody; tests read them."""
    if by:
        st.session_state[name] = st.session_state.get(name, 0) + by


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


def analyse_upload(classifier: Classifier, data: bytes, filename: str | None) -> Analysis | str:
    """The session's analysis of one upload by one model, made once; a string is the message for a bad file.

    The file name is only a hint for DICOM files without a preamble; it is never shown or logged."""
    digest = short_digest(hashlib.sha256(data).hexdigest())
    store: OrderedDict = st.session_state.setdefault("analyses", OrderedDict())
    key = (digest, classifier.spec.key)
    if key in store:
        store.move_to_end(key)
        return store[key]
    outcome = analyse(classifier, data, filename)
    if isinstance(outcome, Refusal):
        return outcome.reason if outcome.status == "rejected" else _failed(outcome.reason)
    _count("forward_passes")
    store[key] = outcome
    while len(store) > MAX_ANALYSES:
        store.popitem(last=False)
    return outcome


def show_scan_notes(analysis: Analysis, spec: TaskSpec) -> None:
    """What was read from the file, what was done to it, and what the model does to it before it looks."""
    caption = "Read as: " + ", ".join(scan_facts(analysis.scan)) + "."
    if analysis.scan.steps:
        caption += " Steps: " + "; ".join(analysis.scan.steps) + "."
    if spec.preprocessing:
        caption += f" Before the model sees it, as in its training: {describe_preprocessing(spec.preprocessing)}."
    st.text(caption)


def show_answer(classifier: Classifier, analysis: Analysis) -> None:
    """The call (or "uncertain" inside the indeterminate band) with its calibrated probability, the guard's warning
    if the scan is borderline, the probability chart and the threshold's held-out figures."""
    prediction, card, spec = analysis.prediction, classifier.card, classifier.spec
    st.subheader(f"Model output: {prediction.headline_text()}")
    if prediction.guard.warned:
        plain.warning(f"Borderline input. {prediction.guard.reason}", icon="⚠️")
    if prediction.uncertain and card.indeterminate is not None:
        band = card.indeterminate.classes
        test, measured = band.test, ""
        if test.share_uncertain is not None and test.accuracy_inside is not None and test.accuracy_outside is not None:
            measured = (f" On the held-out split {test.share_uncertain:.0%} of images fell in this band and the model "
                        f"was right on {test.accuracy_inside:.0%} of them (vs {test.accuracy_outside:.0%} outside).")
        st.warning(f"This output lies inside the indeterminate band ({band.rule}): the model cannot tell the classes "
                   f"apart here.{measured}")
    st.plotly_chart(probability_chart(prediction, spec), key=f"probs_{spec.key}", config={"displayModeBar": False})
    if prediction.threshold is not None:
        at = card.test_figures.at_threshold
        measured = (f"; on held-out images sensitivity {at.sensitivity:.2f}, specificity {at.specificity:.2f}"
                    if at is not None and at.sensitivity is not None and at.specificity is not None else "")
        st.caption(
            f"Calls {spec.positive_title} when its probability is at least {prediction.threshold:.2f} "
            f"(operating threshold chosen on validation data{measured}); here it is {prediction.positive_probability:.1%}."
        )
    if prediction.findings:
        present = [f.title for f in prediction.findings if f.present]
        st.markdown("**Findings** (independent outputs: several can be present at once): "
                    + (", ".join(present) + " above threshold." if present else "none called present."))
        st.plotly_chart(findings_chart(prediction), key=f"findings_{spec.key}", config={"displayModeBar": False})


def show_findings_table(classifier: Classifier, prediction: Prediction) -> None:
    """A multi-label model's independent findings: each against its own threshold, with its held-out figures."""
    rows = []
    for finding in prediction.findings:
        test = classifier.card.findings[finding.key].test
        auc = test.roc_auc
        sens, spec_ = finding.sensitivity, finding.specificity
        rows.append({"finding": finding.title, "probability": f"{finding.probability:.1%}",
                     "threshold": f"{finding.threshold:.2f}", "above threshold": "yes" if finding.above_threshold else "no",
                     "called": "unreliable" if finding.unreliable else "uncertain" if finding.uncertain
                     else "present" if finding.present else "absent",
                     "held-out sensitivity / specificity": "n/a" if sens is None or spec_ is None
                     else f"{sens:.2f} / {spec_:.2f}",
                     "held-out ROC-AUC": f"{auc:.2f}" if auc is not None else "n/a",
                     "held-out positive slices": test.positives,
                     "why unreliable": finding.unreliable or ""})
    st.dataframe(rows, hide_index=True)
    st.caption("Each finding has its own threshold, chosen on validation data. A finding whose own validation figures "
               f"are too weak (ROC-AUC below {FINDING_MIN_AUC:.2f}, sensitivity at its threshold below "
               f"{FINDING_MIN_SENSITIVITY:.2f}, or under 3 positive validation slices) is greyed and never called present. "
               "Few positive cases stand behind some of them (see the held-out columns).")


def stability_panel(classifier: Classifier, analysis: Analysis) -> None:
    """Test-time augmentation on request: the spread of each class's probability over augmented views."""
    prefix = f"{classifier.spec.key}_{analysis.digest}"
    spread = analysis.stability_checked
    if spread is None:
        if not st.button("Check stability (16 slightly shifted, rotated and re-contrasted views)", key=f"tta_{prefix}"):
            return
        try:
            with st.spinner("Predicting augmented views..."):
                spread = analysis.stability()
        except Exception as exc:  # noqa: BLE001 - the result above stays on screen whatever happens here
            logger.error("TTA failed for %s: %s", classifier.spec.key, type(exc).__name__)
            st.error(f"The stability check could not be run ({type(exc).__name__}).")
            return
        _count("tta_runs")
    index = analysis.prediction.index
    st.markdown(f"**Stability:** {spread.summary(index)}")
    st.plotly_chart(spread_chart(spread, index), key=f"spread_{prefix}")
    if spread.agreement(index) < 0.8:
        st.warning("The call changes under small changes of the image: treat it as uncertain.")


def method_notes(classifier: Classifier) -> dict[str, str]:
    """What the reader must know of a method before reading its map: class-independent, or failing the card's
    randomisation check."""
    explanations = classifier.card.explanations
    fails = set(explanations.fails_randomisation) if explanations is not None else set()
    notes = {m: "class-independent" for m in CLASS_INDEPENDENT}
    for m in fails:
        notes[m] = (notes[m] + "; " if m in notes else "") + "fails the randomisation check"
    return notes


def heatmap_resolution(classifier: Classifier) -> str:
    """The grid the heatmaps are computed on, in words ("features.13 + features.18: a 14 x 14 grid")."""
    spec = classifier.spec
    layers = cam_layers(classifier)
    grid = spec.backbone.cam_grid(spec.input_size) * (2 if spec.backbone.fine_cam_layer in layers else 1)
    return f"{' + '.join(layers)}: a {grid} x {grid} grid"


def default_method(classifier: Classifier) -> str:
    """The CAM method the card measured as most faithful on held-out images, else `DEFAULT_METHOD`."""
    explanations = classifier.card.explanations
    method = explanations.default_method if explanations is not None else None
    return method if method in METHODS else DEFAULT_METHOD


def viewer_image(spec: TaskSpec, analysis: Analysis, prefix: str, rgb: np.ndarray) -> np.ndarray:
    """The image to show: for a CT DICOM, in the display window the reader picks (presets or free).

    The display window never reaches the model: its input was made once, in the training
    window, when the upload was analysed.
    """
    scan = analysis.scan
    if scan.values is None or scan.modality != "CT":
        return rgb
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


def _rgb(analysis: Analysis) -> np.ndarray:
    """The scan as read, in RGB (made once per analysis per session)."""
    cache = st.session_state.setdefault("display_rgb", {})
    if analysis.digest not in cache:
        cache.clear()  # one image per session: the one on screen
        cache[analysis.digest] = display_rgb(analysis.scan)
    return cache[analysis.digest]


@st.fragment
def cam_panel(classifier: Classifier, analysis: Analysis, source: ImageSource | None = None) -> None:
    """The synced image / heatmap viewer with its controls and downloads; re-runs alone when a control moves.

    `source` (a single upload's) adds the DICOM downloads of the overlay as shown (`ui.dicom_downloads`)."""
    spec = classifier.spec
    prefix = f"{spec.key}_{analysis.digest}"
    viewer = st.container()
    col_class, col_method, col_map = st.columns(3)
    target = col_class.selectbox("Explain output" if spec.findings else "Explain class", spec.outputs,
                                 index=analysis.prediction.index, format_func=spec.output_title, key=f"cam_class_{prefix}")
    preferred = default_method(classifier)
    notes = method_notes(classifier)
    method = col_method.selectbox("Method", METHODS, index=METHODS.index(preferred), key=f"cam_method_{prefix}",
                                  format_func=lambda m: f"{m} ({notes[m]})" if m in notes else m,
                                  help=f"{preferred} is the default: it was the most faithful method for this model "
                                       "on held-out images (see the Model cards page).")
    colormap = col_map.selectbox("Colormap", list(COLORMAPS), key=f"cam_cmap_{prefix}")
    col_opacity, col_threshold, col_region = st.columns(3)
    opacity = col_opacity.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key=f"cam_opacity_{prefix}")
    threshold = col_threshold.slider("Hide activations below", 0.0, 0.95, 0.2, 0.05, key=f"cam_threshold_{prefix}")
    region_style = col_region.radio("Strongest region", ["off", "outline", "box"], horizontal=True,
                                    key=f"cam_region_{prefix}")
    title = spec.output_title(target)
    shown_as = "any class (class-independent)" if method in CLASS_INDEPENDENT else f"'{title}'"
    fresh = not analysis.has_heatmap(target, method)
    try:
        with st.spinner(f"Computing {method} for {title}..."):
            heatmap = analysis.heatmap(target, method)
    except Exception as exc:  # noqa: BLE001 - a failed heatmap must not take the page down
        logger.error("CAM %s failed for %s: %s", method, spec.key, type(exc).__name__)
        st.error(f"{method} could not be computed for this image ({type(exc).__name__}); try another method.")
        return
    _count("cam_runs", int(fresh))
    with viewer:
        rgb = viewer_image(spec, analysis, prefix, _rgb(analysis))
        blended = overlay(rgb, heatmap.placed, opacity, colormap, threshold)
        blended[heatmap.outside] = rgb[heatmap.outside]  # outside the model's crop: the image as it is
        region = locate(heatmap.placed) if region_style != "off" else None
        if region is not None:
            blended = draw_region(blended, region, region_style)
        left_title = "As read" if rgb is _rgb(analysis) else "In the display window"
        overlay_png = png_bytes(blended)  # shown in the viewer and offered as the download: encoded once
        st.plotly_chart(synced_viewer(png_bytes(rgb), overlay_png, rgb.shape[:2], left_title, f"{method} for {shown_as}"),
                        config=VIEWER_CONFIG, key=f"viewer_{prefix}")
        reading = st.empty()  # the faithfulness line, filled last
    if region is not None:
        st.caption(f"Strongest region: where the heatmap reaches {LOCALISATION_THRESHOLD:.0%} of its maximum, around "
                   f"its peak ({region.area:.0%} of the image). A weak localisation, not a segmentation.")
    if analysis.input.cropped:
        top, bottom, left, right = analysis.input.region
        st.caption(f"The model looked at rows {top}-{bottom} and columns {left}-{right} of this image (its border crop); "
                   "outside them the heatmap is empty because the model never saw those pixels.")
    if method in notes:
        st.caption(f"{method}: {notes[method]}. " + ("It shows what the layer responds to most, whichever class is "
                   "chosen." if method in CLASS_INDEPENDENT else "Its map changed little when the model's layers were "
                   "randomised (Model cards page): read it as image structure rather than the model's evidence."))
    st.caption(f"Heatmaps are coarse ({heatmap_resolution(classifier)}, smoothed to the image; outside the body "
               "suppressed) and normalised per image: red marks where this image's evidence is strongest, not how "
               "strong it is. They show what drove the model, not where disease is.")
    stem = f"secondlook-{spec.key}-{target}-{method.lower().replace('+', 'plus')}"
    col_png, col_pdf = st.columns(2)
    col_png.download_button("Download the overlay (PNG)", data=overlay_png, mime="image/png", on_click="ignore",
                            file_name=f"{stem}.png", key=f"cam_download_{prefix}")
    # The PDF is made when the reader clicks (on another thread), with whatever was measured by then.
    pdf = partial(report_pdf, classifier, analysis, rgb, blended, target, method)
    col_pdf.download_button("Download a one-page report (PDF)", mime="application/pdf", on_click="ignore",
                            data=pdf, file_name=f"{stem}-report.pdf", key=f"cam_report_{prefix}")
    if source is not None:
        image_downloads(analysis, source, blended, f"{method} for {shown_as}", pdf, prefix)
    if heatmap.empty:
        reading.info(f"{method} finds no region that raises the score of '{title}' in this image.")
        return
    fresh = analysis.faithfulness_if_measured(target, method) is None
    try:
        with st.spinner("Measuring how faithful this heatmap is..."):
            faith = analysis.faithfulness(target, method)
    except Exception as exc:  # noqa: BLE001 - the heatmap stays on screen without its score
        logger.error("ROAD failed for %s: %s", spec.key, type(exc).__name__)
        return
    _count("road_runs", int(fresh))
    reading.markdown(faith.reading(title))


def report_pdf(classifier: Classifier, analysis: Analysis, rgb: np.ndarray, blended: np.ndarray, target: str,
               method: str) -> bytes:
    """The one-page PDF of what the reader sees (see `core.report`)."""
    title = classifier.spec.output_title(target)
    faith = analysis.faithfulness_if_measured(target, method)
    return render_pdf(ReportContent(image=rgb, overlay=blended, prediction=analysis.prediction, card=classifier.card,
                                    upload_hash=analysis.digest, explained=title, method=method,
                                    faithfulness=faith.reading(title) if faith is not None else None,
                                    notes=report_notes(analysis)))


def report_notes(analysis: Analysis) -> tuple[str, ...]:
    """Extra report lines: a multi-label model's findings; the stability check, where it was run."""
    notes = []
    if analysis.prediction.findings:
        notes.append("Findings (independent, own thresholds): " + "; ".join(
            f"{f.title} {f.probability:.0%} ({'unreliable' if f.unreliable else 'above' if f.above_threshold else 'below'}"
            f" {f.threshold:.2f})" for f in analysis.prediction.findings))
    spread = analysis.stability_checked
    if spread is not None:
        notes.append(f"Stability: {spread.summary(analysis.prediction.index)}")
    return tuple(notes)


def render_task_page(page: str) -> None:
    """The whole screen for one app page (see `core.tasks.PAGES`)."""
    st.title(page)
    disclaimer()
    col_model, col_upload = st.columns([2, 3])
    with col_model:
        spec = choose_model(tasks_for_page(page), page)
    try:
        classifier = get_classifier(spec.key)
    except (WeightsError, ValueError) as exc:
        plain.model_unavailable(spec.title, spec.key, exc)
        return
    studies = accepts_studies(spec)
    with col_upload:
        uploads = st.file_uploader(f"Upload a scan: {UPLOAD_TYPES_HELP}" + (f"; {STUDY_TYPES_HELP}" if studies else ""),
                                   type=None, accept_multiple_files=True, key=f"upload_{page}")
    if not uploads:
        st.info("Upload one image to see the model's prediction and heatmap" + (", or a whole series for a study call"
                if studies else "") + ". Nothing you upload is stored.")
        card_summary(classifier.card)
        return
    if len(uploads) > 1 or is_study(uploads[0].getvalue(), uploads[0].name):
        if studies:
            render_study_view(classifier, uploads, SlicePanels(cam_panel, viewer_image))
            card_summary(classifier.card)
        else:
            st.error("This page reads one image at a time. For several files or a ZIP, use the Batch page.")
        return
    uploaded = uploads[0]
    result = analyse_upload(classifier, uploaded.getvalue(), uploaded.name)
    if isinstance(result, str):
        plain.error(result)
        return
    message = plane_mismatch(result.scan, spec)
    if message:
        plain.warning(message)
    if result.prediction.guard.refused and not confirm_flagged(spec, result):
        show_scan_notes(result, spec)
        return
    col_view, col_answer = st.columns([3, 2], gap="medium")
    with col_answer:
        show_answer(classifier, result)
    with col_view:
        cam_panel(classifier, result, image_source(uploaded.getvalue(), uploaded.name))
    if result.prediction.findings:
        show_findings_table(classifier, result.prediction)
    stability_panel(classifier, result)
    feedback_form(classifier, result)
    show_scan_notes(result, spec)
    card_summary(classifier.card)


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
            plain.failure("Your read could not be saved; the server's log says why.", exc, "feedback not saved")
            return
        logger.info("feedback %s on upload %s: %s", card.key, analysis.digest, verdict)
        st.success(f"Saved: {verdict}. Stored on this server in {path.name} (the image hash, model, verdict and comment; "
                   "never the image). The server's administrator can export it from the Model cards page.")


def confirm_flagged(spec: TaskSpec, analysis: Analysis) -> bool:
    """Say why the scan was not classified; True only if the reader asks to see the output anyway."""
    st.warning("Not classified.", icon="🚫")
    st.text(analysis.prediction.guard.reason or "")
    return st.checkbox(
        "Show the model's output anyway (it was not trained for this image; the output is probably meaningless)",
        key=f"override_{spec.key}_{analysis.digest}",
    )
