"""Results as DICOM a PACS can store: a structured report, overlay captures and the PDF report.

Three kinds of output, each in its own new series, every one with new UIDs:

- a Comprehensive SR following TID 1500 (Imaging Measurement Report), built with highdicom:
  the model (name, version, weights sha256 as TID 4019 algorithm identification), each class's
  and finding's calibrated probability, the call at the card's threshold or "uncertain" with the
  likelier class, each finding present / absent / unreliable, the key slices and the
  research-use notice;
- a Secondary Capture per heatmap overlay (the shown image, or one per key slice of a study);
- the one-page PDF report as Encapsulated PDF.

Two forms:

- identifier-free (the default, for downloads): no patient module values (the type 2
  attributes are present and empty), no study date, time, ID or accession number, a new Study
  Instance UID shared by the outputs, and no UID of the source instances anywhere, so the files
  cannot be linked back to the patient; PatientIdentityRemoved says so. What they carry: the
  model identity, the results, the key slices as positions in the analysed series, the upload's
  short hash where given, the time they were made, and the overlays' pixels.
- PACS-ready (`pacs_ready=True`, for sending to the archive the images came from): the patient
  and study attributes copied from the source instances (`IDENTITY_ATTRIBUTES`), the source
  study's UID, and references to the source instances (the SR's evidence and source images, the
  captures' and the PDF's source references), so a viewer shows the outputs beside the images.

`build_outputs` makes all three and `check_outputs` validates them (written to bytes and read
back with pydicom, SOP classes, fresh and unique UIDs, references, and no identifier in the
identifier-free form) before anything leaves the process.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from core.report import DISCLAIMER

if TYPE_CHECKING:
    from core.cards import ModelCard
    from core.decision import Prediction

logger = logging.getLogger(__name__)

MANUFACTURER = "SecondLook"

# A private coding scheme (designators starting "99" are local by PS3.16) for the model's own
# outputs: there is no standard code for "probability of glioma" or for this model's classes.
# Its codes: a class or finding key (lower case, from the registry) for the class or finding,
# "p:<key>" for its probability, and upper-case words for the report's own concepts (CALL,
# LIKELIER, UNRELIABLE, SUMMARY, THRESHOLD, KEYSLICES, UPLOAD, NOTICE), so none can collide.
SCHEME = "99SECONDLOOK"
SCHEME_NAME = "SecondLook model outputs"

# Series numbers of the outputs: high, so they sort after the acquired series in a viewer.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PDF_SERIES_NUMBER = 9903

# Copied from the source, in PACS-ready form only (Patient, General Study and Patient Study modules).
IDENTITY_ATTRIBUTES: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientComments",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "ProcedureCodeSequence",
    "PatientAge", "PatientSize", "PatientWeight", "AdmittingDiagnosesDescription",
)

# Must be empty or absent in the identifier-free form (checked by `check_outputs`).
IDENTIFYING_ATTRIBUTES: tuple[str, ...] = tuple(
    keyword for keyword in IDENTITY_ATTRIBUTES
    if keyword not in ("StudyInstanceUID", "PatientIdentityRemoved", "DeidentificationMethod")
) + ("InstitutionName", "InstitutionAddress", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers",
     "PerformingPhysicianName", "OperatorsName", "ReferencedPatientSequence")

DEIDENTIFICATION_METHOD = "No source identifier copied (SecondLook)"


class OutputError(ValueError):
    """DICOM outputs that could not be made or did not pass their checks; the message says why."""


@dataclass(frozen=True)
class FindingResult:
    """One independent finding's result.

    Attributes:
        key: Registry key (e.g. "sdh").
        title: Human name.
        probability: Calibrated probability in [0, 1].
        threshold: The card's operating threshold.
        reliable: False where the reader or the card marks this finding's output as not to be
            relied on; it is then reported as "unreliable", neither present nor absent.
    """

    key: str
    title: str
    probability: float
    threshold: float
    reliable: bool = True

    @property
    def status(self) -> str:
        """ "present", "absent" or "unreliable"."""
        if not self.reliable:
            return "unreliable"
        return "present" if self.probability >= self.threshold else "absent"


@dataclass(frozen=True)
class Overlay:
    """A heatmap overlay to store as a secondary capture.

    Attributes:
        image: uint8 (H, W, 3) RGB, the heatmap blended on the image as shown.
        source_index: Index into `ResultSummary.sources` of the image it shows, or None.
        description: What it shows, e.g. "Grad-CAM for 'hemorrhage'".
    """

    image: np.ndarray
    source_index: int | None = None
    description: str = "heatmap overlay"


@dataclass(frozen=True)
class ResultSummary:
    """Everything the DICOM writers need to know about one analysis of an image or a study.

    Attributes:
        model_key: Registry key.
        model_name: The card's name.
        model_version: The card's version.
        model_sha256: sha256 of the weights file (64 hex digits).
        labels: Class keys, in model order.
        probabilities: Calibrated probability of each class, same order.
        call: The decided class key (the likelier class where `uncertain`).
        uncertain: True inside the card's indeterminate band: the output reads "uncertain".
        threshold: Operating threshold on the positive class or group, where the model has one.
        positive: The thresholded class or "+"-joined group, where the model has one.
        findings: Independent findings of a multi-label model.
        sources: The analysed DICOM instances in analysis order (anatomical order for a
            study), headers only; empty for a non-DICOM upload.
        key_slices: Indices into `sources` of a study's key slices (empty for one image).
        overlays: Heatmap overlays for the secondary captures.
        pdf: The PDF report's bytes, where one was made.
        notice: The research-use notice.
        upload_hash: Short hash of the upload (what the PDF shows), or None.
    """

    model_key: str
    model_name: str
    model_version: str
    model_sha256: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    call: str
    uncertain: bool = False
    threshold: float | None = None
    positive: str | None = None
    findings: tuple[FindingResult, ...] = ()
    sources: tuple[Dataset, ...] = ()
    key_slices: tuple[int, ...] = ()
    overlays: tuple[Overlay, ...] = ()
    pdf: bytes | None = None
    notice: str = DISCLAIMER
    upload_hash: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if len(self.labels) != len(self.probabilities) or not self.labels:
            problems.append(f"{len(self.labels)} labels but {len(self.probabilities)} probabilities")
        if any(not 0.0 <= p <= 1.0 for p in self.probabilities):
            problems.append("a probability outside [0, 1]")
        if self.call not in self.labels:
            problems.append(f"call {self.call!r} is not one of {list(self.labels)}")
        if (self.threshold is None) != (self.positive is None):
            problems.append("threshold and positive class go together")
        keys = [f.key for f in self.findings]
        if len(set(keys)) != len(keys) or set(keys) & set(self.labels):
            problems.append("finding keys must be unique and differ from the class keys")
        if any(not 0 <= i < len(self.sources) for i in self.key_slices):
            problems.append(f"key slices {list(self.key_slices)} outside the {len(self.sources)} sources")
        for overlay in self.overlays:
            image = overlay.image
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                problems.append(f"an overlay is {image.dtype} {image.shape}, not uint8 (H, W, 3)")
            if overlay.source_index is not None and not 0 <= overlay.source_index < len(self.sources):
                problems.append(f"an overlay shows source {overlay.source_index}, outside the {len(self.sources)} sources")
        if len(self.model_sha256) != 64:
            problems.append("model_sha256 is not a 64-digit sha256")
        if problems:
            raise ValueError("invalid result summary: " + "; ".join(problems))

    @property
    def call_text(self) -> str:
        """The call as read: "hemorrhage" or "uncertain (likelier: hemorrhage)"."""
        return f"uncertain (likelier: {self.call})" if self.uncertain else self.call

    @property
    def referenced(self) -> tuple[Dataset, ...]:
        """The source instances a reader should look at: the key slices, else every source."""
        if self.key_slices:
            return tuple(self.sources[i] for i in self.key_slices)
        return self.sources


@dataclass(frozen=True)
class DicomOutputs:
    """The outputs of one analysis, all in one study (the source's, or a new one).

    Attributes:
        sr: The Comprehensive SR.
        captures: One Secondary Capture per overlay.
        pdf: The Encapsulated PDF, or None where no PDF was given.
        pacs_ready: Whether identifiers and source references were copied.
    """

    sr: Dataset
    captures: tuple[Dataset, ...]
    pdf: Dataset | None
    pacs_ready: bool

    def all(self) -> tuple[Dataset, ...]:
        """Every output, SR first."""
        return (self.sr, *self.captures, *((self.pdf,) if self.pdf is not None else ()))


def header_only(dataset: Dataset) -> Dataset:
    """A copy of a dataset without its pixel data (what the writers need of a source)."""
    copy = Dataset()
    for element in dataset:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            copy.add(element)
    if hasattr(dataset, "file_meta"):
        copy.file_meta = dataset.file_meta
    return copy


# What a result needs of each source instance (`source_header`): its identity, to copy in PACS-ready
# form; its UIDs, to reference it; its geometry, for the SR's image library and the captures'
# orientation. A reader of a series keeps only these of every header (no private tags, no
# acquisition sequences).
SOURCE_ATTRIBUTES: frozenset[str] = frozenset(IDENTITY_ATTRIBUTES) | frozenset((
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber",
    "Modality", "FrameOfReferenceUID", "Rows", "Columns", "NumberOfFrames", "PixelSpacing", "ImagerPixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices", "PatientOrientation",
    "ViewPosition", "BodyPartExamined", "Laterality", "ImageLaterality",
))


def source_header(dataset: Dataset) -> Dataset:
    """The attributes of a source instance a result needs (`SOURCE_ATTRIBUTES`), as a new Dataset.

    Small enough to keep for every slice of a series while the series is on screen (no pixel
    data, no private tags, no functional group sequences).
    """
    kept = Dataset()
    for element in dataset:
        if element.keyword in SOURCE_ATTRIBUTES:
            kept.add(element)
    return kept


def summary_from_prediction(prediction: Prediction, card: ModelCard, *, sources: Sequence[Dataset] = (),
                            key_slices: Sequence[int] = (), overlays: Sequence[Overlay] = (),
                            pdf: bytes | None = None, upload_hash: str | None = None,
                            unreliable: Collection[str] = ()) -> ResultSummary:
    """The writers' input from a prediction (one image's, or a study's) and its model card.

    Args:
        prediction: The calibrated prediction; one the wrong-input guard flagged is refused.
        card: The model's card (name, version, sha256).
        sources: The analysed DICOM instances (pixel data is dropped here).
        key_slices: Indices into `sources` of a study's key slices.
        overlays: Heatmap overlays for the secondary captures.
        pdf: The PDF report's bytes.
        upload_hash: Short hash of the upload.
        unreliable: Finding keys whose output is not to be relied on.

    Raises:
        ValueError: A flagged prediction, or inconsistent inputs (the message lists them).
    """
    if prediction.flag:
        raise ValueError(f"no DICOM result for a scan the model refused: {prediction.flag}")
    unknown = set(unreliable) - {f.key for f in prediction.findings}
    unreliable = set(unreliable) | {f.key for f in prediction.findings if f.unreliable}
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; one of {[f.key for f in prediction.findings]}")
    return ResultSummary(
        model_key=card.key, model_name=card.name, model_version=card.version, model_sha256=card.sha256,
        labels=tuple(prediction.labels), probabilities=tuple(float(p) for p in prediction.probabilities),
        call=prediction.headline()[0], uncertain=prediction.uncertain, threshold=prediction.threshold,
        positive=prediction.positive,
        findings=tuple(FindingResult(f.key, f.title, f.probability, f.threshold, f.key not in unreliable)
                       for f in prediction.findings),
        sources=tuple(header_only(ds) for ds in sources), key_slices=tuple(int(i) for i in key_slices),
        overlays=tuple(overlays), pdf=pdf, upload_hash=upload_hash,
    )


# --- identity -------------------------------------------------------------------------------


def _identity(summary: ResultSummary, pacs_ready: bool) -> Dataset:
    """The patient and study attributes every output of one analysis shares.

    PACS-ready: copied from the first source (all sources must be of one study). Otherwise a
    new Study Instance UID and the type 2 attributes empty.
    """
    identity = Dataset()
    if pacs_ready:
        if not summary.sources:
            raise OutputError("PACS-ready output needs the source DICOM instances (this upload was not DICOM)")
        studies = {str(ds.get("StudyInstanceUID", "")) for ds in summary.sources}
        if len(studies) != 1 or "" in studies:
            raise OutputError(f"the sources belong to {len(studies)} studies (or lack a Study Instance UID); "
                              "PACS-ready output is made per study")
        first = summary.sources[0]
        for keyword in ("SpecificCharacterSet", *IDENTITY_ATTRIBUTES):
            if keyword in first:
                identity[keyword] = first[keyword]
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            if keyword not in identity:  # type 2: present, even when the source lacks it
                setattr(identity, keyword, None)
        return identity
    identity.StudyInstanceUID = generate_uid()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(identity, keyword, None)
    identity.PatientIdentityRemoved = "YES"
    identity.DeidentificationMethod = DEIDENTIFICATION_METHOD
    identity.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: model and class names are plain text of any script
    return identity


def _apply_identity(dataset: Dataset, identity: Dataset) -> None:
    for keyword in ("SpecificCharacterSet", *IDENTITY_ATTRIBUTES):
        if keyword in dataset and keyword not in identity:
            del dataset[keyword]
    for element in identity:
        dataset[element.tag] = copy.deepcopy(element)  # no element (or sequence) shared between outputs


def _stamp(dataset: Dataset, summary: ResultSummary, description: str, now: datetime) -> None:
    """Equipment, series description and the private coding scheme, the same on every output."""
    dataset.Manufacturer = MANUFACTURER
    dataset.ManufacturerModelName = summary.model_name[:64]
    dataset.SoftwareVersions = [summary.model_version[:64], f"sha256 {summary.model_sha256[:16]}"]
    dataset.SeriesDescription = description[:64]
    dataset.InstanceCreationDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = now.strftime("%H%M%S")
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    dataset.CodingSchemeIdentificationSequence = [scheme]


# --- structured report ------------------------------------------------------------------------


def _local(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def _procedure(summary: ResultSummary) -> Any:
    modality = str(summary.sources[0].get("Modality", "")) if summary.sources else ""
    return {"CT": codes.cid100.CTUnspecifiedBodyRegion, "MR": codes.cid100.MRIUnspecifiedBodyRegion,
            "CR": codes.cid100.XRUnspecifiedBodyRegion, "DX": codes.cid100.XRUnspecifiedBodyRegion,
            }.get(modality, codes.cid100.ImagingProcedure)


def _measurement_group(summary: ResultSummary, pacs_ready: bool) -> Any:
    """TID 1501: one group per analysis with every probability, the call and each finding's status."""
    import highdicom as hd

    parameters = [f"weights sha256 {summary.model_sha256}"]
    if summary.positive is not None:
        parameters.append(f"operating threshold: P({summary.positive}) >= {summary.threshold:.4f}")
    parameters += [f"operating threshold: P({f.key}) >= {f.threshold:.4f}" for f in summary.findings]
    algorithm = hd.sr.AlgorithmIdentification(name=summary.model_name, version=summary.model_version,
                                              parameters=parameters)
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    outputs = [(label, label, p) for label, p in zip(summary.labels, summary.probabilities)]
    outputs += [(f.key, f.title, f.probability) for f in summary.findings]
    # The group carries the algorithm identification once; the measurements inherit it.
    measurements = [hd.sr.Measurement(name=_local(f"p:{key}", f"Probability of {title}"), value=float(p), unit=unit)
                    for key, title, p in outputs]
    call = (codes.SCT.Indeterminate if summary.uncertain else _local(summary.call, summary.call))
    # Not (121071, DCM, "Finding"): TID 1501 uses that concept for the finding type.
    evaluations = [hd.sr.QualitativeEvaluation(_local("CALL", "Model call at the operating threshold"), call)]
    if summary.uncertain:
        evaluations.append(hd.sr.QualitativeEvaluation(_local("LIKELIER", "Likelier class"),
                                                       _local(summary.call, summary.call)))
    status_codes = {"present": codes.SCT.Present, "absent": codes.SCT.Absent,
                    "unreliable": _local("UNRELIABLE", "Not reported: unreliable output")}
    evaluations += [hd.sr.QualitativeEvaluation(_local(f.key, f.title), status_codes[f.status])
                    for f in summary.findings]
    sources = None
    if pacs_ready and summary.referenced:
        sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in summary.referenced]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"SecondLook {summary.model_key}"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
        source_images=sources,
    )


