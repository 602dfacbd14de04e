"""Reusable pieces of the screens: banners, the probability chart, card summaries."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pandas  # noqa: F401 - see below
import plotly.graph_objects as go
import streamlit as st

# plotly imports pandas lazily, the first time a figure is built, and hands out whatever is in
# sys.modules: with several sessions building their first chart at once, one thread got the
# half-imported module of another ("partially initialized module 'pandas' has no attribute
# 'Series'", found by `python -m benchmarks.load`). Importing it here, under the import lock,
# finishes it before any session can build a figure.

from plotly.subplots import make_subplots

from core.cards import Confusion, ModelCard, Reliability, RocCurve
from core.decision import Prediction
from core.report import DISCLAIMER_BODY, DISCLAIMER_LEAD
from core.tasks import TaskSpec, get_task
from core.uncertainty import Spread

# Plotly toolbar for image viewers: wheel zoom on, nothing that talks to a server.
VIEWER_CONFIG = {"scrollZoom": True, "displaylogo": False, "modeBarButtonsToRemove": ["toImage", "select2d", "lasso2d"]}

DISCLAIMER = f"**{DISCLAIMER_LEAD.replace(' - ', ' — ')}** {DISCLAIMER_BODY}"  # the report's wording, in markdown


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG file bytes, in memory (no metadata: nothing but pixels)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("the overlay could not be encoded as PNG")
    return encoded.tobytes()


def disclaimer() -> None:
    """The notice shown on every page."""
    st.warning(DISCLAIMER, icon="⚠️")


CALLED, OTHER, GROUP = "#d62728", "#8c8c8c", "#ff9896"


def probability_chart(prediction: Prediction, spec: TaskSpec) -> go.Figure:
    """Horizontal bars of the calibrated probabilities; the threshold marked only on the bar it applies to.

    A grouped positive (pneumonia = bacterial + viral) gets its own bar first, with the summed
    probability the threshold reads; the called bars are red, so chart, headline and call agree.
    """
    names = [spec.output_title(label) for label in prediction.labels]
    values = [float(p) for p in prediction.probabilities]
    colors = [CALLED if i == prediction.index and not prediction.uncertain else OTHER for i in range(len(names))]
    marked = prediction.labels.index(prediction.positive) if prediction.positive in prediction.labels else None
    if prediction.grouped:
        names.insert(0, f"{spec.positive_label} (sum)")
        values.insert(0, float(prediction.positive_probability))
        colors.insert(0, CALLED if prediction.called_positive and not prediction.uncertain else GROUP)
        marked = 0
    figure = go.Figure(go.Bar(x=values, y=names, orientation="h", marker_color=colors, cliponaxis=False,
                              text=[f"{v:.1%}" for v in values], textposition="outside"))
    if prediction.threshold is not None and marked is not None:
        figure.add_trace(go.Scatter(x=[prediction.threshold], y=[names[marked]], mode="markers", hoverinfo="text",
                                    hovertext=[f"threshold {prediction.threshold:.2f}"],
                                    marker=dict(symbol="line-ns-open", size=26, line_width=3, color="#1f77b4")))
    figure.update_layout(xaxis=dict(range=[0, 1.18], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=".0%",
                                    title="calibrated probability" + (" (| = threshold)" if marked is not None
                                                                      and prediction.threshold is not None else "")),
                         yaxis=dict(autorange="reversed", automargin=True), height=70 + 38 * len(names),
                         showlegend=False, margin=dict(l=10, r=10, t=10, b=10))
    return figure


def findings_chart(prediction: Prediction) -> go.Figure:
    """Horizontal bars of each independent finding's probability, its threshold marked on its own bar."""
    findings = prediction.findings
    titles = [f.title for f in findings]
    values = [f.probability for f in findings]
    colors = ["#d9d9d9" if f.unreliable else CALLED if f.present else OTHER for f in findings]
    figure = go.Figure(go.Bar(x=values, y=titles, orientation="h", marker_color=colors, name="probability",
                              text=[f"{v:.1%}" + (" (unreliable)" if f.unreliable else "") for v, f in zip(values, findings)],
                              textposition="outside", cliponaxis=False))
    figure.add_trace(go.Scatter(x=[f.threshold for f in findings], y=titles, mode="markers", name="threshold",
                                marker=dict(symbol="line-ns-open", size=22, line_width=3, color="#1f77b4")))
    figure.update_layout(xaxis=dict(range=[0, 1.3], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=".0%",
                                    title="calibrated probability (| = threshold)"),
                         yaxis=dict(autorange="reversed", automargin=True), height=70 + 34 * len(titles),
                         showlegend=False, margin=dict(l=10, r=10, t=10, b=10))
    return figure


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def card_summary(card: ModelCard) -> None:
    """Model name, version and held-out figures, with an expander for the rest of the card."""
    m = card.test_figures
    st.caption(
        f"Model: **{card.name}**, version {card.version} ({card.arch}). Held-out {m.split} split "
        f"(n={m.n}): accuracy {_fmt(m.accuracy)}, balanced accuracy "
        f"{_fmt(m.balanced_accuracy)}, macro-F1 {_fmt(m.macro_f1)}, ROC-AUC {_fmt(m.roc_auc)}."
    )
    with st.expander("About this model"):
        if card.data is not None:
            st.markdown(f"**Trained on:** {card.data.trained_on}")
            st.markdown(f"**Source:** {card.data.source} — licence: {card.data.licence}")
        if card.split is not None:
            st.markdown(f"**Split:** {card.split.method}")
        if card.threshold is not None:
            at = m.at_threshold
            st.markdown(
                f"**Operating threshold:** {get_task(card.key).positive_title} at {card.threshold:.3f} ({card.threshold_rule}); on the "
                f"held-out split sensitivity {_fmt(at and at.sensitivity)}, specificity {_fmt(at and at.specificity)}."
            )
        st.markdown(f"**Calibration:** temperature {card.temperature:.3f}; held-out ECE {_fmt(m.ece)}.")
        st.markdown(f"**Intended use:** {card.intended_use}")
        if card.limitations:
            st.markdown("**Known limitations:**\n" + "\n".join(f"- {item}" for item in card.limitations))
        st.caption(f"sha256 {card.sha256}")


