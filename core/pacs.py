"""Results as DICOM for a PACS, and the round trip archive -> SecondLook -> archive.

The DICOM writers (`core.dicom_out`) take a `ResultSummary`; this module makes one from what
the front ends hold, the same way for each of them:

- `image_summary`: one analysed upload (`core.pipeline.Analysis`), the overlay the reader sees
  and its PDF report;
- `study_summary`: one analysed series (`core.study.StudyAnalysis`): the study call, its key
  slices referenced by the source instances they come from, one overlay capture per key slice
  and the study report as Encapsulated PDF (the key slices' heatmaps are computed once for both);
- `archive_rows`: the command line's `--dicomweb`: the series of an archived study the model is
  for, pulled through DICOMweb (`core.dicomweb.Archive`), each analysed by the study pipeline into
  the row `--study` prints, and with `store=True` its PACS-ready SR, captures and PDF built,
  checked and stored back into the study (`store_study`).

Nothing here is written to disk; logs carry counts and short hashes, never a UID or a tag value.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from core.dicom_out import (
    DicomOutputs,
    OutputError,
    Overlay,
    ResultSummary,
    build_outputs,
    source_header,
    summary_from_prediction,
    to_bytes,
)
from core.dicomweb import (
    Archive,
    ArchiveError,
    NoSuitableSeries,
    SeriesEntry,
    StoreError,
    StoreResult,
    safe_url,
    suitable_series,
)
from core.imaging import ScanError, is_dicom, parse_dicom
from core.models import Classifier
from core.pipeline import BATCH_SIZE, Analysis, Refusal
from core.report import render_study_pdf
from core.series import StudyError
from core.study import StudyAnalysis, analyse_series, read_upload, series_order, study_report_content, study_row, \
    upload_digest
from core.tasks import TaskSpec

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- one image


def upload_source(data: bytes, filename: str | None = None) -> Dataset | None:
    """The header of an uploaded DICOM file (`source_header`), or None for any other upload.

    A DICOM header that cannot be parsed gives None too: the upload was analysed from its
    pixels, and its outputs are then identifier-free only.
    """
    if not is_dicom(data, filename):
        return None
    try:
        return source_header(parse_dicom(data, stop_before_pixels=True))
    except ScanError:
        return None


def image_summary(analysis: Analysis, source: Dataset | None, overlay: np.ndarray | None = None,
                  description: str = "heatmap overlay", pdf: bytes | None = None) -> ResultSummary:
    """The writers' input for one analysed upload.

    Args:
        analysis: The upload's analysis.
        source: Its DICOM header (`upload_source`), or None for a PNG, JPEG, ... upload.
        overlay: uint8 (H, W, 3) the heatmap blended on the image as shown, for the capture.
        description: What the overlay shows ("Grad-CAM for 'hemorrhage'").
        pdf: The one-page PDF report, for the Encapsulated PDF.

    Raises:
        ValueError: A prediction the wrong-input guard refused (no DICOM result for it).
    """
    sources = (source,) if source is not None else ()
    overlays = [Overlay(overlay, 0 if sources else None, description)] if overlay is not None else []
    return summary_from_prediction(analysis.prediction, analysis.classifier.card, sources=sources, overlays=overlays,
                                   pdf=pdf, upload_hash=analysis.digest)


# ---------------------------------------------------------------- one series


def study_sources(analysis: StudyAnalysis) -> tuple[tuple[Dataset, ...], tuple[int, ...]]:
    """The source instances of an analysed series, and where each slice comes from.

    Returns:
        (headers, places): the distinct source instances in slice order (the frames of a
        multi-frame instance share one), and for each slice the index of its instance in
        `headers`. Both empty where the series has no DICOM source (NIfTI).
    """
    series = analysis.series
    headers: list[Dataset] = []
    places: list[int] = []
    seen: dict[str, int] = {}
    for index in range(len(series)):
        header = series.instance_header(index)
        if header is None:
            return (), ()
        uid = str(header.get("SOPInstanceUID", "")) or f"no-uid-{index}"
        if uid not in seen:
            seen[uid] = len(headers)
            headers.append(header)
        places.append(seen[uid])
    return tuple(headers), tuple(places)


def study_summary(analysis: StudyAnalysis, *, method: str | None = None, target: str | None = None,
                  with_pdf: bool = True) -> ResultSummary:
    """The writers' input for one analysed series: the study call, its key slices, their overlays, the study report.

    Args:
        analysis: The series' analysis.
        method: CAM method of the key slices' heatmaps (default: the card's most faithful).
        target: Output they explain (default: `StudyAnalysis.explained`).
        with_pdf: Also the study report (PDF), for the Encapsulated PDF.

    Raises:
        ValueError: A study the wrong-input guard refused, an unknown method or output.
    """
    if analysis.prediction.flag:
        raise ValueError(f"no DICOM result for a series the model refused: {analysis.prediction.flag}")
    content = study_report_content(analysis, method, target)
    sources, places = study_sources(analysis)
    total = len(analysis)
    overlays = [Overlay(key.overlay, places[key.number - 1] if sources else None,
                        f"{content.method} for '{content.explained}', key slice #{rank} (slice {key.number} of {total})")
                for rank, key in enumerate(content.key_slices, start=1)]
    # A multi-frame instance holds several key slices: it is referenced once.
    key_sources = tuple(dict.fromkeys(places[i] for i in analysis.key_slices)) if sources else ()
    return summary_from_prediction(analysis.prediction, analysis.classifier.card, sources=sources,
                                   key_slices=key_sources, overlays=overlays,
                                   pdf=render_study_pdf(content) if with_pdf else None, upload_hash=analysis.digest)


def captures_zip(outputs: DicomOutputs, stem: str) -> bytes:
    """The overlay captures as one ZIP (`<stem>-1.dcm`, ...), in key slice order, made in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, capture in enumerate(outputs.captures, start=1):
            archive.writestr(f"{stem}-{number}.dcm", to_bytes(capture))
    return buffer.getvalue()


