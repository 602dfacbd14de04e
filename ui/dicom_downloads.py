"""DICOM downloads of the task and study pages, and "Send results to archive" for a study opened from the archive.

The outputs are `core.dicom_out`'s: a structured report (SR), secondary captures of the heatmap
overlay (SC) and the PDF report as Encapsulated PDF, made from what the page shows through
`core.pacs` (`image_summary` for one image, `study_summary` for a series). Every file is made
when the reader clicks (`st.download_button(data=callable)`, on another thread), identifier-free
by default; "PACS-ready" copies the patient and study identifiers of the source and is offered only
for DICOM uploads, with a warning. The outputs of one click are built together and kept for the
next click on the same element, so the SR, the SC and the PDF downloaded one after the other share
one study (and one set of heatmaps).

Nothing here shows a UID or a tag value: the messages are written here or by `core.dicomweb`
for people, and go through `ui.plain`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial

import numpy as np
import streamlit as st
from pydicom.dataset import Dataset

from core.dicom_out import PDF_SERIES_NUMBER, SR_SERIES_NUMBER, DicomOutputs, build_outputs, to_bytes
from core.dicomweb import Archive, ArchiveError, archive_settings
from core.pacs import StoredOutputs, captures_zip, image_summary, store_study, study_sources, study_summary, \
    upload_source
from core.pipeline import Analysis
from core.study import StudyAnalysis
from ui import plain

logger = logging.getLogger(__name__)

PACS_READY = "PACS-ready (copy patient and study identifiers from the source)"
CARRIES_IDENTIFIERS = ("PACS-ready files carry the patient's name, ID and birth date and the study's identifiers, "
                       "copied from the uploaded DICOM: handle and store them as patient data.")
IDENTIFIER_FREE = ("Identifier-free: no patient name, ID or date and no UID of the source; the files form a new "
                   "study of their own.")
NOT_FOR_REFUSED = "No DICOM output for a scan the model was not trained for."
SEND = "Send results to archive"
ARCHIVE_OPENED = "archive_opened"  # session key: the study the Archive page opened ({"digest", ...})
ARCHIVE_SENT = "archive_sent"  # session key: what was stored, per analysed series
DICOM_MIME = "application/dicom"


@dataclass(frozen=True)
class ImageSource:
    """What a task page knows of the uploaded file for its DICOM outputs.

    Attributes:
        header: The uploaded DICOM's header (`core.pacs.upload_source`), or None for a PNG, JPEG,
            ... upload (identifier-free outputs only).
    """

    header: Dataset | None = None


def image_source(data: bytes, filename: str | None) -> ImageSource:
    """The DICOM header of an upload, where it is one (read without its pixels)."""
    return ImageSource(upload_source(data, filename))


class OutputCache:
    """The last outputs built for one page element (shared with the download threads).

    Holding only the last keeps one set per element: a new overlay or form replaces it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Hashable | None = None
        self._outputs: DicomOutputs | None = None

    def get(self, key: Hashable, build: Callable[[], DicomOutputs]) -> DicomOutputs:
        """The outputs for `key`, built once (two clicks at once wait for one build)."""
        with self._lock:
            if self._key != key or self._outputs is None:
                self._outputs = build()
                self._key = key
            return self._outputs


def _cache(name: str) -> OutputCache:
    caches: dict = st.session_state.setdefault("dicom_outputs", {})
    if name not in caches:
        if len(caches) >= 4:  # the page shows one image or series at a time; keep a few
            caches.pop(next(iter(caches)))
        caches[name] = OutputCache()
    return caches[name]


