"""One-page PDF report of a single analysis: image, heatmap, probabilities, threshold, model identity.

No patient identifiers go in: not the file name (exports are often named after the patient),
no free DICOM tag value, only the upload's short hash. A tag value reaches the page only inside the
wrong-input guard's reason, which names modality and body part in the fixed words of
`core.vocabulary` ("another body part" for anything else). The PDF is built in memory with matplotlib's
PDF backend (standard Helvetica, so the text is plain in the file) and never touches disk.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from core.cards import ModelCard
from core.decision import Prediction
from core.tasks import get_task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The notice on every page of the app and on every report (`ui.widgets.disclaimer` shows it).
DISCLAIMER_LEAD = "For research and education only - not for diagnosis."
DISCLAIMER_BODY = "SecondLook is not a medical device. Its output must not guide the care of a patient."
DISCLAIMER = f"{DISCLAIMER_LEAD} {DISCLAIMER_BODY}"


@dataclass(frozen=True)
class ReportContent:
    """What goes on the page.

    Attributes:
        image: uint8 (H, W, 3) the scan as shown.
        overlay: uint8 (H, W, 3) the heatmap blended on it.
        prediction: The calibrated prediction.
        card: The model's card (name, version, sha256, threshold).
        upload_hash: Short hash of the upload (no file name).
        explained: Class the heatmap explains.
        method: CAM method.
        faithfulness: One-line faithfulness reading of the heatmap, if measured.
        notes: Extra lines (TTA spread, uncertainty, flags).
    """

    image: np.ndarray
    overlay: np.ndarray
    prediction: Prediction
    card: ModelCard
    upload_hash: str
    explained: str
    method: str
    faithfulness: str | None = None
    notes: tuple[str, ...] = ()


def render_pdf(content: ReportContent, when: datetime | None = None) -> bytes:
    """The one-page A4 report as PDF bytes.

    Args:
        content: What to show.
        when: Report time (default: now, UTC).

    Returns:
        Bytes of a one-page PDF.
    """
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    when = when or datetime.now(timezone.utc)
    with matplotlib.rc_context({"pdf.use14corefonts": True, "axes.unicode_minus": False}):
        figure = report_figure(content, when)
        buffer = io.BytesIO()
        # Fixed metadata: no user name, no host, nothing about the file.
        with PdfPages(buffer, metadata={"Title": "SecondLook report", "Creator": "SecondLook", "Producer": "SecondLook",
                                        "CreationDate": when}) as pdf:
            pdf.savefig(figure)
    return buffer.getvalue()


def report_figure(content: ReportContent, when: datetime) -> Figure:
    """The report page as a matplotlib Figure (A4 portrait); no pyplot, so no global state."""
    from matplotlib.figure import Figure

    card, prediction = content.card, content.prediction
    figure = Figure(figsize=(8.27, 11.69))  # A4 portrait, inches
    figure.text(0.06, 0.965, "SecondLook - second-opinion report", fontsize=16, weight="bold", va="top")
    figure.text(0.06, 0.94, when.strftime("%Y-%m-%d %H:%M UTC") + f"   upload {content.upload_hash}",
                fontsize=9, va="top")
    for position, picture, title in ((0.06, content.image, "Image as read"),
                                     (0.52, content.overlay, f"{content.method} for '{content.explained}'")):
        axes = figure.add_axes((position, 0.56, 0.42, 0.35))
        axes.imshow(picture)
        axes.set_title(title, fontsize=10)
        axes.axis("off")
    chart = figure.add_axes((0.25, 0.40, 0.65, 0.12))
    labels = list(prediction.labels)
    values = [float(v) for v in prediction.probabilities]
    colors = ["#d62728" if i == prediction.index else "#7f7f7f" for i in range(len(labels))]
    chart.barh(labels, values, color=colors)
    chart.invert_yaxis()
    chart.set_xlim(0, 1)
    chart.set_xlabel("calibrated probability", fontsize=9)
    for i, v in enumerate(values):
        chart.text(min(v + 0.01, 0.9), i, f"{v:.1%}", va="center", fontsize=8)
    if prediction.threshold is not None:
        chart.axvline(prediction.threshold, linestyle="--", color="black", linewidth=1)
    lines = [f"Model output: {prediction.headline_text()}"
             + (" (inside the indeterminate band)" if prediction.uncertain else "")]
    if prediction.threshold is not None:
        at = card.metrics.at_threshold if card.metrics is not None else None
        sens, spec = (at.sensitivity, at.specificity) if at is not None else (None, None)
        figures = f" (held-out sensitivity {sens:.3f}, specificity {spec:.3f})" if sens is not None and spec is not None else ""
        lines.append(f"Operating threshold: {get_task(card.key).positive_title} at {prediction.threshold:.3f}{figures}")
    if prediction.guard.reason:
        lines.append(f"Wrong-input guard ({prediction.guard.outcome.replace('_', ' ')}): {prediction.guard.reason}")
    if content.faithfulness:
        lines.append(content.faithfulness)
    lines.extend(content.notes)
    lines += [
        f"Model: {card.name}, version {card.version} ({card.arch})",
        f"Weights sha256: {card.sha256}",
        f"Held-out {card.test_figures.split} split (n={card.test_figures.n}): accuracy "
        f"{card.test_figures.accuracy:.3f}, ROC-AUC {card.test_figures.roc_auc or float('nan'):.3f}",
        "Heatmaps are coarse and normalised per image: they show what drove the model, not where disease is.",
    ]
    y = 0.35
    for line in lines:
        for piece in _wrap(line, 105):
            figure.text(0.06, y, piece, fontsize=9, va="top")
            y -= 0.018
    for i, piece in enumerate(_wrap(DISCLAIMER, 95)):
        figure.text(0.06, 0.06 - 0.018 * i, piece, fontsize=9, weight="bold", va="top")
    return figure


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]