# ---------------------------------------------------------------- the archive


@dataclass(frozen=True)
class StoredOutputs:
    """What `store_study` put in the archive (the command line's `store` field).

    Attributes:
        status: "stored" (every output, checked), "partial" (some stored, see `missing`),
            "failed" (none stored) or "skipped" (the series has no result to store).
        reason: Why not "stored", in words; or a note (the check could not run), or None.
        study: The study the outputs went into.
        sr: SOP Instance UID of the stored SR, or None.
        captures: SOP Instance UIDs of the stored overlay captures, key slice order.
        pdf: SOP Instance UID of the stored Encapsulated PDF, or None.
        missing: SOP Instance UID -> why it is not in the archive.
    """

    status: str
    reason: str | None = None
    study: str | None = None
    sr: str | None = None
    captures: tuple[str, ...] = ()
    pdf: str | None = None
    missing: dict[str, str] | None = None

    def as_row(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"status": self.status, "reason": self.reason, "study": self.study, "sr": self.sr,
                "captures": list(self.captures), "pdf": self.pdf, "missing": dict(self.missing or {})}

    @property
    def count(self) -> int:
        """How many outputs the archive holds."""
        return (self.sr is not None) + len(self.captures) + (self.pdf is not None)


def _stored(outputs: DicomOutputs, held: Sequence[str], status: str, reason: str | None,
            missing: dict[str, str] | None = None) -> StoredOutputs:
    kept = set(held)

    def uid(ds: Dataset) -> str:
        return str(ds.SOPInstanceUID)

    return StoredOutputs(
        status=status, reason=reason, study=str(outputs.sr.StudyInstanceUID),
        sr=uid(outputs.sr) if uid(outputs.sr) in kept else None,
        captures=tuple(uid(c) for c in outputs.captures if uid(c) in kept),
        pdf=uid(outputs.pdf) if outputs.pdf is not None and uid(outputs.pdf) in kept else None, missing=missing)


def store_study(archive: Archive, analysis: StudyAnalysis, *, method: str | None = None,
                with_pdf: bool = True) -> StoredOutputs:
    """Build the PACS-ready SR, key slice captures and PDF of an analysed series, check them, store them.

    Nothing is sent unless every output was built and passed its checks; what an archive keeps of
    a request that fails half-way is named (`core.dicomweb.Archive.store`). Never raises for the
    archive or the outputs: the result says what happened.
    """
    try:
        summary = study_summary(analysis, method=method, with_pdf=with_pdf)
        outputs = build_outputs(summary, pacs_ready=True)
    except (OutputError, ValueError) as exc:
        logger.warning("study %s: outputs not built: %s", analysis.digest, type(exc).__name__)
        return StoredOutputs("failed", f"nothing was sent: {exc}")
    try:
        result: StoreResult = archive.store(outputs)
    except StoreError as exc:
        return _stored(outputs, exc.stored, "partial" if exc.stored else "failed", str(exc), exc.failed)
    except ArchiveError as exc:
        return StoredOutputs("failed", str(exc), str(outputs.sr.StudyInstanceUID))
    note = None if result.verified else "stored, but the archive could not be asked afterwards whether it holds them"
    return _stored(outputs, result.stored, "stored", note)