def _summary_texts(summary: ResultSummary, pacs_ready: bool) -> Any:
    """TID 1500 row 12: the root's Qualitative Evaluations container, with the texts a reader reads first."""
    import highdicom as hd
    from highdicom.sr import RelationshipTypeValues as Rel

    p = summary.probabilities[summary.labels.index(summary.call)]
    lines = [("SUMMARY", "Model output", f"{summary.call_text} (P = {p:.3f})")]
    if summary.positive is not None:
        lines.append(("THRESHOLD", "Operating threshold", f"P({summary.positive}) >= {summary.threshold:.3f}"))
    if summary.key_slices:
        where = ", ".join(str(i + 1) for i in summary.key_slices)
        lines.append(("KEYSLICES", "Key slices",
                      f"{where} of {len(summary.sources)} analysed slices (1 = first in anatomical order)"))
    if summary.upload_hash and not pacs_ready:
        lines.append(("UPLOAD", "Upload hash", summary.upload_hash))
    lines.append(("NOTICE", "Research-use notice", summary.notice))
    container = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
                                           relationship_type=Rel.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=_local(code, meaning), value=text, relationship_type=Rel.CONTAINS)
         for code, meaning, text in lines])
    return container


def write_sr(summary: ResultSummary, pacs_ready: bool = False, identity: Dataset | None = None,
             now: datetime | None = None) -> Dataset:
    """The Comprehensive SR (TID 1500 Imaging Measurement Report) of one analysis.

    Args:
        summary: The analysis.
        pacs_ready: Copy the patient and study identifiers and reference the sources.
        identity: The shared patient and study attributes (`build_outputs` passes them so that
            all outputs share one study); default: made here.
        now: Creation time (default: now).

    Returns:
        A highdicom `ComprehensiveSR` (a pydicom Dataset).

    Raises:
        OutputError: PACS-ready output without DICOM sources, or sources of several studies.
    """
    import highdicom as hd

    now = now or datetime.now()
    identity = identity if identity is not None else _identity(summary, pacs_ready)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # One stable UID per weights file: the same model is the same observer in every report.
        uid=generate_uid(entropy_srcs=[summary.model_sha256]), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
        model_name=summary.model_name)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    library = list(summary.referenced) if pacs_ready and summary.referenced else None
    try:
        group = _measurement_group(summary, pacs_ready)
        try:
            report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_procedure(summary),
                                             imaging_measurements=[group], referenced_images=library)
        except (ValueError, TypeError, AttributeError) as exc:
            if library is None:
                raise
            # The image library (TID 1600) is optional and wants geometry some objects lack (an
            # enhanced multi-frame keeps it per frame): the report goes without it, not without the results.
            logger.warning("SR image library left out: %s", type(exc).__name__)
            report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_procedure(summary),
                                             imaging_measurements=[group])
    except (ValueError, TypeError, AttributeError) as exc:
        # Not the library's text, which can quote the source's values (names, IDs): the type, in the log.
        logger.error("structured report failed: %s", type(exc).__name__)
        raise OutputError("the structured report could not be made from this study's images") from exc
    report[0].ContentSequence.append(_summary_texts(summary, pacs_ready))
    if pacs_ready:
        # highdicom reads the type 2 patient and study attributes off the first evidence; some
        # sources leave them out, so it sees the first source with the shared identity filled in.
        first = header_only(summary.sources[0])  # a new Dataset: the source stays as it is
        first.update(identity)
        evidence = [first, *summary.sources[1:]]
    else:
        # highdicom takes patient and study from the first evidence: a stand-in carrying the empty
        # identity; it is no instance of the study, so it is dropped from the evidence below.
        stand_in = Dataset()
        stand_in.update(identity)
        stand_in.SOPClassUID = SecondaryCaptureImageStorage
        stand_in.SOPInstanceUID = generate_uid()
        stand_in.SeriesInstanceUID = generate_uid()
        evidence = [stand_in]
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence, content=report[0], series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
            is_final=False, is_verified=False, series_description=f"SecondLook {summary.model_key} SR",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        # Not the library's text, which can quote the source's values (names, IDs): the type, in the log.
        logger.error("structured report failed: %s", type(exc).__name__)
        raise OutputError("the structured report could not be made from this study's images") from exc
    if not pacs_ready:
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            if keyword in sr:
                del sr[keyword]
    _apply_identity(sr, identity)
    _stamp(sr, summary, f"SecondLook {summary.model_key} SR", now)
    sr.ContentDate = now.strftime("%Y%m%d")
    sr.ContentTime = now.strftime("%H%M%S")
    return sr


