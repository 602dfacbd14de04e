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
from collections.abc import Callable
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
    return _pdf_bytes(lambda at: report_figure(content, at), "SecondLook report", when)


def _pdf_bytes(draw: Callable[[datetime], Figure], title: str, when: datetime | None) -> bytes:
    """One page as the bytes of a one-page PDF, built in memory.

    Args:
        draw: Builds the page for the report time; called inside the PDF rc context so its text
            uses the standard fonts.
        title: The document's Title metadata.
        when: Report time, on the page and as CreationDate (default: now, UTC).

    Returns:
        Bytes of a one-page PDF.
    """
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    when = when or datetime.now(timezone.utc)
    # Standard Helvetica keeps the text plain in the file; an ASCII minus needs no glyph outside it.
    with matplotlib.rc_context({"pdf.use14corefonts": True, "axes.unicode_minus": False}):
        figure = draw(when)
        buffer = io.BytesIO()
        # Fixed metadata: no user name, no host, nothing about the file.
        with PdfPages(buffer, metadata={"Title": title, "Creator": "SecondLook", "Producer": "SecondLook",
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


# ---------------------------------------------------------------- the study form


@dataclass(frozen=True)
class KeySlice:
    """One key slice on a study report.

    Attributes:
        number: Its 1-based place in the series (anatomical order).
        score: Its probability of the thresholded class (or group).
        image: uint8 (H, W, 3) the slice as shown.
        overlay: uint8 (H, W, 3) its heatmap blended on it.
    """

    number: int
    score: float
    image: np.ndarray
    overlay: np.ndarray


@dataclass(frozen=True)
class StudyReportContent:
    """What goes on a study report.

    Attributes:
        prediction: The study call (`core.study.StudyCall.prediction`).
        card: The model's card.
        upload_hash: Short hash of the upload (no file name, no UID).
        series: The series in words from a fixed vocabulary (number, plane, slices, thickness;
            never its description, which is untrusted text).
        rule: The study call's rule in words (`core.study.StudyRule.describe`).
        validation: What the card says about its validation (`StudyRule.note`).
        scores: float (n,) per-slice probability of the thresholded class, anatomical order.
        slice_threshold: The slice model's own threshold (drawn on the strip), where it has one.
        key_slices: The key slices with their heatmaps, highest score first.
        explained: The output the heatmaps explain.
        method: The CAM method.
        notes: Extra lines (warnings about the series, left-outs, findings).
    """

    prediction: Prediction
    card: ModelCard
    upload_hash: str
    series: str
    rule: str
    validation: str
    scores: np.ndarray
    slice_threshold: float | None
    key_slices: tuple[KeySlice, ...]
    explained: str
    method: str
    notes: tuple[str, ...] = ()


def render_study_pdf(content: StudyReportContent, when: datetime | None = None) -> bytes:
    """The one-page A4 study report as PDF bytes: the study call, the per-slice strip, key slices with heatmaps.

    Args:
        content: What to show.
        when: Report time (default: now, UTC).

    Returns:
        Bytes of a one-page PDF.
    """
    return _pdf_bytes(lambda at: study_report_figure(content, at), "SecondLook study report", when)


def study_report_figure(content: StudyReportContent, when: datetime) -> Figure:
    """The study report page as a matplotlib Figure (A4 portrait)."""
    from matplotlib.figure import Figure

    card, prediction = content.card, content.prediction
    figure = Figure(figsize=(8.27, 11.69))
    figure.text(0.06, 0.965, "SecondLook - second-opinion study report", fontsize=16, weight="bold", va="top")
    figure.text(0.06, 0.94, when.strftime("%Y-%m-%d %H:%M UTC") + f"   upload {content.upload_hash}   {content.series}",
                fontsize=9, va="top")
    lines = [f"Study call: {prediction.headline_text()}" + (" (inside the indeterminate band)" if prediction.uncertain
                                                           else ""),
             f"Rule: {content.rule}", content.validation]
    if prediction.guard.reason:
        lines.append(f"Wrong-input guard ({prediction.guard.outcome.replace('_', ' ')}): {prediction.guard.reason}")
    y = _lines(figure, lines, 0.915)
    strip = figure.add_axes((0.08, y - 0.16, 0.86, 0.13))
    scores = np.asarray(content.scores, dtype=float)
    numbers = np.arange(1, len(scores) + 1)
    strip.bar(numbers, scores, color="#8c8c8c", width=1.0)
    keys = [k.number for k in content.key_slices]
    strip.bar(keys, scores[np.asarray(keys, dtype=int) - 1], color="#d62728", width=1.0)
    drawn = []
    if content.slice_threshold is not None:
        strip.axhline(content.slice_threshold, linestyle="--", color="black", linewidth=1)
        drawn.append("dashed: the slice threshold")
    if prediction.threshold is not None:
        strip.axhline(prediction.threshold, linestyle=":", color="#d62728", linewidth=1.2)
        drawn.append("dotted: the study threshold")
    strip.set_xlim(0.5, len(scores) + 0.5)
    strip.set_ylim(0, 1)
    strip.set_xlabel("; ".join(["slice (anatomical order)", "red: key slices", *drawn]), fontsize=8)
    strip.set_ylabel("probability", fontsize=8)
    strip.tick_params(labelsize=7)
    # Key slices side by side: each the slice above and its heatmap below.
    top = y - 0.2
    shown = content.key_slices[:3]
    side = 0.16
    for column, key in enumerate(shown):
        left = 0.06 + column * 0.3
        for row, (picture, title) in enumerate(((key.image, f"Slice {key.number}: {key.score:.0%}"),
                                                (key.overlay, f"{content.method} for '{content.explained}'"))):
            axes = figure.add_axes((left, top - (row + 1) * (side + 0.025), 0.28, side))
            axes.imshow(picture)
            axes.set_title(title, fontsize=8)
            axes.axis("off")
    y = top - (2 * (side + 0.025) if shown else 0) - 0.015
    lines = [
        f"Model: {card.name}, version {card.version} ({card.arch})", f"Weights sha256: {card.sha256}",
        "Heatmaps are coarse and normalised per slice: they show what drove the model, not where disease is.",
    ] + list(content.notes)
    _lines(figure, lines, y, size=8)
    for i, piece in enumerate(_wrap(DISCLAIMER, 95)):
        figure.text(0.06, 0.04 - 0.016 * i, piece, fontsize=9, weight="bold", va="top")
    return figure


def _lines(figure: Figure, lines: list[str], y: float, size: int = 9, floor: float = 0.07) -> float:
    """Write wrapped lines from `y` down; past `floor` one last line says how many were left out."""
    step = 0.018 if size >= 9 else 0.015
    pieces = [piece for line in lines for piece in _wrap(line, 105 if size >= 9 else 120)]
    for index, piece in enumerate(pieces):
        if y - step < floor and index < len(pieces) - 1:
            figure.text(0.06, y, f"... and {len(pieces) - index} more line(s): see the page.", fontsize=size, va="top")
            return y - step
        figure.text(0.06, y, piece, fontsize=size, va="top")
        y -= step
    return y
