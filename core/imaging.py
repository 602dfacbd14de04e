"""Read uploaded bytes into a `Scan`: a 2-D float32 image in [0, 1], as a reader sees it.

Ordinary images (PNG, JPEG, WebP, TIFF, BMP, GIF) go through Pillow with a decompression
bomb guard, EXIF orientation, alpha flattening and conversion to grayscale. DICOM goes
modality LUT (RescaleSlope/Intercept) -> padding mask -> VOI LUT or window (CT: a lung
window by default) -> MONOCHROME1 inversion, in that order.

Nothing here writes to disk or logs pixels or patient tags.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 200 * 1024 * 1024
MAX_PIXELS = 40_000_000
MIN_SIDE = 8
MAX_ASPECT = 20.0
DEFAULT_CT_WINDOW: tuple[float, float] = (-600.0, 1500.0)
# Display windows (centre, width) in HU a CT reader expects; the viewer's own, never the model's.
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (-600.0, 1500.0),
    "Mediastinum": (40.0, 400.0),
    "Bone": (400.0, 1800.0),
    "Brain": (40.0, 80.0),
    "Subdural": (75.0, 215.0),
}
CT_MIN_HU = -1100.0

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
DICOM_SUFFIXES = (".dcm", ".dicom")


class ScanError(ValueError):
    """A file that cannot be read as a scan; the message is written for a clinician."""


@dataclass(frozen=True)
class Scan:
    """One 2-D image ready for display and preprocessing.

    Attributes:
        pixels: float32 array (H, W) in [0, 1], after every display step in `steps`.
        kind: "image" or "dicom".
        modality: DICOM Modality tag where known (e.g. "CT", "MR"), else None.
        values: For DICOM, the float32 (H, W) array after the modality LUT (Hounsfield units
            for CT), padding set to NaN; None for ordinary images. Lets a model re-window.
        window: The (centre, width) applied to `values` for `pixels`, where one was.
        steps: Human-readable list of what was done to the file, in order.
        info: Safe, non-identifying facts (size, photometric, frame, orientation...).
    """

    pixels: np.ndarray
    kind: str
    modality: str | None = None
    values: np.ndarray | None = None
    window: tuple[float, float] | None = None
    steps: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return self.pixels.shape  # type: ignore[return-value]


def is_dicom(data: bytes, filename: str | None = None) -> bool:
    """True if the bytes carry the DICM magic at offset 128 or the name ends in .dcm."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return bool(filename) and filename.lower().endswith(DICOM_SUFFIXES)