# --- secondary captures -----------------------------------------------------------------------


def _orientation_letters(source: Dataset | None) -> list[str] | None:
    """Patient Orientation (row, column directions) from Image Orientation (Patient), dominant axis only."""
    if source is None or "ImageOrientationPatient" not in source:
        return None
    cosines = np.asarray([float(v) for v in source.ImageOrientationPatient], dtype=float)
    if cosines.shape != (6,):
        return None
    letters = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(("L", "P", "H")[axis] if vector[axis] > 0 else ("R", "A", "F")[axis])
    return letters


def _source_reference(source: Dataset, purpose: tuple[str, str, str] | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if purpose is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose
        item.PurposeOfReferenceCodeSequence = [code]
    return item


def write_captures(summary: ResultSummary, pacs_ready: bool = False, identity: Dataset | None = None,
                   now: datetime | None = None) -> list[Dataset]:
    """One Secondary Capture (RGB, uncompressed) per overlay, all in one new series.

    Args:
        summary: The analysis (its `overlays`).
        pacs_ready: Copy the identifiers and reference each overlay's source image.
        identity: The shared patient and study attributes (default: made here).
        now: Creation time (default: now).

    Returns:
        highdicom `SCImage` datasets, in overlay order (empty when there is no overlay).
    """
    import highdicom as hd

    now = now or datetime.now()
    identity = identity if identity is not None else _identity(summary, pacs_ready)
    series_uid = generate_uid()
    captures = []
    for number, overlay in enumerate(summary.overlays, start=1):
        source = summary.sources[overlay.source_index] if overlay.source_index is not None else None
        orientation = _orientation_letters(source)
        try:
            capture = hd.sc.SCImage(
                pixel_array=np.ascontiguousarray(overlay.image), photometric_interpretation="RGB", bits_allocated=8,
                coordinate_system="PATIENT", study_instance_uid=identity.StudyInstanceUID,
                series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(),
                instance_number=number, manufacturer=MANUFACTURER,
                # highdicom wants an orientation in the patient frame; where the source has none, the
                # stand-in is replaced by an empty (type 2) value below.
                patient_orientation=tuple(orientation or ("L", "P")),
            )
        except (ValueError, TypeError) as exc:
            logger.error("secondary capture %d failed: %s", number, type(exc).__name__)
            raise OutputError(f"overlay {number} could not be stored as a secondary capture") from exc
        capture.PatientOrientation = orientation
        for keyword in ("BodyPartExamined", "Laterality"):  # anatomy, not identity: kept in both forms
            if source is not None and source.get(keyword):
                capture[keyword] = source[keyword]
        if "BodyPartExamined" not in capture:
            capture.Laterality = None  # type 2C, and with no body part named the side is unknown: empty
        capture.ConversionType = "WSD"  # made by a workstation, not digitised from a film or video
        capture.BurnedInAnnotation = "NO"  # a heatmap blended on the pixels, no text
        description = f"{overlay.description}; {summary.model_name}; {summary.notice}"
        capture.DerivationDescription = description[:1024]
        capture.ImageComments = summary.notice
        if pacs_ready and source is not None:
            capture.SourceImageSequence = [_source_reference(
                source, ("121322", "DCM", "Source image for image processing operation"))]
        _apply_identity(capture, identity)
        _stamp(capture, summary, "SecondLook heatmap overlay", now)
        captures.append(capture)
    return captures


# --- encapsulated PDF -------------------------------------------------------------------------


def write_pdf(summary: ResultSummary, pacs_ready: bool = False, identity: Dataset | None = None,
              now: datetime | None = None) -> Dataset:
    """The PDF report as an Encapsulated PDF instance (PS3.3 A.45.1).

    Args:
        summary: The analysis (its `pdf` bytes).
        pacs_ready: Copy the identifiers and reference the source instances.
        identity: The shared patient and study attributes (default: made here).
        now: Creation time (default: now).

    Raises:
        OutputError: No PDF in the summary, or bytes that are not a PDF.
    """
    if not summary.pdf or not summary.pdf.startswith(b"%PDF-"):
        raise OutputError("there is no PDF report to encapsulate (the bytes do not start with %PDF-)")
    now = now or datetime.now()
    identity = identity if identity is not None else _identity(summary, pacs_ready)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # With its group length (type 1; pydicom computes the value when it writes): its plain dcmwrite,
    # which STOW-RS through dicomweb-client uses, writes only the file meta elements present, and
    # the archive would hold a file without it.
    meta.FileMetaInformationGroupLength = 0
    # A FileDataset with a preamble: dicomweb-client writes each instance with pydicom's plain
    # dcmwrite, which leaves out the preamble and "DICM" of a bare Dataset, and the archive then
    # serves back a file no reader opens.
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"  # the report carries no patient identifier, only the upload's short hash
    ds.DocumentTitle = f"SecondLook report: {summary.model_name}"[:64]
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [title]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # Even length on the wire (PS3.5 7.1.1); EncapsulatedDocumentLength keeps the true length.
    ds.EncapsulatedDocument = summary.pdf + (b"\0" if len(summary.pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(summary.pdf)
    if pacs_ready and summary.referenced:
        ds.SourceInstanceSequence = [_source_reference(ds_) for ds_ in summary.referenced]
    _apply_identity(ds, identity)
    _stamp(ds, summary, "SecondLook report (PDF)", now)
    return ds


# --- all together -----------------------------------------------------------------------------


def build_outputs(summary: ResultSummary, pacs_ready: bool = False, now: datetime | None = None) -> DicomOutputs:
    """The SR, a secondary capture per overlay and the Encapsulated PDF (where a PDF is given), checked.

    Args:
        summary: The analysis.
        pacs_ready: Copy patient and study identifiers from the sources and reference them;
            default: identifier-free outputs in a new study.
        now: Creation time (default: now).

    Returns:
        The outputs, every one with new UIDs, all in one study.

    Raises:
        OutputError: An output could not be made or failed `check_outputs` (the message says which).
    """
    now = now or datetime.now()
    identity = _identity(summary, pacs_ready)
    outputs = DicomOutputs(
        sr=write_sr(summary, pacs_ready, identity, now),
        captures=tuple(write_captures(summary, pacs_ready, identity, now)),
        pdf=write_pdf(summary, pacs_ready, identity, now) if summary.pdf else None,
        pacs_ready=pacs_ready,
    )
    check_outputs(outputs, summary)
    return outputs


def to_bytes(dataset: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, file meta) in memory: what a download or STOW-RS sends."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _uids(dataset: Dataset) -> set[str]:
    """Every UI value anywhere in a dataset, sequences included (pydicom's `iterall` walks into them)."""
    found: set[str] = set()
    for element in dataset.iterall():
        if element.VR == "UI" and element.value:
            found.update(str(v) for v in (element.value if element.VM > 1 else [element.value]))
    return found


def _references(dataset: Dataset) -> set[str]:
    """SOP Instance UIDs a dataset references (evidence, content tree, source sequences)."""
    return {str(element.value) for element in dataset.iterall() if element.keyword == "ReferencedSOPInstanceUID"}


def check_outputs(outputs: DicomOutputs, summary: ResultSummary) -> None:
    """Validate outputs before they leave the process.

    Each output is written to bytes and read back with pydicom; it must have its SOP class,
    new UIDs (none equal to a source's, none repeated), the shared study; in PACS-ready form
    the SR's evidence and the references cover the sources; in identifier-free form no
    identifying attribute has a value and no source UID appears anywhere.

    Raises:
        OutputError: Listing every problem found.
    """
    from pydicom import dcmread, dcmwrite

    problems: list[str] = []
    expected = {"SR": ComprehensiveSRStorage, "SC": SecondaryCaptureImageStorage, "PDF": EncapsulatedPDFStorage}
    kinds = [("SR", outputs.sr)] + [("SC", c) for c in outputs.captures] + ([("PDF", outputs.pdf)] if outputs.pdf else [])
    source_uids = set().union(*(_uids(ds) for ds in summary.sources)) if summary.sources else set()
    source_instances = {str(ds.SOPInstanceUID) for ds in summary.sources}
    seen: set[str] = set()
    studies = set()
    for kind, dataset in kinds:
        try:
            read = dcmread(io.BytesIO(to_bytes(dataset)))
            # As STOW-RS sends it: dicomweb-client writes with pydicom's plain dcmwrite.
            sent = io.BytesIO()
            dcmwrite(sent, dataset)
            dcmread(io.BytesIO(sent.getvalue()))
        except Exception as exc:  # noqa: BLE001 - any failure to write or read back is a failed check
            logger.error("%s does not write and read back: %s", kind, type(exc).__name__)
            problems.append(f"{kind} does not write and read back as a DICOM file")
            continue
        if read.SOPClassUID != expected[kind]:
            problems.append(f"{kind} has SOP class {read.SOPClassUID}")
        studies.add(str(read.StudyInstanceUID))
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
            uid = str(read.get(keyword, ""))
            if not uid or not UID(uid).is_valid:
                problems.append(f"{kind} has no valid {keyword}")
            elif uid in source_instances or (keyword == "SOPInstanceUID" and uid in seen):
                problems.append(f"{kind} reuses {keyword} {uid}")
            if keyword == "SOPInstanceUID":
                seen.add(uid)
        if outputs.pacs_ready:
            if kind == "SR":
                evidence = {uid for *_, uid, _ in _evidence(read)}
                if evidence != source_instances:
                    problems.append(f"SR evidence lists {len(evidence)} instances, not the {len(source_instances)} sources")
            missing = {str(ds.SOPInstanceUID) for ds in summary.referenced} - _references(read)
            if kind != "SC" and missing:
                problems.append(f"{kind} does not reference {len(missing)} key source instances")
            if str(read.get("PatientID") or "") != str(summary.sources[0].get("PatientID") or ""):
                problems.append(f"{kind} does not carry the source's Patient ID")
        else:
            filled = [k for k in IDENTIFYING_ATTRIBUTES if k in read and read[k].value not in (None, "", [])]
            if filled:
                problems.append(f"{kind} carries identifying attributes {filled}")
            leaked = _uids(read) & source_uids
            if leaked:
                problems.append(f"{kind} carries {len(leaked)} source UIDs")
    if len(studies) != 1:
        problems.append(f"the outputs are in {len(studies)} studies, not one")
    elif outputs.pacs_ready and studies != {str(summary.sources[0].StudyInstanceUID)}:
        problems.append("the outputs are not in the source study")
    if problems:
        raise OutputError("DICOM outputs failed their checks: " + "; ".join(problems))
    logger.info("DICOM outputs for %s checked: %d instances (%s)", summary.model_key, len(kinds),
                "PACS-ready" if outputs.pacs_ready else "identifier-free")


def _evidence(sr: Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, instance, class) UIDs an SR lists as evidence."""
    rows = []
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.ReferencedSeriesSequence:
                for instance in series.ReferencedSOPSequence:
                    rows.append((str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
                                 str(instance.ReferencedSOPInstanceUID), str(instance.ReferencedSOPClassUID)))
    return rows
