"""Whole studies: DICOM files (a ZIP, several files, a folder, a multi-frame object) or a NIfTI
volume in; a `Study` of `Series` out, each an ordered stack of slices with its geometry.

DICOM images are grouped by StudyInstanceUID and SeriesInstanceUID. Within a series,
localizers (ImageType LOCALIZER), colour images, images of another modality, orientation or
matrix size are left out, each with a reason and a count; the rest are ordered by
ImagePositionPatient projected on the slice normal (ImageOrientationPatient row x column), or by
InstanceNumber where the files carry no positions (and the series says so). Missing slices (a
gap over 1.5 x the spacing), duplicated positions, gantry tilt and inconsistent pixel spacing or
thickness are reported as warnings; a repeated position is left out, never kept twice. A
series whose DICOM says BurnedInAnnotation YES is refused and keeps no pixels.

Memory: only the stored values (int16 for CT) are kept, with each slice's rescale; Hounsfield
values, windowed 8-bit arrays and `Scan` objects are made slice by slice on demand, so a
300-slice 512 x 512 CT holds about 160 MB. highdicom's `get_volume_from_series` would build a
float64 volume (four times that) and refuses an irregular series instead of saying what is
wrong with it, so grouping and the geometry checks are done here, on numpy.

Nothing is written to disk. Only non-identifying facts are kept for display
(`core.imaging.safe_info`, a sanitised SeriesDescription); logs carry counts, never UIDs,
names or tag values.

Entry points: `read_study` (one upload: ZIP, DICOM or NIfTI bytes), `read_uploads` (several
uploads at once), `read_path` (the command line: a ZIP, folder, DICOM or NIfTI path) and
`read_members` (any iterable of (name, bytes), e.g. an archive reader's members).
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.imaging import (
    CT_MIN_HU,
    DEFAULT_CT_WINDOW,
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    Scan,
    ScanError,
    safe_info,
    window_values,
)
from core.tasks import TaskSpec

logger = logging.getLogger(__name__)

MAX_MEMBERS = 5000  # files in one upload (ZIP members, uploaded files, files in a folder)
MAX_STUDY_BYTES = 1024 * 2**20  # every member together, as read (ZIP members inflated)
# Every decoded pixel of one upload, checked from the headers before any pixel is decoded:
# about 950 slices of 512 x 512 (500 MB as int16).
MAX_STUDY_PIXELS = 250_000_000
GAP_FACTOR = 1.5  # a step between neighbouring slices over this many spacings is a gap
TILT_TOLERANCE_DEG = 0.5
ORIENTATION_TOLERANCE_DEG = 1.0  # row and column directions within this angle: one orientation
DUPLICATE_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.01  # relative spread of pixel spacing or thickness reported as inconsistent
DESCRIPTION_CHARS = 64

ORDERED_BY = {
    "position": "ordered by ImagePositionPatient along the slice normal",
    "instance number": "ordered by InstanceNumber (the files carry no slice positions)",
    "frame order": "in frame order (the file carries no slice positions)",
    "file order": "in the order the files came (they carry no positions or instance numbers)",
    "volume axis": "in the order of the volume's slice axis",
}
PLANES = ("sagittal", "coronal", "axial")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"
BURNED_IN_REASON = (
    "The DICOM says its images have burned-in annotation (text in the pixels that may identify the patient), "
    "so this series was not shown or analysed. Export it without annotations."
)


class StudyError(ScanError):
    """An upload that cannot be read as a study at all; the message is written for a clinician."""


# ---------------------------------------------------------------- result types


@dataclass(frozen=True)
class LeftOut:
    """Images or files not used, for one reason.

    Attributes:
        reason: Why, in words (never a file name or a tag value).
        count: How many.
    """

    reason: str
    count: int


@dataclass(frozen=True)
class Gap:
    """A step between neighbouring slices wider than `GAP_FACTOR` x the spacing.

    Attributes:
        after: Index (in the ordered series) of the slice before the gap.
        distance: The step in mm along the slice normal.
        missing: About how many slices would fill it.
    """

    after: int
    distance: float
    missing: int


@dataclass(frozen=True)
class Geometry:
    """Where a series' slices lie.

    Attributes:
        plane: "axial", "coronal" or "sagittal" (the axis the slice normal is nearest), or None
            where the files carry no orientation.
        rows: Image height in pixels (every slice).
        columns: Image width in pixels (every slice).
        ordered_by: How the slices were ordered: a key of `ORDERED_BY`.
        normal: Unit slice normal in patient coordinates (DICOM LPS), where known.
        positions: Each slice's position along the normal in mm, ascending, where known.
        spacing: Median distance between neighbouring slices in mm, where known.
        thickness: Slice thickness in mm (the most common value), where given.
        pixel_spacing: (row, column) spacing in mm (the most common value), where given.
        tilt: Angle in degrees between the slice normal and the direction the slices are
            stacked in (gantry tilt), where positions are known.
        gaps: Steps wider than `GAP_FACTOR` x the spacing (missing slices).
        duplicates: Images left out because another slice lies at the same position.
    """

    plane: str | None
    rows: int
    columns: int
    ordered_by: str
    normal: tuple[float, float, float] | None = None
    positions: tuple[float, ...] | None = None
    spacing: float | None = None
    thickness: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    tilt: float | None = None
    gaps: tuple[Gap, ...] = ()
    duplicates: int = 0


@dataclass(frozen=True, eq=False)
class _Slice:
    """One stored slice: values as stored in the file, and what turns them into HU."""

    stored: np.ndarray
    slope: float = 1.0
    intercept: float = 0.0
    padding: tuple[int, int] | None = None
    window: tuple[float, float] | None = None
    photometric: str = "MONOCHROME2"
    info: dict[str, Any] = field(default_factory=dict)
    # The source instance's header as a result needs it (`core.dicom_out.source_header`): identifiers
    # among them, so never shown, logged or put in `info`; one object shared by the frames of a file.
    source: Any = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class Series:
    """One series: an ordered stack of 2-D slices with its geometry, or a refusal.

    Only the stored values are held (int16 for CT); `hu`, `window_8bit` and `scan` make one
    slice's values on demand.

    Attributes:
        key: SeriesInstanceUID, or "series-N" / "volume-N" where there is none (NIfTI). An
            identifier: for the command line's `series` field, never logged or shown in the page
            (kept out of the repr).
        study: Which study of the upload the series belongs to (1, 2, ... in the order the
            studies came; StudyInstanceUID itself is not kept), None for NIfTI.
        number: SeriesNumber, where given.
        description: SeriesDescription, printable characters only, at most
            `DESCRIPTION_CHARS` long ("" where none). Untrusted text: show as plain text.
        modality: DICOM Modality (e.g. "CT", "MR"); for NIfTI the one the caller said, or None.
        body_part: BodyPartExamined (sanitised), where given.
        image_type: ImageType values of the slices used (upper case), e.g. ("ORIGINAL", "PRIMARY", "AXIAL").
        source: "dicom" or "nifti".
        geometry: Plane, order, positions, spacing, tilt, gaps of the slices used.
        left_out: Images of this series not used, counted by reason.
        warnings: Problems reported to the reader (missing slices, duplicates, tilt, ...).
        refused: Why the whole series may not be analysed (burned-in annotation, nothing left
            after leaving images out), or None. A refused series holds no slices.
    """

    key: str = field(repr=False)
    study: int | None
    number: int | None
    description: str
    modality: str | None
    body_part: str | None
    image_type: tuple[str, ...]
    source: str
    geometry: Geometry
    left_out: tuple[LeftOut, ...] = ()
    warnings: tuple[str, ...] = ()
    refused: str | None = None
    _slices: tuple[_Slice, ...] = field(default=(), repr=False)
    _luts: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self._slices)

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data this series holds."""
        return sum(s.stored.nbytes for s in self._slices)

    @property
    def left_out_count(self) -> int:
        """How many images of this series were left out, for every reason together."""
        return sum(item.count for item in self.left_out)

    def _slice(self, index: int) -> _Slice:
        if self.refused is not None:
            raise StudyError(self.refused)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self._slices):
            raise IndexError(f"slice {index!r} out of range; the series has {len(self._slices)} slices "
                             f"(0 to {len(self._slices) - 1})")
        return self._slices[int(index)]

    def hu(self, index: int) -> np.ndarray:
        """One slice's values after the modality LUT: Hounsfield units for CT.

        Args:
            index: Slice index in anatomical order (0 to len - 1).

        Returns:
            float32 (rows, columns); padding (PixelPaddingValue) and, for CT, values below
            `core.imaging.CT_MIN_HU` (outside the field of view) are NaN, as in `read_scan`.
        """
        return self._values(self._slice(index), None)

    def _values(self, item: _Slice, steps: list[str] | None) -> np.ndarray:
        stored = item.stored
        if item.slope != 1.0 or item.intercept != 0.0:
            # float64 arithmetic, then float32: the same numbers pydicom's modality LUT gives read_scan.
            values = (stored.astype(np.float64) * item.slope + item.intercept).astype(np.float32)
            if steps is not None:
                unit = " to Hounsfield units" if self.modality == "CT" else ""
                steps.append(f"rescaled{unit} (slope {item.slope:g}, intercept {item.intercept:g})")
        else:
            values = stored.astype(np.float32)
        if item.padding is not None:
            mask = (stored >= item.padding[0]) & (stored <= item.padding[1])
            if mask.any():
                values[mask] = np.nan
                if steps is not None:
                    steps.append(f"{int(mask.sum())} padding pixels masked out")
        if self.modality == "CT":
            with np.errstate(invalid="ignore"):
                outside = values < CT_MIN_HU
            if outside.any():
                values[outside] = np.nan
                if steps is not None:
                    steps.append(f"{int(outside.sum())} pixels below {CT_MIN_HU:g} HU treated as outside the field of view")
        return values

    def window_8bit(self, index: int, window: tuple[float, float]) -> np.ndarray:
        """One slice through a (centre, width) window from its values, as an 8-bit image.

        For a CT model this is what `core.preprocess.eight_bit` gives before the spec's own
        preprocessing steps (times 255), and what the model's 8-bit training files hold.
        Integer slices go through a lookup table over the stored values (one per rescale and
        window, cached), so no float copy of the slice is made.

        Args:
            index: Slice index in anatomical order.
            window: (centre, width) in the values' unit (HU for CT); width > 0.

        Returns:
            uint8 (rows, columns); NaN (padding, outside the field of view) is 0. Values, not a
            display: MONOCHROME1 is not inverted (a Hounsfield unit means the same either way).
        """
        item = self._slice(index)
        center, width = float(window[0]), float(window[1])
        if not width > 0:
            raise ValueError(f"window width must be positive, got {width}")
        stored = item.stored
        if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
            key = (stored.dtype.str, item.slope, item.intercept, item.padding, center, width)
            lut = self._luts.get(key)
            if lut is None:
                lut = self._lut(item, center, width)
                if len(self._luts) > 64:
                    self._luts.clear()
                self._luts[key] = lut
            unsigned = np.dtype(f"u{stored.dtype.itemsize}")
            return lut[np.ascontiguousarray(stored).view(unsigned)]
        return _to_8bit(window_values(self._values(item, None), center, width))

    def _lut(self, item: _Slice, center: float, width: float) -> np.ndarray:
        """uint8 LUT indexed by the stored values' bit pattern (as unsigned)."""
        itemsize = item.stored.dtype.itemsize
        domain = np.arange(2 ** (8 * itemsize), dtype=np.dtype(f"u{itemsize}")).view(item.stored.dtype)
        table = _Slice(stored=domain, slope=item.slope, intercept=item.intercept, padding=item.padding)
        return _to_8bit(window_values(self._values(table, None), center, width))

    def windowed(self, window: tuple[float, float]) -> Iterator[np.ndarray]:
        """Every slice in order through one window: uint8 (rows, columns) each (see `window_8bit`)."""
        for index in range(len(self)):
            yield self.window_8bit(index, window)

    def scan(self, index: int, window: tuple[float, float] | None = None) -> Scan:
        """One slice as a `core.imaging.Scan`, as `read_scan` would give it for that image alone.

        Args:
            index: Slice index in anatomical order.
            window: (centre, width) for `pixels`; None: what a single upload gets (CT: the lung
                window; otherwise the file's window, else the 0.5-99.5 percentile range).

        Returns:
            A Scan with kind "dicom" (or "nifti"), the series' modality, `values` (HU for CT,
            NaN outside), `pixels` in the window (MONOCHROME1 inverted), `steps` and `info`
            (safe tags, orientation, and "slice" / "slices": its 1-based place in the series).
        """
        item = self._slice(index)
        steps = [f"slice {index + 1} of {len(self)}, {ORDERED_BY.get(self.geometry.ordered_by, self.geometry.ordered_by)}"]
        values = self._values(item, steps)
        pixels, used = _display(values, self.modality, window or None, item.window, steps)
        if item.photometric == "MONOCHROME1":
            pixels = 1.0 - pixels
            steps.append("MONOCHROME1 inverted (bright = dense)")
        info = dict(item.info)
        info["slice"] = int(index) + 1
        info["slices"] = len(self)
        if self.geometry.positions is not None:
            info["position_mm"] = round(self.geometry.positions[int(index)], 3)
        return Scan(pixels=pixels.astype(np.float32), kind=self.source, modality=self.modality, values=values,
                    window=used, steps=tuple(steps), info=info)

    def instance_header(self, index: int) -> Any:
        """The header of the DICOM instance a slice comes from (`core.dicom_out.source_header`), or None (NIfTI).

        It carries the patient's and the study's identifiers: for DICOM results only (references and,
        where the reader asks for PACS-ready output, the copied identity); never shown or logged.
        The frames of one multi-frame instance share one header.
        """
        return self._slice(index).source

    def summary(self) -> dict[str, Any]:
        """Non-identifying facts for a list of series (no UIDs): what the reader chooses from."""
        geometry = self.geometry
        return {
            "number": self.number,
            "description": self.description,
            "modality": self.modality,
            "body_part": self.body_part,
            "plane": geometry.plane,
            "slices": len(self),
            "thickness_mm": geometry.thickness,
            "spacing_mm": None if geometry.spacing is None else round(geometry.spacing, 3),
            "matrix": f"{geometry.columns} x {geometry.rows}",
            "ordered_by": geometry.ordered_by,
            "left_out": self.left_out_count,
            "warnings": len(self.warnings),
            "refused": self.refused,
        }