def _file(cache: OutputCache, key: Hashable, build: Callable[[], DicomOutputs], kind: str, stem: str) -> bytes:
    """One output's bytes, made when the reader clicks; a failure is logged by type only (tag values never)."""
    try:
        outputs = cache.get(key, build)
        if kind == "sr":
            return to_bytes(outputs.sr)
        if kind == "pdf":
            if outputs.pdf is None:
                raise ValueError("no PDF report")
            return to_bytes(outputs.pdf)
        if len(outputs.captures) == 1:
            return to_bytes(outputs.captures[0])
        return captures_zip(outputs, stem)
    except Exception as exc:  # noqa: BLE001 - the download says it failed; the page stays
        logger.error("DICOM %s download failed: %s", kind, type(exc).__name__)
        raise RuntimeError("the DICOM output could not be made") from None


def pacs_ready_choice(prefix: str, available: bool) -> bool:
    """The PACS-ready checkbox (only where the source is DICOM) and what the choice means."""
    if not available:
        st.caption(IDENTIFIER_FREE + " PACS-ready output is made from DICOM uploads only (it copies their identifiers).")
        return False
    ready = st.checkbox(PACS_READY, key=f"dicom_pacs_{prefix}",
                        help="For storing beside the images in your PACS: the outputs join the source study and "
                             "reference its images.")
    if ready:
        plain.warning(CARRIES_IDENTIFIERS)
    else:
        st.caption(IDENTIFIER_FREE)
    return ready


def _image_outputs(analysis: Analysis, header: Dataset | None, overlay: np.ndarray, description: str,
                   pdf: Callable[[], bytes], pacs_ready: bool) -> DicomOutputs:
    return build_outputs(image_summary(analysis, header, overlay, description, pdf()), pacs_ready=pacs_ready)


def image_downloads(analysis: Analysis, source: ImageSource, overlay: np.ndarray, description: str,
                    pdf: Callable[[], bytes], prefix: str) -> None:
    """SR, SC of the overlay as shown and the PDF as Encapsulated PDF, for one image (the task page's viewer).

    Args:
        analysis: The upload's analysis.
        source: What is known of the uploaded file.
        overlay: uint8 (H, W, 3) the overlay as shown (what the SC holds).
        description: What the overlay shows.
        pdf: Makes the one-page PDF report (called on click).
        prefix: Widget key prefix of the page element.
    """
    if analysis.prediction.flag:
        st.caption(NOT_FOR_REFUSED)
        return
    with st.expander("DICOM outputs for a PACS (structured report, overlay capture, PDF)"):
        ready = pacs_ready_choice(prefix, source.header is not None)
        header = source.header
        key = (hashlib.sha1(np.ascontiguousarray(overlay)).hexdigest(), description, ready)
        build = partial(_image_outputs, analysis, header, overlay, description, pdf, ready)
        stem = f"secondlook-{analysis.key}-{analysis.digest}{'-pacs' if ready else ''}"
        _buttons(_cache(f"image_{prefix}"), key, build, stem, prefix, captures=1)


def _buttons(cache: OutputCache, key: Hashable, build: Callable[[], DicomOutputs], stem: str, prefix: str,
             captures: int) -> None:
    zipped = captures > 1
    items = [("sr", "DICOM structured report (SR)", f"{stem}-sr.dcm", DICOM_MIME),
             ("sc", "DICOM secondary captures of the key slices' overlays (SC, ZIP)" if zipped else
              "DICOM secondary capture of the overlay (SC)", f"{stem}-sc.zip" if zipped else f"{stem}-sc.dcm",
              "application/zip" if zipped else DICOM_MIME),
             ("pdf", "The PDF report as DICOM (Encapsulated PDF)", f"{stem}-pdf.dcm", DICOM_MIME)]
    for kind, label, name, mime in items:  # one under the other: the study view's column is narrow
        st.download_button(label, data=partial(_file, cache, key, build, kind, f"{stem}-sc"), mime=mime,
                           file_name=name, on_click="ignore", key=f"dicom_{kind}_{prefix}")


def _study_outputs(analysis: StudyAnalysis, pacs_ready: bool) -> DicomOutputs:
    return build_outputs(study_summary(analysis), pacs_ready=pacs_ready)