def read_scan(data: bytes, filename: str | None = None) -> Scan:
    """Read an uploaded file into a Scan.

    Args:
        data: The whole file.
        filename: The name it was uploaded under (used for the .dcm hint and messages only).

    Returns:
        A `Scan` whose `pixels` are float32 (H, W) in [0, 1].

    Raises:
        ScanError: If the file is empty, too large, not an image, damaged, or a DICOM that
            cannot be decoded here; the message says which.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ScanError("No file data was received.")
    data = bytes(data)
    if not data:
        raise ScanError("The file is empty (0 bytes).")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ScanError(
            f"The file is {len(data) / 2**20:.0f} MB; files over {MAX_UPLOAD_BYTES // 2**20} MB are not accepted."
        )
    if is_dicom(data, filename):
        scan = _read_dicom(data, filename)
    else:
        scan = _read_image(data, filename)
    _check_geometry(scan.pixels)
    return scan


# ---------------------------------------------------------------- ordinary images


def _read_image(data: bytes, filename: str | None) -> Scan:
    from PIL import Image, ImageOps, UnidentifiedImageError

    steps: list[str] = []
    try:
        # Turn Pillow's bomb warning into an error for this call only; the global filter stays.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ScanError(
                    f"The image declares {width} x {height} pixels, more than the "
                    f"{MAX_PIXELS // 1_000_000} million accepted; it was not decoded."
                )
            fmt = image.format or "unknown"
            n_frames = getattr(image, "n_frames", 1)
            if n_frames > 1:
                image.seek(0)
                steps.append(f"first of {n_frames} frames used")
            image.load()
            if _exif_rotated(image):
                image = ImageOps.exif_transpose(image)
                steps.append("rotated upright from EXIF orientation")
    except ScanError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError("The image declares an implausibly large size (a decompression bomb); it was not decoded.") from None
    except UnidentifiedImageError:
        name = f" '{filename}'" if filename else ""
        raise ScanError(
            f"The file{name} is not a readable image. Upload a PNG, JPEG, WebP, TIFF, BMP or DICOM file."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ScanError(f"The image file is damaged or truncated and cannot be decoded ({type(exc).__name__}).") from None

    pixels = _to_gray(image, steps)
    info = {"format": fmt, "mode": image.mode, "width": image.size[0], "height": image.size[1]}
    return Scan(pixels=pixels, kind="image", steps=tuple(steps), info=info)


def _exif_rotated(image: Any) -> bool:
    try:
        return int(image.getexif().get(0x0112, 1)) not in (0, 1)
    except (AttributeError, ValueError, TypeError):
        return False


def _to_gray(image: Any, steps: list[str]) -> np.ndarray:
    """Pillow image of any mode -> float32 (H, W) in [0, 1]."""
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ScanError("The image contains undefined (NaN or infinite) pixel values.")
        steps.append(f"{mode} values scaled to their own range")
        return _rescale(array)
    if mode == "1":
        image = image.convert("L")
    elif mode in ("LA", "PA", "RGBA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        if np.asarray(image)[..., 3].min() < 255:
            steps.append("transparent areas shown as black")
        image = Image.alpha_composite(background, image).convert("RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        image = image.convert("RGB")
    if image.mode == "RGB":
        rgb = np.asarray(image, dtype=np.int16)
        spread = int(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max()) if rgb.size else 0
        if spread > 8:
            steps.append("colour image converted to grayscale")
        image = image.convert("L")
    elif image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0


def _rescale(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _check_geometry(pixels: np.ndarray) -> None:
    if pixels.ndim != 2:
        raise ScanError("The file does not hold a single 2-D image.")
    height, width = pixels.shape
    if min(height, width) < MIN_SIDE:
        raise ScanError(f"The image is {width} x {height} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ScanError(f"The image is {width} x {height} pixels; that shape is not a medical image slice.")
    if float(pixels.max()) - float(pixels.min()) < 1e-6:
        raise ScanError("The image is blank (every pixel has the same value).")


# ---------------------------------------------------------------- DICOM


def _read_dicom(data: bytes, filename: str | None) -> Scan:
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_magic = len(data) >= 132 and data[128:132] == b"DICM"
    # Without the preamble, a DICOM stream starts with a group 0002 or 0008 tag (little endian).
    if not has_magic and data[:2] not in (b"\x02\x00", b"\x08\x00"):
        raise ScanError("The file is named like a DICOM file but is not a readable DICOM file.")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_magic)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError):
        raise ScanError("The file is named like a DICOM file but is not a readable DICOM file.") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ScanError("The DICOM file holds no image (no pixel data): it may be a report or structured data.")

    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        # The pixels carry text that may identify the patient; nothing of it is shown or kept.
        raise ScanError(
            "The DICOM file says its image has burned-in annotation (text in the pixels that may identify "
            "the patient), so it was not shown or analysed. Export the image without annotations."
        )
    steps: list[str] = []
    modality = str(ds.get("Modality", "") or "").upper() or None
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    array = _dicom_pixels(ds)

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        frame = n_frames // 2
        array = array[frame]
        steps.append(f"frame {frame + 1} of {n_frames} shown (the middle one)")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            array = np.asarray(apply_color_lut(array, ds))
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            raise ScanError("The DICOM palette (colour lookup table) is missing or invalid.") from None
    if samples > 1 or array.ndim == 3:
        array = _dicom_color_to_gray(array, ds, photometric)
        steps.append(f"{photometric or 'colour'} image converted to grayscale")
        photometric = "MONOCHROME2"
    if array.ndim != 2:
        raise ScanError("The DICOM pixel data is not a 2-D image.")

    padding = _padding_mask(array, ds)
    values = _modality_lut(array, ds, steps)
    if padding is not None and padding.any():
        values = values.copy()
        values[padding] = np.nan
        steps.append(f"{int(padding.sum())} padding pixels masked out")
    if modality == "CT":
        # Scanners without a PixelPaddingValue tag (e.g. -2048 outside the reconstruction
        # circle) still store values no tissue or air can have; keep them out of the image.
        outside = np.isfinite(values) & (values < CT_MIN_HU)
        if outside.any():
            values = values.copy()
            values[outside] = np.nan
            steps.append(f"{int(outside.sum())} pixels below {CT_MIN_HU:g} HU treated as outside the field of view")
    if not np.isfinite(values).any():
        raise ScanError("The DICOM image holds no valid pixel values.")

    pixels, window = _voi(values, ds, modality, steps)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
        steps.append("MONOCHROME1 inverted (bright = dense)")

    info = _safe_info(ds, n_frames, frame)
    return Scan(
        pixels=pixels.astype(np.float32),
        kind="dicom",
        modality=modality,
        values=values.astype(np.float32),
        window=window,
        steps=tuple(steps),
        info=info,
    )


def _dicom_pixels(ds: Any) -> np.ndarray:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(syntax, "name", None) or str(syntax or "unknown")
    try:
        array = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise ScanError(
                f"The DICOM pixel data is compressed ({syntax_name}) and no decoder for it is installed "
                "here; install pylibjpeg (with pylibjpeg-libjpeg / pylibjpeg-openjpeg) or python-gdcm, "
                "or export the image uncompressed."
            ) from None
        raise ScanError(f"The DICOM pixel data cannot be decoded ({syntax_name}): {exc}") from None
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError, IndexError) as exc:
        raise ScanError(f"The DICOM pixel data is damaged or inconsistent with its header ({type(exc).__name__}).") from None
    array = np.asarray(array)
    if array.size == 0:
        raise ScanError("The DICOM file holds an empty image.")
    return array


def _dicom_color_to_gray(array: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        array = convert_color_space(array, photometric, "RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (3, 4):  # planar configuration 1, unconverted
        rgb = np.moveaxis(array[:3], 0, -1).astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    raise ScanError("The DICOM colour layout is not supported.")


def _padding_mask(stored: np.ndarray, ds: Any) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or inside PixelPaddingRangeLimit), on stored values."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, (list, tuple)) or stored.dtype.kind not in "iu":
        return None
    pad = int(pad)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is not None and not isinstance(limit, (list, tuple)):
        low, high = sorted((pad, int(limit)))
        return (stored >= low) & (stored <= high)
    return stored == pad


def _modality_lut(array: np.ndarray, ds: Any, steps: list[str]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
    if has_rescale or "ModalityLUTSequence" in ds:
        try:
            values = apply_modality_lut(array, ds)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
            raise ScanError(f"The DICOM modality LUT (rescale) is invalid ({type(exc).__name__}).") from None
        if has_rescale:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            unit = " to Hounsfield units" if str(ds.get("Modality", "")).upper() == "CT" else ""
            steps.append(f"rescaled{unit} (slope {slope:g}, intercept {intercept:g})")
        else:
            steps.append("modality LUT applied")
        return np.asarray(values, dtype=np.float32)
    return array.astype(np.float32)


def window_values(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear DICOM window (PS3.3 C.11.2.1.2) of float values into [0, 1].

    Args:
        values: float array of any shape (NaN allowed; NaN maps to 0).
        center: Window centre.
        width: Window width (> 0).

    Returns:
        float32 array of the same shape, in [0, 1].
    """
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    out = (values.astype(np.float32) - low) / float(width)
    out = np.clip(out, 0.0, 1.0)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _voi(values: np.ndarray, ds: Any, modality: str | None, steps: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
    if modality == "CT":
        center, width = DEFAULT_CT_WINDOW
        steps.append(f"lung window (centre {center:g} HU, width {width:g} HU)")
        return window_values(values, center, width), (center, width)
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        try:
            finite = np.nan_to_num(values, nan=float(np.nanmin(values)))
            if np.array_equal(finite, np.round(finite)):
                finite = finite.astype(np.int64)  # a LUT indexes stored integer values
            out = np.asarray(apply_voi_lut(finite, ds, prefer_lut=True), dtype=np.float32)
            steps.append("VOI LUT from the file applied")
            return _rescale(out), None
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            logger.info("VOI LUT sequence unusable; falling back")
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (ValueError, TypeError, IndexError):
            center = width = float("nan")
        if np.isfinite(center) and np.isfinite(width) and width > 0:
            steps.append(f"window from the file (centre {center:g}, width {width:g})")
            return window_values(values, center, width), (center, width)
        steps.append("the file's window is invalid and was ignored")
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32), None
    steps.append("scaled to the 0.5-99.5 percentile range (no usable window in the file)")
    center, width = (low + high) / 2.0, high - low
    return window_values(values, center, width), (float(center), float(width))


