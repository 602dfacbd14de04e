"""Reusable pieces of the screens: banners, the probability chart, card summaries."""

from __future__ import annotations

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

from core.cards import ModelCard
from core.predict import Prediction

# The file behind each page of core.tasks.PAGES (Streamlit discovers them in pages/).
PAGE_FILES: dict[str, str] = {
    "Brain MRI": "pages/1_Brain_MRI.py",
    "Chest X-ray": "pages/2_Chest_X-ray.py",
    "Lung CT": "pages/3_Lung_CT.py",
}

DISCLAIMER = (
    "**For research and education only — not for diagnosis.** SecondLook is not a medical device. "
    "Its output must not guide the care of a patient."
)


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG file bytes, in memory (no metadata: nothing but pixels)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("the overlay could not be encoded as PNG")
    return encoded.tobytes()


def disclaimer() -> None:
    """The notice shown on every page."""
    st.warning(DISCLAIMER, icon="⚠️")


def probability_chart(prediction: Prediction) -> go.Figure:
    """Horizontal bar chart of calibrated probabilities, with the operating threshold if any."""
    labels = list(prediction.labels)
    values = [float(p) for p in prediction.probabilities]
    colors = ["#d62728" if i == prediction.index else "#7f7f7f" for i in range(len(labels))]
    figure = go.Figure(go.Bar(x=values, y=labels, orientation="h", marker_color=colors,
                              text=[f"{v:.1%}" for v in values], textposition="auto"))
    if prediction.threshold is not None and prediction.positive is not None:
        figure.add_vline(x=prediction.threshold, line_dash="dash",
                         annotation_text=f"{prediction.positive} threshold {prediction.threshold:.2f}")
    figure.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%", title="calibrated probability"),
                         yaxis=dict(autorange="reversed"), height=80 + 45 * len(labels),
                         margin=dict(l=10, r=10, t=30, b=10))
    return figure


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def card_summary(card: ModelCard) -> None:
    """Model name, version and held-out figures, with an expander for the rest of the card."""
    m = card.metrics
    st.caption(
        f"Model: **{card.name}**, version {card.version} ({card.arch}). Held-out {m.get('split', 'test')} split "
        f"(n={m.get('n', 'n/a')}): accuracy {_fmt(m.get('accuracy'))}, balanced accuracy "
        f"{_fmt(m.get('balanced_accuracy'))}, macro-F1 {_fmt(m.get('macro_f1'))}, ROC-AUC {_fmt(m.get('roc_auc'))}."
    )
    with st.expander("About this model"):
        st.markdown(f"**Trained on:** {card.data.get('trained_on', '')}")
        st.markdown(f"**Source:** {card.data.get('source', '')} — licence: {card.data.get('licence', '')}")
        st.markdown(f"**Split:** {card.split.get('method', '')}")
        if card.threshold is not None:
            at = m.get("at_threshold", {})
            st.markdown(
                f"**Operating threshold:** {card.positive} at {card.threshold:.3f} ({card.threshold_rule}); on the "
                f"held-out split sensitivity {_fmt(at.get('sensitivity'))}, specificity {_fmt(at.get('specificity'))}."
            )
        st.markdown(f"**Calibration:** temperature {card.temperature:.3f}; held-out ECE {_fmt(m.get('ece'))}.")
        st.markdown(f"**Intended use:** {card.intended_use}")
        if card.limitations:
            st.markdown("**Known limitations:**\n" + "\n".join(f"- {item}" for item in card.limitations))
        st.caption(f"sha256 {card.sha256}")
