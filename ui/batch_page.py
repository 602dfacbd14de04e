"""The Batch page: many files (or ZIP archives of them) through one model, a row per file, CSV out.

Everything stays in memory; the table and the CSV carry the file names the reader uploaded
(they chose them), the status, the call and the probabilities, never pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import streamlit as st

from core.archive import ArchiveError, UploadBudget, display_name, is_zip, open_zip
from core.csv_export import csv_bytes
from core.models import WeightsError
from core.pipeline import BATCH_SIZE, Refusal, predict_uploads, result_row
from core.study import study_rows
from core.tasks import TASKS, TaskSpec
from ui import plain
from ui.cache import get_classifier
from ui.widgets import disclaimer

logger = logging.getLogger(__name__)


def expand(files: list, budget: UploadBudget, started: list[int] | None = None) -> Iterator[tuple[str, bytes | Refusal]]:
    """(name, bytes) of every file in the uploads, ZIPs unpacked one member at a time, all against one budget for
    the request; a file or member that is not read comes as (name, Refusal) with the reason, in its place.
    `started`, where given, gets the index of each upload as it is opened (for a progress bar)."""
    for index, upload in enumerate(files):
        if started is not None:
            started.append(index)
        name = display_name(upload.name)
        data = upload.getvalue()
        if is_zip(data):
            try:
                archive = open_zip(data, upload.name, budget)
            except ArchiveError as exc:
                yield name, Refusal("rejected", str(exc))
                continue
            for member in archive.members():
                yield member.name, member.data if member.data is not None else Refusal("rejected", member.reason or "")
            continue
        over = budget.admit(len(data))
        yield name, data if over is None else Refusal("rejected", f"not read: {over}")


def table_rows(rows: list[dict], spec: TaskSpec) -> list[dict]:
    """Flat rows for the table and the CSV: one column per class probability; for a multi-label model
    also `findings` (those above their thresholds) and one column per finding probability."""
    flat = []
    for row in rows:
        probabilities = row.get("probabilities") or {}
        out = {"file": row["file"], "status": row["status"], "prediction": row.get("prediction") or "",
               "uncertain": "" if row.get("uncertain") is None else ("yes" if row["uncertain"] else "no")}
        if "series" in row:  # a study row (core.study.study_row): one per series
            out = {"file": row["file"], "series": row["series"] or "", "slices": row["slices"], **{
                k: v for k, v in out.items() if k != "file"}}
        out.update({f"p_{label}": (round(probabilities[label], 4) if label in probabilities else None) for label in spec.labels})
        if spec.findings:
            findings = row.get("findings") or {}
            out["findings"] = ", ".join(row.get("present") or [])
            out.update({f"p_{key}": (round(findings[key], 4) if key in findings else None) for key in spec.findings})
        out["reason"] = row.get("reason") or ""
        flat.append(out)
    return flat


def rows_csv(rows: list[dict]) -> bytes:
    """The table as CSV bytes (`core.csv_export`: a file name that could run as a formula is quoted)."""
    return csv_bytes(rows)


def run_batch(spec: TaskSpec, files: list, started: list[int] | None = None) -> Iterator[dict]:
    """Result rows in upload order, streamed (see `core.pipeline.predict_uploads`): one budget for the request."""
    classifier = get_classifier(spec.key)
    for name, outcome in predict_uploads(classifier, expand(files, UploadBudget(), started), BATCH_SIZE):
        yield result_row(name, outcome)


def run_studies(spec: TaskSpec, files: list, started: list[int] | None = None) -> Iterator[dict]:
    """One row per series of each upload (a ZIP of DICOM files, a multi-frame DICOM or a NIfTI file), read as a
    study (`core.study.study_rows`): the study call; the series named by number and plane, never by UID."""
    classifier = get_classifier(spec.key)
    for index, upload in enumerate(files):
        if started is not None:
            started.append(index)
        yield from study_rows(classifier, upload.getvalue(), upload.name, name=display_name(upload.name), detail=True,
                              safe_series=True)


def render_batch_page() -> None:
    """The whole Batch screen."""
    st.title("Batch")
    disclaimer()
    keys = sorted(TASKS)
    key = st.selectbox("Model", keys, format_func=lambda k: f"{TASKS[k].title} ({TASKS[k].page})", key="batch_model")
    spec = TASKS[key]
    st.caption(f"Model trained on: {spec.trained_on}.")
    try:
        get_classifier(key)
    except (WeightsError, ValueError) as exc:
        plain.model_unavailable(spec.title, key, exc)
        return
    files = st.file_uploader("Upload scans or ZIP archives of scans (PNG, JPEG, WebP, TIFF, BMP, DICOM)",
                             accept_multiple_files=True, key="batch_files")
    if not files:
        st.info("Upload many files at once, or ZIP archives of them. Nothing you upload is stored.")
        return
    as_studies = st.toggle("Each upload is a study: one row per series (a ZIP of a DICOM series, a multi-frame DICOM "
                           "or NIfTI), with the study call", key="batch_studies")
    signature = (key, as_studies, tuple(f.file_id for f in files))  # Streamlit's id per uploaded file: no re-hashing
    results = st.session_state.get("batch_results")
    if results is None or results[0] != signature:
        if not st.button(f"Analyse {len(files)} upload{'s' if len(files) > 1 else ''} with {spec.title}", key="batch_go"):
            return
        rows: list[dict] = []
        started: list[int] = []
        progress = st.progress(0.0, text=f"0 of {len(files)} uploads")
        for row in (run_studies if as_studies else run_batch)(spec, files, started):  # streamed, one batch at a time
            rows.append(row)
            progress.progress(len(started) / len(files), text=f"upload {len(started)} of {len(files)}: "
                                                               f"{len(rows)} files analysed")
        progress.empty()
        logger.info("batch of %d files through %s", len(rows), key)
        results = (signature, table_rows(rows, spec))
        st.session_state["batch_results"] = results
    rows = results[1]
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "rejected", "error")}
    uncertain = sum(r["uncertain"] == "yes" for r in rows)
    unit = "series" if rows and "series" in rows[0] else "files"
    st.markdown(f"**{len(rows)} {unit}:** {counts['ok']} analysed ({uncertain} uncertain), {counts['rejected']} refused, "
                f"{counts['error']} failed.")
    st.dataframe(rows, hide_index=True)
    st.download_button("Download the table (CSV)", data=rows_csv(rows), file_name=f"secondlook-batch-{key}.csv",
                       mime="text/csv", on_click="ignore", key="batch_csv")