@dataclass(frozen=True)
class SeriesChoice:
    """The series a model reads by default, and why.

    Attributes:
        series: The chosen series, or None where no series can be analysed.
        index: Its index in `Study.series`, or None.
        reason: Why this one, in words (names the series by number and facts, never by UID).
        suited: False where even the chosen series does not fit the model (another modality,
            plane or body part); the reason says which.
    """

    series: Series | None
    index: int | None
    reason: str
    suited: bool


@dataclass(frozen=True, eq=False)
class Study:
    """Everything one upload held: its series (by study, then series number) and what was left out.

    Attributes:
        series: Every series found, refused ones included (they hold no slices).
        left_out: Files not used at all (not DICOM, damaged, no image, ...), counted by reason.
        warnings: Facts about the upload as a whole (several studies, several modalities).
    """

    series: tuple[Series, ...]
    left_out: tuple[LeftOut, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def usable(self) -> tuple[Series, ...]:
        """The series that can be analysed (not refused)."""
        return tuple(s for s in self.series if s.refused is None)

    def get(self, key: str) -> Series:
        """A series by its key (SeriesInstanceUID or name).

        Raises:
            ValueError: If no series has that key; the message lists the keys.
        """
        for item in self.series:
            if item.key == key:
                return item
        raise ValueError(f"unknown series {key!r}; one of {', '.join(s.key for s in self.series)}")

    def listing(self) -> list[dict[str, Any]]:
        """One row of non-identifying facts per series (`Series.summary` plus its index)."""
        return [{"index": index, **item.summary()} for index, item in enumerate(self.series)]

    def choose(self, spec: TaskSpec) -> SeriesChoice:
        """The series a model suits by default, with the reason; the reader may take another.

        Ranked by, in turn: modality in `spec.modalities` (unknown ranks below a match), plane
        equal to `spec.plane`, body part among the model's, an original image rather than a
        derived one (reformat, MIP), no missing or repeated slices, and the most slices.

        Args:
            spec: The model's spec.

        Returns:
            The choice; `series` is None when every series is refused.
        """
        candidates = [(index, item) for index, item in enumerate(self.series) if item.refused is None and len(item)]
        if not candidates:
            reasons = "; ".join(sorted({item.refused or "no slices" for item in self.series}))
            return SeriesChoice(None, None, f"No series can be analysed: {reasons}", False)
        expected_parts = _body_parts(spec)
        facts = {index: _fit(item, spec, expected_parts) for index, item in candidates}
        best_index, best = max(candidates, key=lambda pair: facts[pair[0]])
        fit = facts[best_index]
        parts = []
        modality = best.modality or "unknown modality"
        if fit[0] == 2:
            parts.append(f"{modality}, as the model expects")
        elif fit[0] == 1:
            parts.append(f"the modality is not recorded (the model is for {'/'.join(spec.modalities)})")
        else:
            parts.append(f"no series has the model's modality ({'/'.join(spec.modalities)}); this one is {modality}")
        if spec.plane:
            if fit[1] == 2:
                parts.append(f"{spec.plane} like the model's training slices")
            elif fit[1] == 1:
                parts.append("its plane is not recorded")
            else:
                parts.append(f"{best.geometry.plane}, while the model was trained on {spec.plane} slices")
        if best.body_part and expected_parts:
            parts.append(f"body part {best.body_part}" + ("" if fit[2] == 2 else ", not one the model is for"))
        rivals = [index for index, _ in candidates if facts[index][:3] == fit[:3] and index != best_index]
        if rivals:
            tie = f"of {len(rivals) + 1} series that fit equally,"
            others = [facts[index] for index in rivals]
            if fit[3] > max(other[3] for other in others):
                parts.append(f"{tie} the original images (not a reformat)")
            elif fit[4] > max(other[4] for other in others):
                parts.append(f"{tie} the one without missing or repeated slices")
            elif fit[5] > max(other[5] for other in others):
                parts.append(f"{tie} the one with the most slices")
            else:
                parts.append(f"{tie} the first in the list")
        name = f"Series {best.number}" if best.number is not None else f"Series {best_index + 1} of the list"
        plane = best.geometry.plane or "plane unknown"
        reason = f"{name} ({plane}, {len(best)} slices): " + "; ".join(parts) + "."
        return SeriesChoice(best, best_index, reason, suited=min(fit[:3]) >= 1)


def _body_parts(spec: TaskSpec) -> set[str]:
    if spec.body_parts:
        return set(spec.body_parts)
    # The guard holds the usual body parts per modality; imported here so that reading a study
    # does not import torch until a model is chosen.
    from core.guard import BODY_PARTS

    return {part for modality in spec.modalities for part in BODY_PARTS.get(modality, ())}


def _fit(item: Series, spec: TaskSpec, expected_parts: set[str]) -> tuple[int, int, int, int, int, int]:
    modality = 1 if item.modality is None else 2 * (item.modality in spec.modalities)
    plane = 1 if not spec.plane or item.geometry.plane is None else 2 * (item.geometry.plane == spec.plane)
    body = 1 if not item.body_part or not expected_parts else 2 * (item.body_part.upper() in expected_parts)
    original = int(not {"DERIVED", "SECONDARY", "REFORMATTED", "MPR", "MIP"} & set(item.image_type))
    complete = int(not item.geometry.gaps and not item.geometry.duplicates)
    return modality, plane, body, original, complete, len(item)


# ---------------------------------------------------------------- windowing


def _to_8bit(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255.0).astype(np.uint8)


def _display(values: np.ndarray, modality: str | None, window: tuple[float, float] | None,
             file_window: tuple[float, float] | None, steps: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The same display window choice as a single upload (`core.imaging`), for one slice."""
    if window is not None:
        center, width = float(window[0]), float(window[1])
        unit = " HU" if modality == "CT" else ""
        steps.append(f"window centre {center:g}{unit}, width {width:g}{unit}")
        return window_values(values, center, width), (center, width)
    if modality == "CT":
        center, width = DEFAULT_CT_WINDOW
        steps.append(f"lung window (centre {center:g} HU, width {width:g} HU)")
        return window_values(values, center, width), (center, width)
    if file_window is not None:
        center, width = file_window
        steps.append(f"window from the file (centre {center:g}, width {width:g})")
        return window_values(values, center, width), (center, width)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        steps.append("no valid pixel values in this slice")
        return np.zeros(values.shape, dtype=np.float32), None
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32), None
    steps.append("scaled to the 0.5-99.5 percentile range (no usable window in the file)")
    center, width = (low + high) / 2.0, high - low
    return window_values(values, center, width), (float(center), float(width))


# ---------------------------------------------------------------- entry points


def read_study(data: bytes, filename: str | None = None, *, modality: str | None = None) -> Study:
    """Read one upload as a study: a ZIP of DICOM files, one (multi-frame) DICOM, or NIfTI.

    Args:
        data: The whole upload.
        filename: The name it came under (a hint for the format only; never kept).
        modality: The modality to assume for NIfTI volumes, which do not record one (e.g. "CT"
            for a CT model: then values are HU and CT windows apply). Ignored for DICOM.

    Returns:
        The study, with at least one series (possibly refused).

    Raises:
        StudyError: If the upload is empty, over a limit, not one of those formats, or holds no
            series at all; the message says which and why files were left out.
    """
    return read_uploads([(filename or "", data)], modality=modality)


def read_uploads(files: Iterable[tuple[str, bytes]], *, modality: str | None = None) -> Study:
    """Read several uploads at once (DICOM files, ZIPs, NIfTI) as one study.

    Slices of one series spread over several files or ZIPs come together.

    Args:
        files: (name, bytes) per upload; names are format hints only.
        modality: The modality to assume for NIfTI volumes (see `read_study`).

    Raises:
        StudyError: As `read_study`.
    """
    skipped: list[str] = []

    def members() -> Iterator[tuple[str, bytes]]:
        for name, data in uploaded_files(files, skipped):
            if _is_zip(data):
                yield from zip_members(bytes(data), skipped)
            else:
                if len(data) > MAX_UPLOAD_BYTES:
                    raise StudyError(f"A file is {len(data) / 2**20:.0f} MB; files over "
                                     f"{MAX_UPLOAD_BYTES // 2**20} MB are not accepted.")
                yield name, bytes(data)

    return read_members(members(), skipped=skipped, modality=modality)


def uploaded_files(files: Iterable[tuple[str, bytes]],
                   skipped: list[str]) -> Iterator[tuple[str, bytes | bytearray | memoryview]]:
    """The uploads that hold data, one at a time; each empty one is counted in `skipped`.

    The one rule every upload reader applies before it looks inside a file (`read_uploads` here,
    `core.study.read_upload` with the archive budget).

    Args:
        files: (name, data) per upload, as the caller received them.
        skipped: Receives "empty file" per upload of no bytes.

    Raises:
        StudyError: An upload's data is not bytes.
    """
    for name, data in files:
        # The annotation is not enforced: a caller may pass None or text for a file it did not get.
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StudyError("No file data was received.")
        if not data:
            skipped.append("empty file")
            continue
        yield name, data


def read_path(path: str | os.PathLike[str], *, modality: str | None = None) -> Study:
    """Read a study from the command line's PATH: a folder, a ZIP, a DICOM or a NIfTI file.

    Args:
        path: The path as given.
        modality: The modality to assume for NIfTI volumes (see `read_study`).

    Raises:
        StudyError: If the path does not exist or cannot be read as a study.
    """
    path = Path(path)
    if path.is_dir():
        skipped: list[str] = []
        return read_members(folder_members(path, skipped), skipped=skipped, modality=modality)
    if not path.is_file():
        raise StudyError("The path is neither a file nor a folder.")
    size = path.stat().st_size
    limit = max(MAX_UPLOAD_BYTES, MAX_STUDY_BYTES)
    if size > limit:
        raise StudyError(f"The file is {size / 2**20:.0f} MB; over the {limit // 2**20} MB accepted.")
    return read_study(path.read_bytes(), path.name, modality=modality)


def read_members(members: Iterable[tuple[str, bytes]], *, skipped: Sequence[str] = (),
                 modality: str | None = None) -> Study:
    """Read files (DICOM or NIfTI) into a study: group, order, check, and keep the stored values.

    This is the seam for any archive reader: it takes (name, bytes) pairs one at a time and
    keeps only the decoded values of each, so a lazy iterable never holds every file at once.

    Args:
        members: (name, bytes) pairs; the name is a format hint only (.dcm, .nii, .nii.gz) and is
            never kept, shown or logged.
        skipped: Reasons, one per file the caller already left out (e.g. an archive reader's
            skipped members); read after `members` is exhausted, so a reader may fill it lazily.
        modality: The modality to assume for NIfTI volumes (see `read_study`).

    Returns:
        The study.

    Raises:
        StudyError: Over `MAX_MEMBERS`, `MAX_STUDY_BYTES` or `MAX_STUDY_PIXELS`, or nothing
            readable as a series; the message says why files were left out.
    """
    budget = _Budget()
    frames: list[_Frame] = []
    volumes: list[Series] = []
    left: Counter[str] = Counter()
    for name, data in members:
        budget.take_member(len(data))
        kind = _sniff(data, name)
        if kind == "dicom":
            result = _read_dicom(data, budget.members, budget)
            if isinstance(result, str):
                left[result] += 1
            else:
                frames.extend(result)
        elif kind == "nifti":
            try:
                volumes.append(_read_nifti(data, len(volumes) + 1, modality, budget))
            except _Unusable as exc:
                left[str(exc)] += 1
        elif kind == "zip":
            left["an archive inside the archive (not opened)"] += 1
        else:
            left["not a DICOM or NIfTI file"] += 1
    for reason in skipped:
        left[reason] += 1
    series = _assemble(frames) + volumes
    left_out = tuple(LeftOut(reason, count) for reason, count in left.most_common())
    if not series:
        detail = "; ".join(f"{item.count} {item.reason}" for item in left_out) or "the upload is empty"
        raise StudyError(f"No DICOM series or NIfTI volume was found ({detail}).")
    warnings = []
    studies = {item.study for item in series if item.study is not None}
    if len(studies) > 1:
        warnings.append(f"The upload holds {len(studies)} studies; their series are listed together.")
    modalities = sorted({item.modality for item in series if item.modality})
    if len(modalities) > 1:
        warnings.append(f"The upload holds series of several modalities ({', '.join(modalities)}).")
    study = Study(series=tuple(series), left_out=left_out, warnings=tuple(warnings))
    logger.info("study read: %d series (%d usable), %d slices, %d files left out, %.0f MB held",
                len(series), len(study.usable), sum(len(s) for s in series), sum(left.values()),
                sum(s.nbytes for s in series) / 2**20)
    return study


def zip_members(data: bytes, skipped: list[str]) -> Iterator[tuple[str, bytes]]:
    """The files of a ZIP, one at a time, within the study limits; skipped ones get a reason.

    Folders inside the ZIP do not matter (any layout); macOS resource files, encrypted
    members and members over the size limit are skipped with a reason appended to `skipped`.
    Each member is read at most up to its declared size (zipfile stops there and checks the CRC).

    Args:
        data: The ZIP file.
        skipped: Receives one reason per skipped member.

    Raises:
        StudyError: If the ZIP is damaged, or over `MAX_MEMBERS` or `MAX_STUDY_BYTES`.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise StudyError("The ZIP file is damaged or not a ZIP archive.") from None
    if len(infos) > MAX_MEMBERS:
        raise StudyError(f"The ZIP holds {len(infos)} files; at most {MAX_MEMBERS} are accepted in one upload.")
    declared = sum(info.file_size for info in infos)
    if declared > MAX_STUDY_BYTES:
        raise StudyError(f"The ZIP unpacks to {declared / 2**20:.0f} MB; at most {MAX_STUDY_BYTES // 2**20} MB "
                         "are accepted in one upload.")
    with archive:
        for info in infos:
            base = info.filename.rsplit("/", 1)[-1]
            if info.filename.startswith("__MACOSX/") or base.startswith("._") or base == ".DS_Store":
                skipped.append("macOS metadata file")
                continue
            if info.flag_bits & 0x1:
                skipped.append("encrypted file in the ZIP")
                continue
            if info.file_size > MAX_UPLOAD_BYTES:
                skipped.append(f"file over {MAX_UPLOAD_BYTES // 2**20} MB in the ZIP")
                continue
            try:
                with archive.open(info) as handle:
                    content = handle.read(info.file_size + 1)
            except NotImplementedError:
                skipped.append("file compressed with a method not supported here")
                continue
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, ValueError):
                skipped.append("damaged file in the ZIP")
                continue
            yield info.filename, content


def folder_members(folder: Path, skipped: list[str]) -> Iterator[tuple[str, bytes]]:
    """The files under a folder (any depth, links not followed), one at a time, within the limits.

    Args:
        folder: The folder.
        skipped: Receives one reason per skipped file.

    Raises:
        StudyError: Over `MAX_MEMBERS` files.
    """
    count = 0
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink():
                skipped.append("link (not followed)")
                continue
            if not path.is_file():
                continue
            count += 1
            if count > MAX_MEMBERS:
                raise StudyError(f"The folder holds more than {MAX_MEMBERS} files; at most {MAX_MEMBERS} are accepted.")
            if path.stat().st_size > MAX_UPLOAD_BYTES:
                skipped.append(f"file over {MAX_UPLOAD_BYTES // 2**20} MB")
                continue
            try:
                data = path.read_bytes()
            except OSError:
                skipped.append("file that could not be read")
                continue
            yield str(path.relative_to(folder)), data


# ---------------------------------------------------------------- limits and sniffing


class _Unusable(Exception):
    """One file left out; the message is the reason (never a name or tag value)."""


@dataclass
class _Budget:
    members: int = 0
    bytes: int = 0
    pixels: int = 0

    def take_member(self, size: int) -> None:
        self.members += 1
        self.bytes += size
        if self.members > MAX_MEMBERS:
            raise StudyError(f"The upload holds more than {MAX_MEMBERS} files; at most {MAX_MEMBERS} are accepted.")
        if self.bytes > MAX_STUDY_BYTES:
            raise StudyError(f"The upload's files add up to more than {MAX_STUDY_BYTES // 2**20} MB; "
                             "that is over the limit for one study.")

    def take_bytes(self, size: int) -> None:
        self.bytes += size
        if self.bytes > MAX_STUDY_BYTES:
            raise StudyError(f"The upload's files add up to more than {MAX_STUDY_BYTES // 2**20} MB once unpacked; "
                             "that is over the limit for one study.")

    def take_pixels(self, count: int) -> None:
        self.pixels += count
        if self.pixels > MAX_STUDY_PIXELS:
            raise StudyError(f"The upload holds more than {MAX_STUDY_PIXELS // 1_000_000} million pixels "
                             f"(about {MAX_STUDY_PIXELS // (512 * 512)} slices of 512 x 512); that is over the "
                             "limit for one study. Upload one series at a time.")


def _is_zip(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:4]) in (b"PK\x03\x04", b"PK\x05\x06")


