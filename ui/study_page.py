"""The study view of a task page: a whole series in, the study call, a slice scroller with its strip, heatmaps.

A task page sends an upload here when it is a study (several files, a ZIP, a NIfTI volume or a
multi-frame DICOM; `core.study.is_study`). The upload is read once per session (`core.study.
read_upload`), the series the model suits is chosen (the reader may take another), and every
slice goes through the model with a progress bar (`core.study.analyse_series`). On screen:

- the study call with its probabilities, its rule and the figures its card gives for it;
- a per-slice probability strip (plotly): the slice and study thresholds drawn, key slices in red,
  the shown slice marked; a click on a bar shows that slice;
- a slice scroller: the slider (focus it and use the arrow keys), previous / next, and one button
  per key slice;
- the shown slice in the display window presets, and on demand its heatmap with every control of
  the single-image page (the task page hands over its `cam_panel` and `viewer_image`, so this module
  does not import it back; computed once per slice, output and method);
- the series listing (plain table), the left-outs and the warnings (plain text), the study report (PDF);
- its DICOM outputs, and "Send results to archive" for a study the Archive page opened (`ui.dicom_downloads`).

Per-session results live in `st.session_state` (never `st.cache_data`). Untrusted text (file
names, series descriptions) appears only in `st.dataframe` cells, never in Markdown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from core.models import Classifier
from core.pipeline import Analysis, Refusal
from core.preprocess import display_rgb
from core.report import render_study_pdf
from core.series import Study, StudyError
from core.study import (
    StudyAnalysis,
    analyse_series,
    read_upload,
    series_label,
    study_report_content,
    upload_digest,
)
from core.tasks import TaskSpec
from ui.dicom_downloads import study_downloads
from ui.widgets import findings_chart, probability_chart

logger = logging.getLogger(__name__)

STUDY_MODALITIES = frozenset({"CT", "MR"})  # models that read slices of a series (not X-ray projections)
MAX_ANALYSES = 2  # series analyses a session keeps (the one shown and the one before)
STRIP_CONFIG = {"displayModeBar": False}  # nothing to zoom: a click picks a slice
KEY_COLOR, SLICE_COLOR, SHOWN_COLOR = "#d62728", "#9e9e9e", "#1f77b4"
LINE_COLOR = "#8c8c8c"  # the guard's marks: visible on the light and the dark theme
SLICE_THRESHOLD_COLOR = "#17becf"


@dataclass(frozen=True)
class SlicePanels:
    """The task page's viewers a study slice is shown with (handed over: this module never imports the page).

    Attributes:
        cam_panel: (classifier, analysis) -> None: the heatmap viewer with every CAM control.
        viewer_image: (spec, analysis, key prefix, rgb) -> rgb: the slice in the display window presets.
    """

    cam_panel: Callable[[Classifier, Analysis], None]
    viewer_image: Callable[[TaskSpec, Analysis, str, np.ndarray], np.ndarray]


def accepts_studies(spec: TaskSpec) -> bool:
    """Whether the model reads slices of a series (CT, MR), so a study upload goes to the study view."""
    return bool(STUDY_MODALITIES & set(spec.modalities))


def _count(name: str, by: int = 1) -> None:
    """Per-session counters of model work (tests read them)."""
    if by:
        st.session_state[name] = st.session_state.get(name, 0) + by


def session_study(spec: TaskSpec, files: list) -> tuple[Study, str] | str:
    """The uploads read as a study and their digest, once per session (only the one on screen is kept);
    a string is the message for an upload that cannot be read.

    Keyed by Streamlit's id of each uploaded file, so scrolling never copies or hashes the upload again.
    """
    modality = spec.modalities[0] if len(spec.modalities) == 1 else None
    signature = (tuple(f.file_id for f in files), modality)
    held = st.session_state.get("study")
    if held is not None and held["signature"] == signature:
        return held["study"], held["digest"]
    st.session_state.pop("study", None)  # the previous upload's pixels go before the next are read
    st.session_state.pop("study_analyses", None)
    uploads = [(f.name, f.getvalue()) for f in files]
    digest = upload_digest(uploads)
    try:
        with st.spinner("Reading the study..."):
            study = read_upload(uploads, spec)
    except StudyError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - the page must survive any upload; the type is logged, not the file
        logger.error("study %s could not be read: %s", digest, type(exc).__name__)
        return f"This upload could not be read as a study (internal error: {type(exc).__name__})."
    st.session_state["study"] = {"signature": signature, "digest": digest, "study": study}
    return study, digest


def session_analysis(classifier: Classifier, study: Study, index: int, digest: str) -> StudyAnalysis | Refusal:
    """The series through the model, once per session per (model, series), with a progress bar."""
    store: dict = st.session_state.setdefault("study_analyses", {})
    key = (digest, classifier.spec.key, index)
    if key in store:
        store[key] = store.pop(key)  # most recent last
        return store[key]
    n = len(study.series[index])
    bar = st.progress(0.0, text=f"Reading {n} slices with the model...")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"{done} of {total} slices read by the model")

    outcome = analyse_series(classifier, study, index, digest=digest, progress=progress)
    bar.empty()
    if isinstance(outcome, StudyAnalysis):
        _count("study_runs")
        _count("forward_passes", len(outcome))
        store[key] = outcome
        while len(store) > MAX_ANALYSES:
            store.pop(next(iter(store)))
    return outcome


def strip_figure(analysis: StudyAnalysis, shown: int) -> go.Figure:
    """Per-slice probability of the thresholded class as bars; key slices red, the shown slice outlined,
    the slice model's threshold dashed and the study threshold dotted."""
    spec, card, rule = analysis.classifier.spec, analysis.classifier.card, analysis.rule
    scores = analysis.scores
    numbers = list(range(1, len(scores) + 1))
    keys = set(analysis.key_slices)
    colors = [KEY_COLOR if i in keys else SLICE_COLOR for i in range(len(scores))]
    outline = [2.5 if i == shown else 0 for i in range(len(scores))]
    subject = rule.positive_label or spec.output_title(analysis.prediction.label)
    refused = [i for i, verdict in enumerate(analysis.verdicts) if verdict.refused]
    figure = go.Figure(go.Bar(
        x=numbers, y=[float(s) for s in scores], marker=dict(color=colors, line=dict(width=outline, color=SHOWN_COLOR)),
        name=f"P({subject})", hovertemplate="slice %{x}<br>%{y:.1%}<extra></extra>"))
    if refused:
        figure.add_trace(go.Scatter(x=[i + 1 for i in refused], y=[1.02] * len(refused), mode="markers",
                                    marker=dict(symbol="x", size=7, color=LINE_COLOR), name="outside the guard's range",
                                    hoverinfo="skip"))
    if rule.positive == card.positive and card.threshold is not None:
        figure.add_hline(y=card.threshold, line=dict(dash="dash", color=SLICE_THRESHOLD_COLOR, width=1.5))
    if rule.threshold is not None:
        figure.add_hline(y=rule.threshold, line=dict(dash="dot", color=KEY_COLOR, width=1.5))
    figure.add_vline(x=shown + 1, line=dict(color=SHOWN_COLOR, width=1))
    figure.update_layout(height=190, margin=dict(l=10, r=10, t=20, b=10), showlegend=False, bargap=0.05,
                         xaxis=dict(title="slice (anatomical order)", range=[0.5, len(scores) + 0.5]),
                         yaxis=dict(range=[0, 1.06], tickformat=".0%", title=None), clickmode="event+select",
                         dragmode=False)
    return figure