def png_data_uri(png: bytes) -> str:
    """PNG bytes -> a data: URI (how plotly shows an image without a pixel list)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def synced_viewer(left_png: bytes, right_png: bytes, size: tuple[int, int], left_title: str,
                  right_title: str) -> go.Figure:
    """Two images (PNG bytes, both `size` = (height, width)) side by side whose zoom and pan move
    together (matched plotly axes). Drag to zoom a box, scroll to zoom, double-click to reset;
    the other panel follows. Taking PNG bytes lets the caller reuse them for a download.
    """
    height, width = size
    figure = make_subplots(rows=1, cols=2, subplot_titles=(left_title, right_title), horizontal_spacing=0.02)
    figure.add_trace(go.Image(source=png_data_uri(left_png), name="image"), row=1, col=1)
    figure.add_trace(go.Image(source=png_data_uri(right_png), name="overlay"), row=1, col=2)
    figure.update_xaxes(showticklabels=False, range=[-0.5, width - 0.5])
    figure.update_yaxes(showticklabels=False, range=[height - 0.5, -0.5], scaleanchor="x")
    figure.update_layout(xaxis2=dict(matches="x"), yaxis2=dict(matches="y", scaleanchor="x2"), dragmode="zoom",
                         height=430, margin=dict(l=0, r=0, t=30, b=0), hovermode=False)
    return figure


def spread_chart(spread: Spread, index: int) -> go.Figure:
    """Box plot of each class's probability over the test-time-augmented views, the original marked."""
    figure = go.Figure()
    for i, label in enumerate(spread.labels):
        figure.add_trace(go.Box(x=spread.views[:, i], name=label, boxpoints="all", jitter=0.3, pointpos=0,
                                marker_color="#d62728" if i == index else "#7f7f7f", orientation="h",
                                showlegend=False))
    figure.add_trace(go.Scatter(x=spread.original, y=list(spread.labels), mode="markers", name="as uploaded",
                                marker=dict(symbol="diamond", size=11, color="black")))
    figure.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%", title="calibrated probability per view"),
                         yaxis=dict(autorange="reversed"), height=80 + 55 * len(spread.labels),
                         margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.15))
    return figure