def _nifti_kind(head: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI header, 0 for a header-only (.hdr/.img) one, else None."""
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        size = int.from_bytes(head[:4], "little")
        if size == 348 or int.from_bytes(head[:4], "big") == 348:
            return 1 if head[344:347] == b"n+1" else 0
    if len(head) >= 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return 2 if head[4:7] == b"n+2" else 0
    return None


def upload_kind(data: bytes, name: str | None = None) -> str:
    """What one file is, decided from its bytes: "zip", "dicom", "nifti" or "other" (the name only
    helps for a DICOM stream without its preamble)."""
    return _sniff(data, name)


def _sniff(data: bytes, name: str | None) -> str:
    """"zip", "dicom", "nifti" or "other", from the bytes (the name only for headerless DICOM)."""
    if _is_zip(data):
        return "zip"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if _nifti_kind(data[:548]) is not None:
        return "nifti"
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data[:65536], 548)
        except zlib.error:
            return "other"
        return "nifti" if _nifti_kind(head) is not None else "other"
    lowered = (name or "").lower()
    # Without the preamble, a DICOM stream starts with a group 0002 or 0008 tag (little endian).
    if data[:2] in (b"\x02\x00", b"\x08\x00") or lowered.endswith((".dcm", ".dicom")):
        return "dicom"
    return "other"


# ---------------------------------------------------------------- DICOM


@dataclass
class _Frame:
    """One image (a file, or a frame of a multi-frame file) before grouping."""

    arrival: int
    frame: int
    study: str
    series: str
    number: int | None
    description: str
    modality: str | None
    body_part: str | None
    image_type: tuple[str, ...]
    iop: np.ndarray | None
    ipp: np.ndarray | None
    instance: int | None
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    gantry_tilt: float | None
    burned_in: bool
    colour: bool
    problem: str | None
    item: _Slice | None


def _text(value: Any, limit: int = DESCRIPTION_CHARS) -> str:
    """Printable characters only, whitespace collapsed, at most `limit` long."""
    if value is None:
        return ""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    text = " ".join(text.split())
    return text[:limit]


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not len(value):
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _floats(value: Any, count: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        numbers = np.array([float(v) for v in value][:count], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        return None
    return numbers


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else int(number)


def _first_item(container: Any, keyword: str) -> Any:
    try:
        sequence = container.get(keyword)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not sequence:
        return None
    try:
        return sequence[0]
    except (IndexError, TypeError):
        return None


def _frame_facts(ds: Any, n_frames: int) -> list[dict[str, Any]]:
    """Per-frame geometry, rescale and window: per-frame functional groups over shared ones
    over the top-level tags (enhanced multi-frame objects keep them in the groups)."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    image_type = tuple(_text(v, 32).upper() for v in (ds.get("ImageType") or []))
    out = []
    for index in range(n_frames):
        groups = [group for group in ((per_frame[index] if index < len(per_frame) else None), shared)
                  if group is not None]

        def grouped(sequence: str, keyword: str, fallback: Any = None) -> Any:
            for group in groups:
                item = _first_item(group, sequence)
                if item is not None and item.get(keyword) not in (None, ""):
                    return item.get(keyword)
            return fallback

        top_position = ds.get("ImagePositionPatient") if n_frames == 1 else None
        frame_type = (grouped("CTImageFrameTypeSequence", "FrameType")
                      or grouped("MRImageFrameTypeSequence", "FrameType"))
        center = _float(grouped("FrameVOILUTSequence", "WindowCenter", ds.get("WindowCenter")))
        width = _float(grouped("FrameVOILUTSequence", "WindowWidth", ds.get("WindowWidth")))
        spacing = _floats(grouped("PixelMeasuresSequence", "PixelSpacing", ds.get("PixelSpacing")), 2)
        out.append({
            "iop": _floats(grouped("PlaneOrientationSequence", "ImageOrientationPatient",
                                   ds.get("ImageOrientationPatient")), 6),
            "ipp": _floats(grouped("PlanePositionSequence", "ImagePositionPatient", top_position), 3),
            "pixel_spacing": None if spacing is None else (float(spacing[0]), float(spacing[1])),
            "thickness": _float(grouped("PixelMeasuresSequence", "SliceThickness", ds.get("SliceThickness"))),
            "slope": _float(grouped("PixelValueTransformationSequence", "RescaleSlope", ds.get("RescaleSlope"))),
            "intercept": _float(grouped("PixelValueTransformationSequence", "RescaleIntercept",
                                        ds.get("RescaleIntercept"))),
            "window": (center, width) if center is not None and width is not None and width > 0 else None,
            "image_type": tuple(_text(v, 32).upper() for v in frame_type) if frame_type else image_type,
            "stack": _int(grouped("FrameContentSequence", "InStackPositionNumber")),
        })
    return out


def _plane(iop: np.ndarray | None) -> str | None:
    if iop is None:
        return None
    normal = np.cross(iop[:3], iop[3:6])
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-6:
        return None
    return PLANES[int(np.argmax(np.abs(normal)))]


def _compact(array: np.ndarray) -> np.ndarray:
    """Stored values in at most 2 bytes each where they fit (int16 for CT), else float32."""
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        return array
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if -32768 <= low and high <= 32767:
            return array.astype(np.int16)
        if 0 <= low and high <= 65535:
            return array.astype(np.uint16)
    return array.astype(np.float32)


def _read_dicom(data: bytes, arrival: int, budget: _Budget) -> list[_Frame] | str:
    """One DICOM file -> its frames (stored values decoded), or the reason it is left out."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_magic = len(data) >= 132 and data[128:132] == b"DICM"
    if _DEFLATED_SYNTAX in data[:2048]:
        # pydicom inflates a deflated dataset whole, with no bound: not accepted in a study.
        return "deflate-compressed DICOM (not accepted: its size cannot be checked before inflating)"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_magic)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            OverflowError, RecursionError, NotImplementedError, UnicodeError):
        return "damaged or unreadable DICOM file"
    if not has_magic and "SOPClassUID" not in ds and "PixelData" not in ds:
        return "not a DICOM or NIfTI file"  # named .dcm or starting like one, but nothing DICOM in it
    try:
        return _dicom_frames(ds, arrival, budget)
    except StudyError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError):
        return "DICOM file with an inconsistent header"


def _dicom_frames(ds: Any, arrival: int, budget: _Budget) -> list[_Frame] | str:
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if meta_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR index (not an image)"
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "DICOM file without an image (a report or structured data)"
    rows, columns = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
    n_frames = max(_int(ds.get("NumberOfFrames")) or 1, 1)
    samples = _int(ds.get("SamplesPerPixel")) or 1
    if rows <= 0 or columns <= 0:
        return "DICOM file with no image size (Rows, Columns)"
    if rows * columns > MAX_PIXELS:
        return f"image over {MAX_PIXELS // 1_000_000} million pixels (not decoded)"
    photometric = _text(ds.get("PhotometricInterpretation"), 16).upper() or "MONOCHROME2"
    colour = samples > 1 or photometric not in ("MONOCHROME1", "MONOCHROME2")
    burned_in = _text(ds.get("BurnedInAnnotation"), 8).upper() == "YES"
    modality = _text(ds.get("Modality"), 16).upper() or None
    facts = _frame_facts(ds, n_frames)

    array: np.ndarray | None = None
    problem: str | None = None
    if not (burned_in or colour):  # no pixel of a refused or unusable image is decoded
        budget.take_pixels(rows * columns * n_frames * samples)
        array, problem = _decode(ds, n_frames, rows, columns)

    base_info = safe_info(ds, n_frames, None)
    base_info.pop("orientation", None)
    padding = _padding(ds, array)
    from core.dicom_out import source_header

    source = source_header(ds) if array is not None else None
    lut_values = array is not None and "ModalityLUTSequence" in ds
    if lut_values:
        from pydicom.pixels import apply_modality_lut

        try:
            values = np.asarray(apply_modality_lut(array, ds), dtype=np.float32)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            values, problem = None, "invalid modality LUT"
        if values is not None and padding is not None:
            values[(array >= padding[0]) & (array <= padding[1])] = np.nan
        array, padding = values, None
    frames = []
    for index, fact in enumerate(facts):
        item = None
        if array is not None:
            info = dict(base_info)
            if n_frames > 1:
                info["frame"] = index + 1
            plane = _plane(fact["iop"])
            if plane:
                info["orientation"] = plane
            if fact["pixel_spacing"] is not None:
                info["PixelSpacing"] = list(fact["pixel_spacing"])
            if fact["thickness"] is not None:
                info["SliceThickness"] = fact["thickness"]
            slope = 1.0 if lut_values else (fact["slope"] or 1.0)
            intercept = 0.0 if lut_values else (fact["intercept"] or 0.0)
            item = _Slice(stored=array[index], slope=slope, intercept=intercept, padding=padding,
                          window=fact["window"], photometric=photometric, info=info, source=source)
        frames.append(_Frame(
            arrival=arrival, frame=index,
            study=_text(ds.get("StudyInstanceUID"), 64), series=_text(ds.get("SeriesInstanceUID"), 64),
            number=_int(ds.get("SeriesNumber")), description=_text(ds.get("SeriesDescription")),
            modality=modality, body_part=_text(ds.get("BodyPartExamined"), 16).upper() or None,
            image_type=fact["image_type"], iop=fact["iop"], ipp=fact["ipp"],
            instance=fact["stack"] if fact["stack"] is not None else _int(ds.get("InstanceNumber")),
            rows=rows, columns=columns, pixel_spacing=fact["pixel_spacing"], thickness=fact["thickness"],
            gantry_tilt=_float(ds.get("GantryDetectorTilt")), burned_in=burned_in, colour=colour,
            problem=problem, item=item,
        ))
    return frames


def _decode(ds: Any, n_frames: int, rows: int, columns: int) -> tuple[np.ndarray | None, str | None]:
    """(frames, rows, columns) stored values, or None and the reason they cannot be decoded."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        array = np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError, ImportError):
        if syntax is not None and getattr(syntax, "is_compressed", False):
            name = getattr(syntax, "name", None) or "compressed"
            return None, f"compressed pixel data ({name}) with no decoder installed here"
        return None, "pixel data that cannot be decoded"
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError, IndexError, MemoryError):
        return None, "pixel data damaged or inconsistent with its header"
    if n_frames == 1 and array.ndim == 2:
        array = array[None]
    if array.shape != (n_frames, rows, columns):
        return None, "pixel data inconsistent with its header"
    return _compact(array), None