def strip_legend(analysis: StudyAnalysis) -> str:
    """What the strip shows, in one line (plain words and numbers)."""
    card, rule = analysis.classifier.card, analysis.rule
    parts = ["Per-slice probability; red bars: key slices; outlined: the slice shown; click a bar to show it"]
    if rule.positive == card.positive and card.threshold is not None:
        parts.append(f"dashed blue: the slice model's threshold {card.threshold:.2f}")
    if rule.threshold is not None:
        parts.append(f"dotted red: the study threshold {rule.threshold:.2f} (it applies to the study score, "
                     f"{analysis.call.score:.2f} here, not to any one slice)")
    if any(verdict.refused for verdict in analysis.verdicts):
        parts.append("x: slices outside what the model was trained on")
    return "; ".join(parts) + "."


def _go_to(slider: str, number: int) -> None:
    """Show slice `number` (1-based): a callback, so it runs before the slider is drawn."""
    st.session_state[slider] = int(number)


def _step(slider: str, by: int, count: int) -> None:
    st.session_state[slider] = int(min(max(st.session_state.get(slider, 1) + by, 1), count))


def _strip_clicked(strip: str, slider: str, count: int) -> None:
    """A click on the strip: show the clicked slice."""
    event = st.session_state.get(strip) or {}
    points = (event.get("selection") or {}).get("points") or []
    if not points:
        return
    point = points[0]
    number = point.get("x") if isinstance(point.get("x"), (int, float)) else (point.get("point_index", 0) + 1)
    st.session_state[slider] = int(min(max(round(number), 1), count))


