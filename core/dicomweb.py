"""Studies from a DICOMweb archive (Orthanc, a PACS) and results back to it, through dicomweb-client.

Search (QIDO-RS) by modality and date, pull a series or a study into memory (WADO-RS; nothing is
written to disk), and store the SR, secondary captures and PDF of an analysis back into the
source study (STOW-RS).

Settings, read here and nowhere else (`archive_settings`):

    SECONDLOOK_DICOMWEB_URL         the DICOMweb root, e.g. http://localhost:8042/dicom-web (Orthanc)
    SECONDLOOK_DICOMWEB_USER        HTTP basic user (with SECONDLOOK_DICOMWEB_PASSWORD)
    SECONDLOOK_DICOMWEB_PASSWORD
    SECONDLOOK_DICOMWEB_TOKEN       a bearer token, instead of user and password
    SECONDLOOK_DICOMWEB_SHOW_NAMES  "1" where this archive may show patient names and IDs in study
                                    lists (default: never; the lists carry date, modality, description)
    SECONDLOOK_DICOMWEB_TIMEOUT     seconds per request (default 30)
    SECONDLOOK_DICOMWEB_ATTEMPTS    tries per request on connection errors, 408, 429, 503, 504 (default 3)

Writing back: DICOMweb has no transactions, so the outputs are all built and checked
(`core.dicom_out.build_outputs`) before the first byte is sent, then sent in one STOW-RS
request. After every request, answered or not, the archive is asked (QIDO-RS) which of the
outputs it holds: an archive filter can drop an instance while its STOW answer lists it as stored
(Orthanc 1.10 does). Where some are held and some not, `StoreError` names
the stored and the missing ones; each stored output is a complete instance that references only
the source images, never another output, so what is stored stays readable. Nothing is deleted:
DICOMweb has no standard delete, and a refused output is an archive policy a retry would not change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydicom.dataset import Dataset

from core.imaging import MAX_UPLOAD_BYTES
from core.dicom_out import PDF_SERIES_NUMBER, SR_SERIES_NUMBER, DicomOutputs, ResultSummary, build_outputs
from core.tasks import TaskSpec
from core.vocabulary import body_part_words, modality_words

logger = logging.getLogger(__name__)

ENV_PREFIX = "SECONDLOOK_DICOMWEB_"
MAX_INSTANCES = 2000  # per fetch, like the ZIP member limit of uploads


class ArchiveError(RuntimeError):
    """An archive operation that failed; the message is written for the person at the screen."""


class ArchiveUnreachable(ArchiveError):
    """No answer from the archive (refused, timed out, name not found)."""


class ArchiveAuthError(ArchiveError):
    """The archive refused the credentials (HTTP 401 or 403)."""


class NoSuitableSeries(ArchiveError):
    """The study holds no series the model is for."""


class StoreError(ArchiveError):
    """Not every output was stored.

    Attributes:
        stored: SOP Instance UIDs the archive holds after the attempt.
        failed: SOP Instance UID -> why it is missing.
    """

    def __init__(self, message: str, stored: Sequence[str], failed: Mapping[str, str]) -> None:
        super().__init__(message)
        self.stored = tuple(stored)
        self.failed = dict(failed)


@dataclass(frozen=True)
class ArchiveSettings:
    """Where the archive is and how to talk to it (see the module docstring for the variables)."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    show_names: bool = False
    timeout: float = 30.0
    attempts: int = 3
    max_instances: int = MAX_INSTANCES
    max_bytes: int = MAX_UPLOAD_BYTES

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{ENV_PREFIX}URL must be an http(s) URL, e.g. http://localhost:8042/dicom-web; "
                             f"got {safe_url(self.url)!r}")
        if (self.user is None) != (self.password is None):
            raise ValueError(f"{ENV_PREFIX}USER and {ENV_PREFIX}PASSWORD go together")
        if self.token and self.user:
            raise ValueError(f"set either {ENV_PREFIX}TOKEN or {ENV_PREFIX}USER/PASSWORD, not both")
        if self.timeout <= 0 or self.attempts < 1 or self.max_instances < 1 or self.max_bytes < 1:
            raise ValueError("timeout, attempts, max_instances and max_bytes must be positive")