def orientation_of(ds: Any) -> str | None:
    """'axial', 'coronal' or 'sagittal' from ImageOrientationPatient, else None."""
    iop = ds.get("ImageOrientationPatient")
    try:
        row = np.array([float(v) for v in iop[:3]])
        col = np.array([float(v) for v in iop[3:6]])
    except (TypeError, ValueError, IndexError):
        return None
    normal = np.cross(row, col)
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-6:
        return None
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


_SAFE_TAGS = (
    "Modality",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsStored",
    "Manufacturer",
    "SliceThickness",
)


def _safe_info(ds: Any, n_frames: int, frame: int | None) -> dict[str, Any]:
    """Technical, non-identifying tags only: never names, IDs, dates or institutions."""
    info: dict[str, Any] = {}
    for tag in _SAFE_TAGS:
        value = ds.get(tag)
        if value not in (None, ""):
            info[tag] = value if isinstance(value, (int, float)) else str(value)
    spacing = ds.get("PixelSpacing")
    if spacing is not None:
        try:
            info["PixelSpacing"] = [float(v) for v in spacing][:2]
        except (TypeError, ValueError):
            pass
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None:
        info["TransferSyntax"] = getattr(syntax, "name", str(syntax))
    info["frames"] = n_frames
    if frame is not None:
        info["frame"] = frame + 1
    orientation = orientation_of(ds)
    if orientation:
        info["orientation"] = orientation
    return info


def safe_info(ds: Any, n_frames: int = 1, frame: int | None = None) -> dict[str, Any]:
    """The technical, non-identifying facts of a parsed dataset that a `Scan` carries in `info`.

    Args:
        ds: A pydicom Dataset (pixel data not needed).
        n_frames: Number of frames in the object.
        frame: Zero-based frame the scan shows, where the object has several.

    Returns:
        The safe tags (never names, IDs, dates or institutions), pixel spacing, transfer
        syntax, frame count and orientation, as `read_scan` gives them.
    """
    return _safe_info(ds, n_frames, frame)