def archive_name(archive: Archive, study_uid: str) -> str:
    """What the rows' `file` says for an archived study: the archive's study URL, without credentials."""
    return f"{safe_url(archive.settings.url)}/studies/{study_uid}"


def fetch_files(archive: Archive, series: Sequence[SeriesEntry]) -> list[tuple[str, bytes]]:
    """The instances of archived series as (name, DICOM file bytes), what an upload of them would give.

    Raises:
        ArchiveError: As `Archive.fetch_series`; nothing is returned of a series that stopped half-way.
    """
    files: list[tuple[str, bytes]] = []
    for entry in series:
        instances = archive.fetch_series(entry)
        files += [(f"{len(files) + n + 1}.dcm", to_bytes(ds)) for n, ds in enumerate(instances)]
        del instances
    return files


def study_files(archive: Archive, study_uid: str, spec: TaskSpec) -> list[tuple[str, bytes]]:
    """Every instance of the series of an archived study that the model is for, as (name, DICOM file bytes):
    what the app's study view reads as if they were uploaded.

    Raises:
        NoSuitableSeries: No series of the study fits the model (the message lists what it holds).
        ArchiveError: As `Archive.fetch_study`.
    """
    series = archive.fetch_study(study_uid, spec)
    files = [(f"{n}.dcm", to_bytes(ds)) for n, ds in enumerate((ds for group in series.values() for ds in group), 1)]
    logger.info("archive study fetched for %s: %d series, %d instances", spec.key, len(series), len(files))
    return files


def archive_rows(classifier: Classifier, archive: Archive, study_uid: str, *, store: bool = False,
                 batch_size: int = BATCH_SIZE) -> Iterator[dict[str, Any]]:
    """One row per series of an archived study the model is for (`core.study.study_row`), `--study`'s fields.

    The series come one at a time (QIDO-RS lists them, WADO-RS pulls each into memory). With
    `store`, every analysed series' PACS-ready outputs go back into the study and the row's `store`
    field says what the archive holds (`StoredOutputs.as_row`). It never raises for the archive:
    an unreachable archive, refused credentials, a study with no series the model is for, or a
    transfer that stops give a row with the reason (status "error" or "rejected").

    Args:
        classifier: A loaded model.
        archive: The archive.
        study_uid: The study's Study Instance UID.
        store: Store the outputs of each analysed series back into the study.
        batch_size: Slices per forward pass.
    """
    spec = classifier.spec
    name = archive_name(archive, study_uid)
    skipped = {"store": StoredOutputs("skipped", "nothing stored: this series has no result").as_row()} \
        if store else {}
    try:
        entries = suitable_series(archive.list_series(study_uid), spec)
    except NoSuitableSeries as exc:
        yield {**study_row(name, Refusal("rejected", str(exc))), **skipped}
        return
    except ArchiveError as exc:
        yield {**study_row(name, Refusal("error", str(exc))), **skipped}
        return
    for entry in entries:
        try:
            files = fetch_files(archive, [entry])
            study = read_upload(files, spec)
        except (ArchiveError, StudyError) as exc:
            status = "rejected" if isinstance(exc, StudyError) else "error"
            yield {**study_row(name, Refusal(status, str(exc)), label=entry.series_uid), **skipped}
            continue
        digest = upload_digest(files)
        del files
        for index in series_order(study, spec):
            outcome = analyse_series(classifier, study, index, digest=digest, batch_size=batch_size)
            row = study_row(name, outcome, study.series[index], study)
            if store:
                row["store"] = (store_study(archive, outcome).as_row() if row["status"] == "ok"
                                and isinstance(outcome, StudyAnalysis) else skipped["store"])
            yield row
        del study