def slice_scroller(analysis: StudyAnalysis, prefix: str) -> int:
    """The strip, the slider, previous / next and the key slice buttons; returns the shown slice's index."""
    count = len(analysis)
    slider = f"study_slice_{prefix}"
    strip = f"study_strip_{prefix}"
    if slider not in st.session_state:
        st.session_state[slider] = analysis.key_slices[0] + 1  # open on the most suspicious slice
    shown = int(st.session_state[slider]) - 1
    st.plotly_chart(strip_figure(analysis, shown), key=strip, config=STRIP_CONFIG, on_select=partial(
        _strip_clicked, strip, slider, count), selection_mode="points")
    st.caption(strip_legend(analysis))
    if count > 1:
        st.slider("Slice", 1, count, key=slider, help="Click the slider, then use the arrow keys to step through "
                                                      "the slices (Home / End: first / last).")
    col_prev, col_next, *col_keys = st.columns([1, 1] + [1] * len(analysis.key_slices))
    col_prev.button("◀ Previous", key=f"study_prev_{prefix}", on_click=_step, args=(slider, -1, count),
                    disabled=shown == 0)
    col_next.button("Next ▶", key=f"study_next_{prefix}", on_click=_step, args=(slider, 1, count),
                    disabled=shown == count - 1)
    for rank, (column, index) in enumerate(zip(col_keys, analysis.key_slices), start=1):
        column.button(f"Key slice {index + 1}", key=f"study_key_{rank}_{prefix}", on_click=_go_to,
                      args=(slider, index + 1), type="primary" if index == shown else "secondary",
                      help=f"Key slice #{rank}: {analysis.scores[index]:.1%}")
    return int(st.session_state[slider]) - 1


def show_slice(classifier: Classifier, analysis: StudyAnalysis, index: int, prefix: str, panels: SlicePanels) -> None:
    """The shown slice: as read in the display window, or with its heatmap and every CAM control."""
    spec = classifier.spec
    slice_analysis = analysis.slice_analysis(index)
    verdict = analysis.verdicts[index]
    rank = analysis.key_slices.index(index) + 1 if index in analysis.key_slices else None
    subject = analysis.rule.positive_label or spec.output_title(analysis.prediction.label)
    line = (f"Slice {index + 1} of {len(analysis)}: P({subject}) {analysis.scores[index]:.1%}"
            + (f", key slice #{rank}" if rank else "")
            + (". The guard finds this slice outside what the model was trained on." if verdict.refused else "."))
    st.text(line)
    # The page's display cache holds one image per analysis digest, and a series' slices share one (so the
    # heatmap controls keep their settings from slice to slice): drop it when the page is drawn anew.
    st.session_state.get("display_rgb", {}).pop(slice_analysis.digest, None)
    if st.toggle("Heatmap of this slice", key=f"study_heatmap_{prefix}",
                 help="Computed once per slice, output and method; the controls stay as set from slice to slice."):
        panels.cam_panel(classifier, slice_analysis)
        return
    rgb = panels.viewer_image(spec, slice_analysis, f"{spec.key}_{slice_analysis.digest}", display_rgb(slice_analysis.scan))
    st.image(rgb, width="stretch")