def roc_figure(curves: dict[str, RocCurve], threshold_point: tuple[float, float] | None = None) -> go.Figure:
    """ROC curves from a card (`appraisal.roc`), with the operating point if given (fpr, tpr)."""
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#aaaaaa"),
                                name="chance", hoverinfo="skip"))
    for label, curve in curves.items():
        figure.add_trace(go.Scatter(x=curve.fpr, y=curve.tpr, mode="lines", customdata=curve.threshold,
                                    name=f"{label} (AUC {curve.auc:.3f})",
                                    hovertemplate="1 - specificity %{x:.3f}<br>sensitivity %{y:.3f}"
                                                  "<br>threshold %{customdata:.3f}<extra></extra>"))
    if threshold_point is not None:
        figure.add_trace(go.Scatter(x=[threshold_point[0]], y=[threshold_point[1]], mode="markers",
                                    marker=dict(size=12, symbol="x", color="black"), name="operating threshold"))
    figure.update_layout(xaxis=dict(title="1 - specificity", range=[0, 1]), yaxis=dict(title="sensitivity", range=[0, 1.02]),
                         height=380, margin=dict(l=10, r=10, t=30, b=10), legend=dict(x=0.45, y=0.05))
    return figure


def reliability_figure(bins: Reliability) -> go.Figure:
    """Reliability diagram from a card (`appraisal.reliability`): accuracy against confidence per bin."""
    edges = bins.edges
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    shown = [i for i, count in enumerate(bins.count) if count]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#aaaaaa"),
                                name="perfect calibration", hoverinfo="skip"))
    figure.add_trace(go.Bar(x=[centres[i] for i in shown], y=[bins.accuracy[i] for i in shown],
                            width=(edges[1] - edges[0]) * 0.9, name="accuracy in bin", marker_color="#1f77b4",
                            customdata=[bins.count[i] for i in shown],
                            hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.3f}<br>%{customdata} images<extra></extra>"))
    figure.add_trace(go.Scatter(x=[bins.confidence[i] for i in shown], y=[bins.accuracy[i] for i in shown],
                                mode="markers", name="mean confidence", marker=dict(color="black")))
    figure.update_layout(xaxis=dict(title="top-class calibrated probability", range=[0, 1]),
                         yaxis=dict(title="accuracy", range=[0, 1.02]), height=380,
                         margin=dict(l=10, r=10, t=30, b=10), legend=dict(x=0.02, y=0.98))
    return figure


def confusion_figure(confusion: Confusion) -> go.Figure:
    """Confusion matrix heatmap (rows: true class, columns: decided class), counts and row shares."""
    matrix = np.asarray(confusion.matrix, dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    text = [[f"{int(matrix[i, j])}<br>{shares[i, j]:.0%}" for j in range(matrix.shape[1])] for i in range(matrix.shape[0])]
    figure = go.Figure(go.Heatmap(z=shares, x=confusion.labels, y=confusion.labels, text=text,
                                  texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1, showscale=False,
                                  hovertemplate="true %{y}<br>called %{x}<br>%{text}<extra></extra>"))
    figure.update_layout(xaxis=dict(title="model's call", side="bottom"), yaxis=dict(title="true class", autorange="reversed"),
                         height=120 + 60 * len(confusion.labels), margin=dict(l=10, r=10, t=30, b=10))
    return figure
