"""The Archive page, where SECONDLOOK_DICOMWEB_URL names a DICOMweb archive (Orthanc, a PACS).

Find a study (QIDO-RS, by modality and study date; patient names and IDs only where
SECONDLOOK_DICOMWEB_SHOW_NAMES=1), open it (WADO-RS: the series the chosen model is for, pulled
into memory, nothing written to disk) in the study view of the task pages, and from there send
the results back into the study ("Send results to archive", `ui.dicom_downloads`).

The archive's text (descriptions, names) appears only in table cells (`st.dataframe`, plain
text); the study chooser names a study by its place in the list, date, modalities and image count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date

import streamlit as st

from core.dicomweb import Archive, ArchiveError, ArchiveSettings, StudyEntry, archive_settings
from core.models import WeightsError
from core.pacs import study_files
from core.study import upload_digest
from core.tasks import TASKS, TaskSpec
from ui import plain
from ui.cache import get_classifier
from ui.dicom_downloads import ARCHIVE_OPENED
from ui.study_page import SlicePanels, accepts_studies, render_study_view
from ui.task_page import cam_panel, viewer_image
from ui.widgets import card_summary, disclaimer

logger = logging.getLogger(__name__)

ANY_MODALITY = "any"
SEARCH_LIMIT = 100


@dataclass(frozen=True)
class ArchiveFile:
    """One fetched instance, shaped as the study view reads uploads (`file_id`, `name`, `getvalue()`)."""

    file_id: str
    name: str
    data: bytes = field(repr=False)

    def getvalue(self) -> bytes:
        return self.data


def study_specs() -> list[TaskSpec]:
    """The models that read whole series (CT, MR), in registry order."""
    return [spec for spec in TASKS.values() if accepts_studies(spec)]


def study_table(studies: list[StudyEntry], show_names: bool) -> list[dict]:
    """The search result as table rows (plain cells); names and IDs only where the archive may show them."""
    rows = []
    for number, study in enumerate(studies, start=1):
        row = {"#": number, "date": study.date or "", "time": study.time or "", "modalities": "/".join(study.modalities),
               "description": study.description, "series": study.series_count, "images": study.instance_count}
        if show_names:
            row.update(patient=study.patient_name or "", patient_id=study.patient_id or "",
                       accession=study.accession or "")
        rows.append(row)
    return rows


def study_choice(study: StudyEntry, number: int) -> str:
    """A study in the chooser: its place, date, modalities and images (never its description or names)."""
    images = f", {study.instance_count} images" if study.instance_count is not None else ""
    return f"{number}: {study.date or 'no date'}, {'/'.join(study.modalities) or 'modality unknown'}{images}"


def search_form(settings: ArchiveSettings, spec: TaskSpec) -> None:
    """Modality and date filters and the search; the result is kept in the session."""
    col_modality, col_from, col_to = st.columns(3)
    choices = [*spec.modalities, ANY_MODALITY]
    modality = col_modality.selectbox("Modality", choices, key=f"archive_modality_{spec.key}")
    date_from = col_from.date_input("Study date from", value=None, key="archive_from", format="YYYY-MM-DD")
    date_to = col_to.date_input("Study date to", value=None, key="archive_to", format="YYYY-MM-DD")
    if not st.button("Search the archive", key="archive_search"):
        return
    st.session_state.pop("archive_studies", None)
    try:
        with st.spinner("Searching the archive..."), Archive(settings) as archive:
            studies = archive.search_studies(modality=None if modality == ANY_MODALITY else modality,
                                             date_from=_as_date(date_from), date_to=_as_date(date_to),
                                             limit=SEARCH_LIMIT)
    except (ArchiveError, ValueError) as exc:
        plain.error(f"The search failed: {exc}")
        return
    st.session_state["archive_studies"] = studies


def _as_date(value: object) -> date | None:
    return value if isinstance(value, date) else None


def open_study(settings: ArchiveSettings, spec: TaskSpec, study: StudyEntry) -> None:
    """Pull the study's series the model is for into memory and hand them to the study view."""
    st.session_state.pop(ARCHIVE_OPENED, None)  # the previous study's images go first
    try:
        with st.spinner("Fetching the study from the archive..."), Archive(settings) as archive:
            files = study_files(archive, study.study_uid, spec)
    except ArchiveError as exc:
        plain.error(f"The study could not be opened: {exc}")
        return
    digest = upload_digest(files)
    st.session_state[ARCHIVE_OPENED] = {
        "digest": digest, "model": spec.key,
        "files": [ArchiveFile(f"archive-{digest}-{n}", name, data) for n, (name, data) in enumerate(files)]}
    logger.info("archive study %s opened for %s: %d instances", digest, spec.key, len(files))


def render_archive_page() -> None:
    """The whole Archive screen."""
    st.title("Archive")
    disclaimer()
    try:
        settings = archive_settings()
    except ValueError as exc:
        plain.error(f"The archive settings are wrong: {exc}")
        return
    if settings is None:
        st.info("No archive is configured: set SECONDLOOK_DICOMWEB_URL to its DICOMweb root.")
        return
    specs = study_specs()
    col_model, col_info = st.columns([2, 3])
    with col_model:
        key = st.selectbox("Model", [s.key for s in specs], key="archive_model",
                           format_func=lambda k: f"{TASKS[k].title} ({TASKS[k].page})")
    spec = TASKS[key]
    col_info.caption(f"Model trained on: {spec.trained_on}. Studies are read from the archive into memory only; "
                     "nothing is stored unless you send the results back.")
    try:
        classifier = get_classifier(key)
    except (WeightsError, ValueError) as exc:
        plain.model_unavailable(spec.title, key, exc)
        return
    search_form(settings, spec)
    studies: list[StudyEntry] | None = st.session_state.get("archive_studies")
    if studies is not None:
        if not studies:
            st.info("No study in the archive matches these filters.")
        else:
            st.dataframe(study_table(studies, settings.show_names), hide_index=True)
            if len(studies) >= SEARCH_LIMIT:
                st.caption(f"The first {SEARCH_LIMIT} studies found; narrow the dates to see the others.")
            chosen = st.selectbox("Study", range(len(studies)), key="archive_study",
                                  format_func=lambda i: study_choice(studies[i], i + 1))
            if st.button("Open this study", key="archive_open"):
                open_study(settings, spec, studies[chosen])
    opened = st.session_state.get(ARCHIVE_OPENED)
    if opened is None:
        return
    if opened["model"] != key:
        st.info("The study opened before was fetched for another model: open it again for this one.")
        return
    render_study_view(classifier, opened["files"], SlicePanels(cam_panel, viewer_image))
    card_summary(classifier.card)