def archive_settings(environ: Mapping[str, str] | None = None) -> ArchiveSettings | None:
    """The archive settings from the environment, or None where SECONDLOOK_DICOMWEB_URL is unset.

    Raises:
        ValueError: A setting that is malformed (the message names it).
    """
    env = os.environ if environ is None else environ
    url = env.get(f"{ENV_PREFIX}URL", "").strip()
    if not url:
        return None

    def number(name: str, default: float, kind: type) -> Any:
        raw = env.get(f"{ENV_PREFIX}{name}", "").strip()
        try:
            return kind(raw) if raw else default
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{name} must be a number, got {raw!r}") from None

    return ArchiveSettings(
        url=url.rstrip("/"),
        user=env.get(f"{ENV_PREFIX}USER") or None,
        password=env.get(f"{ENV_PREFIX}PASSWORD") or None,
        token=env.get(f"{ENV_PREFIX}TOKEN") or None,
        show_names=env.get(f"{ENV_PREFIX}SHOW_NAMES", "").strip().lower() in ("1", "true", "yes"),
        timeout=number("TIMEOUT", 30.0, float),
        attempts=number("ATTEMPTS", 3, int),
    )


def safe_url(url: str) -> str:
    """The URL without any user:password@ part (for messages and logs)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _digest(uid: str) -> str:
    """What logs carry instead of a UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StudyEntry:
    """One study of a search. Patient name, ID and accession number only where the archive is
    configured to show them (`ArchiveSettings.show_names`), else None."""

    study_uid: str
    date: str | None
    time: str | None
    description: str
    modalities: tuple[str, ...]
    series_count: int | None
    instance_count: int | None
    patient_name: str | None = None
    patient_id: str | None = None
    accession: str | None = None


@dataclass(frozen=True)
class SeriesEntry:
    """One series of a study."""

    study_uid: str
    series_uid: str
    modality: str
    description: str
    number: int | None
    instance_count: int | None
    body_part: str | None


@dataclass(frozen=True)
class StoreResult:
    """What a STOW-RS stored.

    Attributes:
        study_uid: The study the outputs went into.
        stored: SOP Instance UIDs stored, in the order sent.
        warnings: Per-instance warnings the archive gave (instance UID -> reason), if any.
        verified: True when a QIDO-RS search afterwards found every output in the archive.
    """

    study_uid: str
    stored: tuple[str, ...]
    warnings: Mapping[str, str] = field(default_factory=dict)
    verified: bool = True