def _padding(ds: Any, array: np.ndarray | None) -> tuple[int, int] | None:
    """PixelPaddingValue (and PixelPaddingRangeLimit) on stored integer values, as in core.imaging."""
    pad = ds.get("PixelPaddingValue")
    if array is None or pad is None or isinstance(pad, (list, tuple)) or array.dtype.kind not in "iu":
        return None
    pad = int(pad)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is not None and not isinstance(limit, (list, tuple)):
        low, high = sorted((pad, int(limit)))
        return low, high
    return pad, pad


# ---------------------------------------------------------------- grouping and geometry


def _assemble(frames: list[_Frame]) -> list[Series]:
    groups: dict[tuple[str, str], list[_Frame]] = {}
    for frame in frames:
        groups.setdefault((frame.study, frame.series), []).append(frame)
    studies = {study: order for order, study in enumerate(dict.fromkeys(key[0] for key in groups), start=1)}
    built = [_build_series(members, index, studies[key[0]])
             for index, (key, members) in enumerate(groups.items(), start=1)]
    order = sorted(range(len(built)), key=lambda k: (built[k].study,
                                                     built[k].number if built[k].number is not None else 1 << 30, k))
    return [built[k] for k in order]


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _leave_out(keep: list[_Frame], left: Counter[str], reason_of: Any) -> list[_Frame]:
    """Drop the frames `reason_of` gives a reason for, counting them in `left`."""
    kept = []
    for frame in keep:
        reason = reason_of(frame)
        if reason:
            left[reason] += 1
        else:
            kept.append(frame)
    return kept


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    limit = math.cos(math.radians(ORIENTATION_TOLERANCE_DEG))
    for start in (0, 3):
        u, v = a[start:start + 3], b[start:start + 3]
        norms = np.linalg.norm(u) * np.linalg.norm(v)
        if norms < 1e-9 or float(u @ v) / norms < limit:
            return False
    return True