def study_downloads(analysis: StudyAnalysis, prefix: str) -> None:
    """SR (study call, key slices), SC of each key slice's overlay and the study report, for the study view;
    and "Send results to archive" where the Archive page opened this study."""
    if analysis.prediction.flag:
        st.caption(NOT_FOR_REFUSED)
        return
    sources, _ = study_sources(analysis)
    with st.expander("DICOM outputs for a PACS (structured report, key slice captures, PDF)"):
        ready = pacs_ready_choice(prefix, bool(sources))
        build = partial(_study_outputs, analysis, ready)
        stem = f"secondlook-{analysis.classifier.spec.key}-study-{analysis.digest}{'-pacs' if ready else ''}"
        _buttons(_cache(f"study_{prefix}"), (analysis.digest, analysis.index, ready), build, stem, prefix,
                 captures=len(analysis.key_slices))
    send_to_archive(analysis, prefix)


# ---------------------------------------------------------------- the archive


def opened_from_archive(analysis: StudyAnalysis) -> bool:
    """Whether this analysis is of the study the Archive page opened in this session."""
    opened = st.session_state.get(ARCHIVE_OPENED)
    return bool(opened) and opened.get("digest") == analysis.digest


def stored_message(stored: StoredOutputs) -> str:
    """What the reader is told of a store, in words (no UID)."""
    parts = (["the structured report"] if stored.sr else []) + \
            ([f"{len(stored.captures)} overlay capture(s)"] if stored.captures else []) + \
            (["the PDF report"] if stored.pdf else [])
    held = (", ".join(parts[:-1]) + " and " + parts[-1]) if len(parts) > 1 else (parts[0] if parts else "nothing")
    if stored.status == "stored":
        note = f" Note: {stored.reason}." if stored.reason else ""
        return (f"Stored in the archive, in this study: {held} (series {SR_SERIES_NUMBER} to {PDF_SERIES_NUMBER}, "
                f"with the study's patient and study identifiers).{note}")
    reasons = "; ".join(sorted(set((stored.missing or {}).values())))
    if stored.status == "partial":
        return (f"Only part of the results reached the archive: {held} stored; {len(stored.missing or {})} not "
                f"stored ({reasons}). The stored ones are complete and refer only to the source images; an archive "
                "filter or policy may refuse some kinds of object.")
    return f"Nothing was stored in the archive: {stored.reason or reasons or 'no reason given'}."


def send_to_archive(analysis: StudyAnalysis, prefix: str) -> None:
    """The "Send results to archive" button, for a study the Archive page opened; once per analysed series."""
    if not opened_from_archive(analysis):
        return
    sent: dict = st.session_state.setdefault(ARCHIVE_SENT, {})
    key = (analysis.digest, analysis.classifier.spec.key, analysis.index)
    done = sent.get(key)
    if done is not None:
        (plain.success if done.status == "stored" else plain.error)(stored_message(done))
        return
    slot = st.empty()  # the button, replaced by the outcome once clicked
    if not slot.button(SEND, key=f"archive_send_{prefix}", type="primary",
                       help="Stores the structured report, the key slices' overlay captures and the study report (PDF) "
                            "in this study in the archive, PACS-ready (with the study's patient and study identifiers)."):
        return
    slot.empty()
    try:
        settings = archive_settings()
        if settings is None:
            raise ArchiveError("no archive is configured any more (SECONDLOOK_DICOMWEB_URL is unset)")
    except (ValueError, ArchiveError) as exc:
        plain.error(f"Nothing was stored in the archive: {exc}")
        return
    with st.spinner("Storing the results in the archive..."), Archive(settings) as archive:
        stored = store_study(archive, analysis)
    logger.info("study %s sent to the archive: %s (%d outputs)", analysis.digest, stored.status, stored.count)
    if stored.count:  # something is in the archive: never offered twice (a second send would duplicate it)
        sent[key] = stored
    (plain.success if stored.status == "stored" else plain.error)(stored_message(stored))