def show_study_answer(classifier: Classifier, analysis: StudyAnalysis, prefix: str) -> None:
    """The study call, its probabilities, its rule and its card's figures, findings, and the PDF."""
    spec, prediction, rule = classifier.spec, analysis.prediction, analysis.rule
    st.subheader(f"Study call: {prediction.headline_text()}")
    st.caption(f"{series_label(analysis.series, analysis.index)}, {len(analysis)} slices read by the model in "
               f"{analysis.seconds:.1f} s.")
    if prediction.guard.warned:
        st.warning("Borderline series.", icon="⚠️")
        st.text(prediction.guard.reason or "")
    st.plotly_chart(probability_chart(prediction, spec), key=f"study_probs_{prefix}", config={"displayModeBar": False})
    st.caption(f"Study call: {rule.describe()}. {rule.note}")
    if prediction.findings:
        present = [f.title for f in prediction.findings if f.present]
        st.markdown("**Findings in the study** (the highest slice probability of each, against its threshold): "
                    + (", ".join(present) + " above threshold." if present else "none called present."))
        st.plotly_chart(findings_chart(prediction), key=f"study_findings_{prefix}", config={"displayModeBar": False})
        unreliable = [f"{f.title}: {f.unreliable}" for f in prediction.findings if f.unreliable]
        if unreliable:
            st.caption("Never called present (greyed): " + "; ".join(unreliable) + ".")
    st.download_button("Download the study report (PDF)", mime="application/pdf", on_click="ignore",
                       data=partial(study_pdf, analysis), file_name=f"secondlook-{spec.key}-study-report.pdf",
                       key=f"study_report_{prefix}")
    study_downloads(analysis, prefix)


def study_pdf(analysis: StudyAnalysis) -> bytes:
    """The study report (key slices with their heatmaps), made when the reader clicks."""
    _count("study_reports")
    return render_study_pdf(study_report_content(analysis))  # the card's most faithful CAM method


def show_series(classifier: Classifier, study: Study, analysis: StudyAnalysis | None, index: int, digest: str) -> None:
    """The upload's series (a plain table), the left-outs and the warnings as plain text."""
    choice = study.choose(classifier.spec)
    rows = []
    for row in study.listing():
        rows.append({"shown": "yes" if row["index"] == index else "", "default": "yes" if row["index"] == choice.index
                     else "", **{k: v for k, v in row.items() if k != "index"}})
    st.markdown("**Series in this upload**")
    st.dataframe(rows, hide_index=True)
    st.text(f"Chosen by default: {choice.reason}")
    left = (analysis.left_out if analysis is not None else study.series[index].left_out + study.left_out)
    if left:
        st.text("Left out: " + "; ".join(f"{item.count} {item.reason}" for item in left))
    warnings = analysis.warnings if analysis is not None else study.warnings + study.series[index].warnings
    for warning in warnings:
        st.text(f"Warning: {warning}")


def choose_series(classifier: Classifier, study: Study, digest: str) -> int | None:
    """The series to show: the model's default, or another the reader picks."""
    choice = study.choose(classifier.spec)
    usable = [i for i, series in enumerate(study.series) if series.refused is None and len(series)]
    if not usable:
        return None
    default = choice.index if choice.index in usable else usable[0]
    if len(usable) == 1:
        return default
    return st.selectbox("Series", usable, index=usable.index(default), key=f"study_series_{digest}_{classifier.spec.key}",
                        format_func=lambda i: series_label(study.series[i], i) + (" (default)" if i == choice.index
                                                                                  else ""))


def render_study_view(classifier: Classifier, files: list, panels: SlicePanels) -> None:
    """The whole study view for the uploads of a task page; `panels` are the task page's slice viewers."""
    spec = classifier.spec
    held = session_study(spec, files)
    if isinstance(held, str):
        st.error(held)
        return
    study, digest = held
    index = choose_series(classifier, study, digest)
    if index is None:
        st.error(study.choose(spec).reason)
        show_series(classifier, study, None, 0, digest)
        return
    outcome = session_analysis(classifier, study, index, digest)
    if isinstance(outcome, Refusal):
        st.error(outcome.reason if outcome.status == "rejected" else
                 f"This series could not be analysed ({outcome.reason}).")
        show_series(classifier, study, None, index, digest)
        return
    prefix = f"{digest}_{spec.key}_{index}"
    if outcome.prediction.guard.refused:
        st.warning("Not classified.", icon="🚫")
        st.text(outcome.prediction.guard.reason or "")
        if not st.checkbox("Show the model's output anyway (it was not trained for this series; the output is "
                           "probably meaningless)", key=f"study_override_{prefix}"):
            show_series(classifier, study, outcome, index, digest)
            return
    col_view, col_answer = st.columns([3, 2], gap="medium")
    with col_answer:
        show_study_answer(classifier, outcome, prefix)
    with col_view:
        shown = slice_scroller(outcome, prefix)
        show_slice(classifier, outcome, shown, prefix, panels)
    show_series(classifier, study, outcome, index, digest)