def _build_series(frames: list[_Frame], index: int, study: int) -> Series:
    first = frames[0]
    key = first.series or f"series-{index}"
    description = next((f.description for f in frames if f.description), "")
    number = next((f.number for f in frames if f.number is not None), None)
    left: Counter[str] = Counter()
    warnings: list[str] = []

    def refused(reason: str, keep: list[_Frame], modality: str | None) -> Series:
        geometry = Geometry(plane=_plane(keep[0].iop) if keep else None, rows=first.rows, columns=first.columns,
                            ordered_by="file order")
        return Series(key=key, study=study, number=number, description=description, modality=modality,
                      body_part=_most_common(f.body_part for f in frames), image_type=first.image_type,
                      source="dicom", geometry=geometry,
                      left_out=tuple(LeftOut(r, c) for r, c in left.most_common()), refused=reason)

    modality = _most_common(f.modality for f in frames)
    if any(f.burned_in for f in frames):
        left["burned-in annotation (series refused)"] += len(frames)
        return refused(BURNED_IN_REASON, [], modality)

    keep = _leave_out(frames, left, lambda f: "localizer (scout) image" if "LOCALIZER" in f.image_type else None)
    keep = _leave_out(keep, left, lambda f: "colour image, not a grey-level slice" if f.colour else None)
    keep = _leave_out(keep, left, lambda f: f.problem)
    modalities = Counter(f.modality for f in keep)
    if len(modalities) > 1:
        modality = modalities.most_common(1)[0][0]
        others = ", ".join(str(m) for m in modalities if m != modality)
        warnings.append(f"Mixed modalities in one series ({modality} and {others}): only the {modality} images are used.")
        keep = _leave_out(keep, left, lambda f: f"modality {f.modality} in a {modality} series"
                          if f.modality != modality else None)

    # Orientation: the largest group of images sharing row and column directions is the series.
    oriented = [f for f in keep if f.iop is not None]
    reference = None
    if oriented:
        clusters: list[tuple[np.ndarray, list[_Frame]]] = []
        for frame in oriented:
            for iop, members in clusters:
                if _same_orientation(iop, frame.iop):
                    members.append(frame)
                    break
            else:
                clusters.append((frame.iop, [frame]))
        reference, main = max(clusters, key=lambda cluster: len(cluster[1]))
        chosen = {id(f) for f in main}
        main_plane = _plane(reference)

        def orientation_reason(frame: _Frame) -> str | None:
            if frame.iop is None:
                return "no orientation (ImageOrientationPatient missing)"
            if id(frame) in chosen:
                return None
            plane = _plane(frame.iop)
            return f"another orientation ({plane})" if plane != main_plane else f"another orientation ({plane}, tilted differently)"

        keep = _leave_out(keep, left, orientation_reason)
    matrix = _most_common((f.rows, f.columns) for f in keep)
    keep = _leave_out(keep, left, lambda f: f"another matrix size ({f.columns} x {f.rows})"
                      if (f.rows, f.columns) != matrix else None)
    positioned = sum(f.ipp is not None for f in keep)
    if reference is not None and len(keep) > positioned > len(keep) / 2:
        # Most images say where they are: the few that do not cannot be put in order among them.
        keep = _leave_out(keep, left, lambda f: "no slice position (ImagePositionPatient missing)"
                          if f.ipp is None else None)
    if not keep:
        reasons = ", ".join(f"{c} {r}" for r, c in left.most_common())
        return refused(f"Nothing in this series can be analysed: every image was left out ({reasons}).", keep, modality)

    ordered, geometry_facts = _order(keep, reference, left, warnings)
    plane = _plane(reference)
    thickness = _most_common(f.thickness for f in ordered)
    pixel_spacing = _most_common(f.pixel_spacing for f in ordered)
    _spread_warning([f.thickness for f in ordered], "Slice thickness", warnings)
    _spread_warning([f.pixel_spacing[0] for f in ordered if f.pixel_spacing], "Pixel spacing", warnings)
    tilts = [abs(f.gantry_tilt) for f in ordered if f.gantry_tilt is not None]
    tilt = geometry_facts.get("tilt")
    if tilts and max(tilts) > TILT_TOLERANCE_DEG and not (tilt and tilt > TILT_TOLERANCE_DEG):
        warnings.append(f"The DICOM says the gantry was tilted by {max(tilts):.1f} degrees.")
    geometry = Geometry(
        plane=plane, rows=matrix[0], columns=matrix[1], ordered_by=geometry_facts["ordered_by"],
        normal=geometry_facts.get("normal"), positions=geometry_facts.get("positions"),
        spacing=geometry_facts.get("spacing"), thickness=thickness, pixel_spacing=pixel_spacing, tilt=tilt,
        gaps=geometry_facts.get("gaps", ()), duplicates=geometry_facts.get("duplicates", 0),
    )
    image_type = _most_common(f.image_type for f in ordered) or ()
    return Series(
        key=key, study=study, number=number, description=description, modality=modality,
        body_part=_most_common(f.body_part for f in ordered), image_type=image_type, source="dicom",
        geometry=geometry, left_out=tuple(LeftOut(r, c) for r, c in left.most_common()), warnings=tuple(warnings),
        _slices=tuple(f.item for f in ordered),
    )