_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STUDY_FIELDS = ("StudyDate", "StudyTime", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances")
NAME_FIELDS = ("PatientName", "PatientID", "AccessionNumber")
SERIES_FIELDS = ("Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances",
                 "BodyPartExamined")


def _check_uid(uid: str, what: str) -> str:
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise ValueError(f"{what} must be a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def _date_range(date_from: date | None, date_to: date | None) -> str | None:
    if date_from and date_to and date_from > date_to:
        raise ValueError(f"the date range is reversed: {date_from} is after {date_to}")
    if not date_from and not date_to:
        return None
    return f"{date_from.strftime('%Y%m%d') if date_from else ''}-{date_to.strftime('%Y%m%d') if date_to else ''}"


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else ""


def _iso_date(value: str) -> str | None:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else (value or None)


class Archive:
    """A DICOMweb archive.

    Every failure comes out as an `ArchiveError` (or a subclass) with a message for a person;
    the exception it replaces is chained for the log. One HTTP session per instance: make one
    per app session or request, not one shared by threads.
    """

    def __init__(self, settings: ArchiveSettings) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.settings = settings
        session = requests.Session()
        if settings.token:
            session.headers["Authorization"] = f"Bearer {settings.token}"
        elif settings.user is not None:
            session.auth = (settings.user, settings.password or "")
        self._session = session
        self._client = DICOMwebClient(url=settings.url, session=session, timeout=settings.timeout)
        # Retried: connection errors and 408/429/503/504, with waits of 0.25 s, 0.5 s, ... (not the
        # library's 2 s, 4 s, 8 s, 16 s, which keep a reader waiting half a minute for a server that is down).
        self._client.set_http_retry_params(retry=settings.attempts > 1, max_attempts=settings.attempts,
                                           wait_exponential_multiplier=125)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Archive:
        """The archive SECONDLOOK_DICOMWEB_URL names.

        Raises:
            ArchiveError: The variable is unset or a setting is malformed.
        """
        try:
            settings = archive_settings(environ)
        except ValueError as exc:
            raise ArchiveError(str(exc)) from exc
        if settings is None:
            raise ArchiveError(f"no archive configured: set {ENV_PREFIX}URL to the DICOMweb root "
                               "(e.g. http://localhost:8042/dicom-web for Orthanc)")
        return cls(settings)

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- errors ----------------------------------------------------------------------------------

    def _failure(self, exc: Exception, action: str) -> ArchiveError:
        """The ArchiveError for a failed request: words for the reader, without the archive's address or the
        library's text (the log line `_call` writes has both)."""
        import requests

        if isinstance(exc, ArchiveError):
            return exc
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status in (401, 403):
                how = ("the token was refused" if self.settings.token else
                       "the user and password were refused" if self.settings.user else
                       f"it requires credentials: set {ENV_PREFIX}USER and {ENV_PREFIX}PASSWORD, or {ENV_PREFIX}TOKEN")
                return ArchiveAuthError(f"the archive answered HTTP {status} to {action}: {how}")
            if status == 404:
                return ArchiveError(f"the archive has no such resource ({action}: HTTP 404); "
                                    f"check that {ENV_PREFIX}URL ends at the DICOMweb root, e.g. .../dicom-web")
            return ArchiveError(f"the archive answered HTTP {status} to {action}")
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            kind = "timed out" if isinstance(exc, requests.Timeout) else "cannot be reached"
            return ArchiveUnreachable(f"the archive {kind} ({action}, {self.settings.attempts} "
                                      f"attempt(s)); check {ENV_PREFIX}URL and that the server is running")
        if type(exc).__name__ == "RetryError":  # dicomweb-client's retry library, after the last attempt
            return ArchiveError(f"the archive stayed busy ({action}, {self.settings.attempts} attempts)")
        if isinstance(exc, requests.RequestException):
            return ArchiveError(f"the request to the archive failed ({action})")
        return ArchiveError(f"the archive sent an answer that could not be read ({action})")

    def _call(self, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one ArchiveError with a readable message
            error = self._failure(exc, action)
            logger.warning("archive at %s: %s failed: %s", safe_url(self.settings.url), action, type(exc).__name__)
            raise error from exc

    # --- QIDO-RS ---------------------------------------------------------------------------------

    def search_studies(self, modality: str | None = None, date_from: date | None = None,
                       date_to: date | None = None, limit: int = 100, offset: int = 0) -> list[StudyEntry]:
        """Studies matching a modality and a date range (QIDO-RS).

        Args:
            modality: DICOM modality the study must contain (e.g. "CT"), or None for any.
            date_from: First study date, inclusive, or None.
            date_to: Last study date, inclusive, or None.
            limit: At most this many studies.
            offset: Skip this many (paging).

        Returns:
            The studies; names, patient IDs and accession numbers only where `show_names` is set.

        Raises:
            ValueError: A malformed modality or a reversed date range.
            ArchiveError: The archive failed (unreachable, 401, ...).
        """
        filters: dict[str, str] = {}
        if modality:
            modality = modality.strip().upper()
            if not _MODALITY.match(modality):
                raise ValueError(f"modality must be a DICOM modality code such as CT or MR, got {modality!r}")
            filters["ModalitiesInStudy"] = modality
        dates = _date_range(date_from, date_to)
        if dates:
            filters["StudyDate"] = dates
        fields = STUDY_FIELDS + (NAME_FIELDS if self.settings.show_names else ())
        rows = self._call("the study search", self._client.search_for_studies, search_filters=filters,
                          fields=list(fields), limit=limit, offset=offset)
        studies = []
        for ds in self._datasets(rows, "the study search"):
            uid = _text(ds, "StudyInstanceUID")
            if not uid:
                continue
            modalities = ds.get("ModalitiesInStudy") or []
            modalities = (modalities,) if isinstance(modalities, str) else tuple(str(m) for m in modalities)
            names = self.settings.show_names
            studies.append(StudyEntry(
                study_uid=uid, date=_iso_date(_text(ds, "StudyDate")), time=_text(ds, "StudyTime") or None,
                description=_text(ds, "StudyDescription"), modalities=modalities,
                series_count=_as_int(ds.get("NumberOfStudyRelatedSeries")),
                instance_count=_as_int(ds.get("NumberOfStudyRelatedInstances")),
                patient_name=_text(ds, "PatientName") or None if names else None,
                patient_id=_text(ds, "PatientID") or None if names else None,
                accession=_text(ds, "AccessionNumber") or None if names else None,
            ))
        logger.info("archive study search: %d studies", len(studies))
        return studies

    def list_series(self, study_uid: str) -> list[SeriesEntry]:
        """The series of a study (QIDO-RS), by series number.

        Raises:
            ArchiveError: The archive failed, or has no such study.
        """
        _check_uid(study_uid, "the study UID")
        rows = self._call("the series search", self._client.search_for_series, study_instance_uid=study_uid,
                          fields=list(SERIES_FIELDS))
        series = [SeriesEntry(study_uid=study_uid, series_uid=_text(ds, "SeriesInstanceUID"),
                              modality=_text(ds, "Modality").upper(), description=_text(ds, "SeriesDescription"),
                              number=_as_int(ds.get("SeriesNumber")),
                              instance_count=_as_int(ds.get("NumberOfSeriesRelatedInstances")),
                              body_part=_text(ds, "BodyPartExamined").upper() or None)
                  for ds in self._datasets(rows, "the series search") if _text(ds, "SeriesInstanceUID")]
        if not series:
            raise ArchiveError(f"the archive has no series for study {_digest(study_uid)} (no such study, "
                               "or it is empty)")
        return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.series_uid))

    def _datasets(self, rows: Iterable[dict], action: str) -> Iterator[Dataset]:
        for row in rows:
            try:
                yield Dataset.from_json(row)
            except Exception as exc:  # noqa: BLE001 - one malformed row from the archive is reported, not fatal
                logger.warning("archive %s: a row could not be read (%s)", action, type(exc).__name__)

    # --- WADO-RS ---------------------------------------------------------------------------------

    def fetch_series(self, series: SeriesEntry) -> list[Dataset]:
        """Every instance of a series, in memory (WADO-RS, uncompressed).

        All or nothing: a transfer that stops half-way raises and returns no instance.

        Raises:
            ArchiveError: More instances than `max_instances`, the archive failed, or the
                transfer stopped (the message says after how many instances).
        """
        _check_uid(series.study_uid, "the study UID")
        _check_uid(series.series_uid, "the series UID")
        limit = self.settings.max_instances
        if series.instance_count is not None and series.instance_count > limit:
            raise ArchiveError(f"the series has {series.instance_count} images, more than the {limit} "
                               "SecondLook reads at once")
        instances: list[Dataset] = []
        size = 0
        try:
            for ds in self._client.retrieve_series(series.study_uid, series.series_uid):
                instances.append(ds)
                size += len(ds.get("PixelData") or b"")
                if len(instances) > limit:
                    raise ArchiveError(f"the series has more than the {limit} images SecondLook reads at once")
                if size > self.settings.max_bytes:
                    raise ArchiveError(f"the series is larger than the {self.settings.max_bytes / 2**20:g} MB "
                                       "SecondLook reads at once (the limit of uploads); nothing was kept")
        except Exception as exc:  # noqa: BLE001 - see _call
            got = len(instances)
            instances.clear()  # never hand on part of a series
            error = self._failure(exc, "the series download")
            if got and not isinstance(exc, ArchiveError):
                error = type(error)(f"{error}; the transfer stopped after {got} images and nothing was kept")
            logger.warning("archive series download %s failed after %d instances: %s", _digest(series.series_uid),
                           got, type(exc).__name__)
            raise error from exc
        if not instances:
            raise ArchiveError("the archive sent no image for this series")
        if series.instance_count is not None and len(instances) != series.instance_count:
            raise ArchiveError(f"the archive listed {series.instance_count} images for this series but sent "
                               f"{len(instances)}; nothing was kept")
        logger.info("archive series %s fetched: %d instances", _digest(series.series_uid), len(instances))
        return instances

    def fetch_study(self, study_uid: str, spec: TaskSpec | None = None) -> dict[str, list[Dataset]]:
        """The series of a study, in memory: those the model suits where `spec` is given, else all.

        Returns:
            Series Instance UID -> its instances, in series order.

        Raises:
            NoSuitableSeries: `spec` given and no series fits it.
            ArchiveError: As `list_series` and `fetch_series`.
        """
        series = self.list_series(study_uid)
        if spec is not None:
            series = suitable_series(series, spec)
        total = sum(s.instance_count or 0 for s in series)
        if total > self.settings.max_instances:
            raise ArchiveError(f"the study has {total} images in the series to read, more than the "
                               f"{self.settings.max_instances} SecondLook reads at once; pick one series")
        return {s.series_uid: self.fetch_series(s) for s in series}

    # --- STOW-RS ---------------------------------------------------------------------------------

    def store(self, outputs: DicomOutputs) -> StoreResult:
        """Store PACS-ready outputs in their (the source's) study, in one STOW-RS request, and check
        with QIDO-RS that the archive holds every one (an archive filter may drop an instance while
        its STOW answer still lists it as stored: Orthanc 1.10 does).

        Raises:
            ArchiveError: Identifier-free outputs (they belong in a download, not the archive),
                or the archive failed and holds none of them.
            StoreError: Some outputs stored and some not (both named; see the module docstring).
        """
        if not outputs.pacs_ready:
            raise ArchiveError("only PACS-ready outputs go to the archive; identifier-free outputs are for downloads")
        datasets = outputs.all()
        study_uid = str(outputs.sr.StudyInstanceUID)
        try:
            answer = self._client.store_instances(list(datasets), study_instance_uid=study_uid)
        except Exception as exc:  # noqa: BLE001 - see _call
            error = self._failure(exc, "storing the results")
            logger.warning("archive store into %s failed: %s", _digest(study_uid), type(exc).__name__)
            answer = _stow_answer(exc)
            failed = _failed(answer) if answer is not None else {}
            held = self._held(datasets)
            if held is None:
                raise ArchiveError(f"{error}; whether any output was stored could not be checked (look for series "
                                   f"{SR_SERIES_NUMBER} to {PDF_SERIES_NUMBER} in the study)") from exc
            if not held and not failed:
                raise error from exc
            raise self._partial(datasets, held, failed, str(error)) from exc
        failed = _failed(answer)
        held = self._held(datasets)
        if held is None:
            # Stored by the archive's own answer; the check that could not run is said, not hidden.
            logger.warning("archive store into %s: stored, but the check of what is held failed", _digest(study_uid))
            held = {str(ds.SOPInstanceUID) for ds in datasets} - set(failed)
            verified = False
        else:
            verified = True
        if len(held) < len(datasets):
            why = "the archive refused some outputs" if failed else "the archive answered that it stored every output"
            raise self._partial(datasets, held, failed, why)
        warnings = {str(item.ReferencedSOPInstanceUID): _reason(item) for item in answer.get("ReferencedSOPSequence", [])
                    if "WarningReason" in item}
        logger.info("archive store into %s: %d instances%s", _digest(study_uid), len(datasets),
                    "" if verified else " (not verified)")
        return StoreResult(study_uid=study_uid, stored=tuple(str(ds.SOPInstanceUID) for ds in datasets),
                           warnings=warnings, verified=verified)

    def _held(self, outputs: Sequence[Dataset]) -> set[str] | None:
        """Which of these instances the archive holds (QIDO-RS, per output series), or None where it cannot say."""
        present: set[str] = set()
        for study_uid, series_uid in dict.fromkeys((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                                                   for ds in outputs):
            try:
                rows = self._call("checking what was stored", self._client.search_for_instances,
                                  study_instance_uid=study_uid, series_instance_uid=series_uid,
                                  fields=["SOPInstanceUID"])
            except ArchiveError:
                return None
            present |= {_text(ds, "SOPInstanceUID") for ds in self._datasets(rows, "checking what was stored")}
        return present & {str(ds.SOPInstanceUID) for ds in outputs}

    def _partial(self, datasets: Sequence[Dataset], held: set[str], failed: Mapping[str, str], why: str) -> StoreError:
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        names = {str(ds.SOPInstanceUID): _kind(ds) for ds in datasets}
        stored = [u for u in uids if u in held]
        missing = {u: failed.get(u, "not in the archive after the request") for u in uids if u not in held}
        message = (f"{why}, but {len(stored)} of {len(uids)} outputs are in the archive"
                   + (f" (stored: {', '.join(names[u] for u in stored)})" if stored else "")
                   + f"; missing: {'; '.join(f'{names[u]} {u}: {r}' for u, r in missing.items())}. "
                   "The stored ones are complete and reference only the source images; an archive filter "
                   "or policy may refuse some kinds of object")
        return StoreError(message, stored, missing)


def _stow_answer(exc: Exception) -> Dataset | None:
    """The STOW-RS answer in an HTTP error (409 and the like carry a FailedSOPSequence), if readable."""
    response = getattr(exc, "response", None)
    if response is None or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except Exception:  # noqa: BLE001 - an answer without a DICOM JSON body has nothing to add
        return None


def _kind(ds: Dataset) -> str:
    """A person's name for an output."""
    from pydicom.uid import ComprehensiveSRStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage

    return {ComprehensiveSRStorage: "the structured report", EncapsulatedPDFStorage: "the PDF report",
            SecondaryCaptureImageStorage: f"overlay capture {ds.get('InstanceNumber', '')}".strip(),
            }.get(str(ds.SOPClassUID), "an output")


def _reason(item: Dataset) -> str:
    code = item.get("FailureReason", item.get("WarningReason"))
    return f"status 0x{int(code):04X}" if code is not None else "no reason given"


def _failed(answer: Dataset) -> dict[str, str]:
    return {str(item.ReferencedSOPInstanceUID): f"refused ({_reason(item)})"
            for item in answer.get("FailedSOPSequence", []) if "ReferencedSOPInstanceUID" in item}


def _expected_body_parts(spec: TaskSpec) -> set[str]:
    from core.guard import BODY_PARTS

    # The same rule as the wrong-input guard's tag check (core.guard.check_tags).
    return set(spec.body_parts) or {part for m in spec.modalities for part in BODY_PARTS.get(m, ())}


def suitable_series(series: Sequence[SeriesEntry], spec: TaskSpec) -> list[SeriesEntry]:
    """The series a model is for: its modality, and its body part where the series names one.

    Choosing among several (thin or thick slices, a scout) is the study reader's work; this only
    rules out what the model is not for.

    Raises:
        NoSuitableSeries: None fits; the message lists what the study holds (modality, body
            part and image count, never descriptions).
    """
    expected = _expected_body_parts(spec)
    fits = [s for s in series if s.modality in spec.modalities
            and (not s.body_part or not expected or s.body_part in expected)]
    if not fits:
        # Tag values in the fixed vocabulary only (core.vocabulary): a free-text tag may name the patient.
        held = ", ".join(f"{modality_words(s.modality) or '?'}{' ' + body_part_words(s.body_part) if s.body_part else ''} "
                         f"({s.instance_count if s.instance_count is not None else '?'} images)" for s in series)
        raise NoSuitableSeries(f"this study has no series the {spec.key} model is for "
                               f"({'/'.join(spec.modalities)}, {spec.page.lower()}); it holds: {held or 'nothing'}")
    return fits


def send_results(archive: Archive, summary: ResultSummary) -> StoreResult:
    """Build the PACS-ready SR, captures and PDF of an analysis, check them, and store them.

    Nothing is sent unless every output was built and passed `core.dicom_out.check_outputs`.

    Raises:
        core.dicom_out.OutputError: An output could not be made or failed its checks (nothing sent).
        ArchiveError: The archive failed (see `Archive.store`).
    """
    outputs = build_outputs(summary, pacs_ready=True)
    return archive.store(outputs)