def _spread_warning(values: list[float | None], name: str, warnings: list[str]) -> None:
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return
    low, high = min(known), max(known)
    if high - low > SPACING_TOLERANCE * max(abs(high), 1e-6):
        warnings.append(f"{name} differs between slices ({low:g} to {high:g} mm): sizes are not comparable "
                        "from slice to slice.")


def _order(keep: list[_Frame], reference: np.ndarray | None, left: Counter[str],
           warnings: list[str]) -> tuple[list[_Frame], dict[str, Any]]:
    """Anatomical order, duplicates left out, and the geometry facts of the ordered slices."""
    if reference is not None and all(f.ipp is not None for f in keep):
        normal = np.cross(reference[:3], reference[3:6])
        normal = normal / np.linalg.norm(normal)
        distance = {id(f): float(f.ipp @ normal) for f in keep}
        ranked = sorted(keep, key=lambda f: (distance[id(f)], f.instance if f.instance is not None else 0,
                                             f.arrival, f.frame))
        ordered: list[_Frame] = []
        duplicates = 0
        for frame in ranked:
            if ordered and distance[id(frame)] - distance[id(ordered[-1])] < DUPLICATE_TOLERANCE_MM:
                duplicates += 1
                left["duplicate position (another image lies at the same place)"] += 1
                continue
            ordered.append(frame)
        if duplicates:
            warnings.append(f"{duplicates} image(s) repeat the position of another slice: one image per position "
                            "is used (the lowest InstanceNumber), the repeats are left out.")
        positions = np.array([distance[id(f)] for f in ordered])
        facts: dict[str, Any] = {"ordered_by": "position", "normal": tuple(float(v) for v in normal),
                                 "positions": tuple(float(v) for v in positions), "duplicates": duplicates}
        if len(ordered) >= 2:
            steps = np.diff(positions)
            spacing = float(np.median(steps))
            facts["spacing"] = spacing
            gaps = tuple(Gap(after=int(k), distance=float(steps[k]), missing=max(int(round(steps[k] / spacing)) - 1, 1))
                         for k in np.flatnonzero(steps > GAP_FACTOR * spacing))
            facts["gaps"] = gaps
            if gaps:
                listed = ", ".join(f"after slice {g.after + 1} ({g.distance:.3g} mm, about {g.missing} missing)"
                                   for g in gaps[:3])
                more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
                warnings.append(f"Missing slices: {len(gaps)} gap(s) wider than {GAP_FACTOR:g} x the spacing of "
                                f"{spacing:.3g} mm: {listed}{more}.")
            stack = ordered[-1].ipp - ordered[0].ipp
            length = float(np.linalg.norm(stack))
            if length > 0:
                cosine = min(abs(float(stack @ normal)) / length, 1.0)
                tilt = math.degrees(math.acos(cosine))
                facts["tilt"] = tilt
                if tilt > TILT_TOLERANCE_DEG:
                    warnings.append(f"Gantry tilt: the slices are stacked at {tilt:.1f} degrees to their own normal. "
                                    "Each slice is read as it is; as a volume the stack is sheared.")
        return ordered, facts
    multi_frame = len({f.arrival for f in keep}) == 1 and len(keep) > 1
    instances = [f.instance for f in keep]
    if all(i is not None for i in instances) and len(set(instances)) > 1:
        ordered = sorted(keep, key=lambda f: (f.instance, f.arrival, f.frame))
        ordered_by = "instance number"
        if len(set(instances)) < len(instances):
            warnings.append("Some images share an InstanceNumber; their order among themselves is the order they came in.")
    else:
        ordered = sorted(keep, key=lambda f: (f.arrival, f.frame))
        ordered_by = "frame order" if multi_frame else "file order"
    if len(ordered) > 1:
        how = {"instance number": "ordered by InstanceNumber", "frame order": "in the order of the frames",
               "file order": "in the order the files came"}[ordered_by]
        warnings.append(f"The images carry no slice positions (ImagePositionPatient): the slices are {how}, "
                        "which need not follow the anatomy; missing or repeated slices cannot be checked.")
    return ordered, {"ordered_by": ordered_by}


# ---------------------------------------------------------------- NIfTI


def _inflate(data: bytes, size: int) -> bytes:
    """The first `size` bytes a gzip stream inflates to; nothing past them is ever produced."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        return inflater.decompress(data, size)
    except zlib.error:
        raise _Unusable("damaged gzip-compressed NIfTI file") from None


def _nibabel_errors() -> tuple[type[BaseException], ...]:
    """What nibabel raises on a damaged file, besides the builtin errors."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError, ImageDataError
    from nibabel.wrapstruct import WrapStructError

    return (HeaderDataError, ImageDataError, ImageFileError, WrapStructError, ValueError, TypeError, KeyError,
            IndexError, OSError, EOFError, OverflowError, struct.error)


def _nifti_header(head: bytes) -> Any:
    import nibabel as nib

    kind = _nifti_kind(head)
    if kind == 0:
        raise _Unusable("NIfTI header without its image (an .hdr/.img pair): upload a single .nii or .nii.gz file")
    try:
        if kind == 1:
            return nib.Nifti1Header(head[:348], check=True)
        return nib.Nifti2Header(head[:540], check=True)
    except _nibabel_errors():
        raise _Unusable("damaged NIfTI header") from None


def _read_nifti(data: bytes, number: int, modality: str | None, budget: _Budget) -> Series:
    """A NIfTI volume (from memory, never a temporary file) -> one series of axial, coronal or
    sagittal slices in DICOM's display convention (patient's right on the image's left)."""
    import nibabel as nib

    compressed = data[:2] == b"\x1f\x8b"
    if compressed:
        try:
            head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data[:65536], 548)
        except zlib.error:
            raise _Unusable("damaged gzip-compressed NIfTI file") from None
    else:
        head = data[:548]
    header = _nifti_header(head)
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
        slope, intercept = header.get_slope_inter()
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        zooms = [float(z) for z in header.get_zooms()[:3]]
        codes = (int(header["qform_code"]), int(header["sform_code"]))
    except _nibabel_errors():
        raise _Unusable("damaged NIfTI header") from None
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        raise _Unusable("NIfTI volume with an unsupported number of dimensions (2-D to 4-D are read)")
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise _Unusable("colour or complex NIfTI volume (grey-level volumes only)")
    # Only the first volume is read: a 4-D file is never unpacked past it.
    first = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
    voxels = int(np.prod(first, dtype=np.int64))
    needed = offset + voxels * dtype.itemsize
    budget.take_pixels(voxels)
    if compressed:
        budget.take_bytes(needed - len(data))
        raw = _inflate(data, needed)
    else:
        raw = data
    if len(raw) < needed:
        raise _Unusable("truncated NIfTI file (less data than its header declares)")
    # NIfTI stores the first axis fastest (Fortran order); the copy frees the file's bytes.
    volume = np.frombuffer(raw, dtype=dtype, count=voxels, offset=offset).reshape(first, order="F")
    volume = volume.astype(dtype.newbyteorder("="))
    del raw
    slope = 1.0 if slope is None or not math.isfinite(slope) or slope == 0 else float(slope)
    intercept = 0.0 if intercept is None or not math.isfinite(intercept) else float(intercept)
    left: Counter[str] = Counter()
    warnings: list[str] = []
    if len(shape) == 4 and shape[3] > 1:
        left["further volume of a 4-D NIfTI (only the first is used)"] += shape[3] - 1
        warnings.append(f"The NIfTI file holds {shape[3]} volumes (4-D); only the first is used.")
    if volume.dtype.kind == "f":
        volume = volume.astype(np.float32, copy=False)
        if not np.isfinite(volume).all():
            volume = np.where(np.isfinite(volume), volume, np.nan).astype(np.float32)
    else:
        volume = _compact(volume)
    while len(zooms) < 3:
        zooms.append(1.0)

    tilt = None
    if codes == (0, 0):
        # No orientation recorded: the third axis is taken as the slice axis, in stored order.
        stack = np.transpose(volume, (2, 1, 0))
        plane, normal, row_mm, col_mm, step = None, None, zooms[1], zooms[0], zooms[2]
        warnings.append("The NIfTI header records no orientation (qform and sform codes 0): the third axis is "
                        "taken as the slice axis; the plane and left-right side are unknown.")
    else:
        ornt = nib.orientations.io_orientation(affine)
        canonical = nib.orientations.apply_orientation(volume, ornt)  # RAS+: axes point right, anterior, superior
        ras_zoom = [0.0, 0.0, 0.0]
        for axis in range(3):
            ras_zoom[int(ornt[axis, 0])] = zooms[axis]
        slice_axis = int(ornt[2, 0])  # where the stored third axis (the acquisition's slice axis) points
        plane = PLANES[slice_axis]
        if plane == "axial":  # rows anterior -> posterior, columns right -> left, inferior -> superior
            stack = np.transpose(canonical, (2, 1, 0))[:, ::-1, ::-1]
            normal, row_mm, col_mm, step = (0.0, 0.0, 1.0), ras_zoom[1], ras_zoom[0], ras_zoom[2]
        elif plane == "coronal":  # rows superior -> inferior, columns right -> left, anterior -> posterior
            stack = np.transpose(canonical, (1, 2, 0))[::-1, ::-1, ::-1]
            normal, row_mm, col_mm, step = (0.0, 1.0, 0.0), ras_zoom[2], ras_zoom[0], ras_zoom[1]
        else:  # sagittal: rows superior -> inferior, columns anterior -> posterior, left -> right
            stack = np.transpose(canonical, (0, 2, 1))[:, ::-1, ::-1]
            normal, row_mm, col_mm, step = (-1.0, 0.0, 0.0), ras_zoom[2], ras_zoom[1], ras_zoom[0]
        axes = affine[:3, :3]
        in_plane = np.cross(axes[:, 0], axes[:, 1])
        if np.linalg.norm(in_plane) > 0 and np.linalg.norm(axes[:, 2]) > 0:
            cosine = abs(float(in_plane @ axes[:, 2])) / (np.linalg.norm(in_plane) * np.linalg.norm(axes[:, 2]))
            tilt = math.degrees(math.acos(min(cosine, 1.0)))
            if tilt > TILT_TOLERANCE_DEG:
                warnings.append(f"The NIfTI volume is sheared by {tilt:.1f} degrees (gantry tilt): each slice is read "
                                "as it is; as a volume the stack is sheared.")
    count, rows, columns = stack.shape
    version = f"NIfTI-{_nifti_kind(head)}"
    info: dict[str, Any] = {"format": version, "Rows": rows, "Columns": columns,
                            "PixelSpacing": [row_mm, col_mm], "SliceThickness": step}
    if modality:
        info["Modality"] = modality
    if plane:
        info["orientation"] = plane
    slices = tuple(_Slice(stored=stack[k], slope=slope, intercept=intercept, info=info) for k in range(count))
    geometry = Geometry(plane=plane, rows=rows, columns=columns, ordered_by="volume axis", normal=normal,
                        positions=tuple(float(k * step) for k in range(count)), spacing=step if count > 1 else None,
                        thickness=step, pixel_spacing=(row_mm, col_mm), tilt=tilt)
    return Series(key=f"volume-{number}", study=None, number=None, description="", modality=modality,
                  body_part=None, image_type=(), source="nifti", geometry=geometry,
                  left_out=tuple(LeftOut(r, c) for r, c in left.most_common()), warnings=tuple(warnings),
                  _slices=slices)
