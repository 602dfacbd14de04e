"""Read uploaded bytes into a `Scan`: a 2-D float32 image in [0, 1], as a reader sees it.

Ordinary images: only PNG, JPEG, WebP, TIFF and BMP are opened, recognised from the bytes
(never from the name); any other format is refused with its name, unopened. The declared size
is checked before decoding (at most `MAX_PIXELS`), JPEGs are decoded at a reduced DCT scale
where that is enough, and every image is brought to grayscale in 8 bits (or checked for
finite values and scaled to its own range, for 16-bit, 32-bit and float images) and shrunk to
at most `MAX_IMAGE_SIDE` pixels on its longest side before it becomes float. EXIF orientation
is applied; transparent areas are shown as black.

DICOM: parsed with bounded inflation (a deflated file may not unpack to more than
`MAX_DICOM_BYTES`) and refused, not crashed on, when its sequences nest too deeply. The pixel
budget (Rows x Columns x samples x bytes of the frame to decode, and for compressed frames the
size the codestream itself declares) is checked before any pixel is decoded, and only the
frame shown is decoded. Then modality LUT (RescaleSlope / Intercept, from the Per-frame or
Shared Functional Groups for enhanced multi-frame objects) -> padding mask -> VOI LUT or
window (CT: a lung window by default) -> MONOCHROME1 inversion, in that order. DICOM values
keep the file's resolution.

Public entry points: `read_scan` (bytes -> Scan); for callers that parse DICOM themselves
(a study reader grouping files before decoding): `parse_dicom` (bytes -> pydicom Dataset,
with the same bounds), `scan_from_dataset` (Dataset, one frame -> Scan), `dicom_frame_count`
and `check_pixel_budget`.

Nothing here writes to disk or logs pixels or patient tags; messages never carry library
text, file names or paths.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 200 * 1024 * 1024
COLOURED_SPREAD = 40  # a pixel whose R, G and B differ by more than this is clearly coloured
MAX_PIXELS = 40_000_000  # per 2-D image or DICOM frame, checked before decoding
MAX_IMAGE_SIDE = 2048  # ordinary images are shrunk to this longest side (DICOM keeps its size)
MAX_DICOM_BYTES = MAX_UPLOAD_BYTES  # a deflated DICOM may unpack to no more than an upload may hold
MAX_DECODE_BYTES = 256 * 1024 * 1024  # decoded bytes of the DICOM frame(s) one read decodes
MAX_PAGES_COUNTED = 100  # pages of a multi-page image counted to say which one is shown
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

# Pillow format names opened; every other plugin (EPS runs Ghostscript, JPEG 2000, GIF...) is never tried.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
ACCEPTED = "Upload a PNG, JPEG, WebP, TIFF, BMP or DICOM file."

_FLOAT32_MAX = float(np.finfo(np.float32).max)


SCAN_ERROR_KINDS: tuple[str, ...] = ("unreadable", "too_large", "unsupported_format")


class ScanError(ValueError):
    """A file that cannot be read as a scan; the message is written for a clinician.

    Attributes:
        kind: Why, for a machine (the HTTP API's status code): "unreadable" (damaged, empty, not a
            medical image slice), "too_large" (over the byte or pixel budget) or "unsupported_format"
            (a format or pixel encoding this app does not open).
    """

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        if kind not in SCAN_ERROR_KINDS:
            raise ValueError(f"unknown ScanError kind {kind!r}; one of {', '.join(SCAN_ERROR_KINDS)}")
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.kind)


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


# Explicit VR codes: a file without the DICM preamble that starts with a group 0002 or 0008
# element followed by one of these is a raw DICOM dataset.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def is_dicom(data: bytes, filename: str | None = None) -> bool:
    """True if the bytes look like DICOM (DICM magic at 128, or a raw dataset start) or the name ends in .dcm."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[4:6] in _VRS:
        return True
    return bool(filename) and filename.lower().endswith(DICOM_SUFFIXES)


def read_scan(data: bytes, filename: str | None = None) -> Scan:
    """Read an uploaded file into a Scan.

    Args:
        data: The whole file.
        filename: The name it was uploaded under: only a .dcm ending is used, as a hint for DICOM
            files without their 128-byte preamble. It never appears in messages.

    Returns:
        A `Scan` whose `pixels` are float32 (H, W) in [0, 1], finite.

    Raises:
        ScanError: If the file is empty, too large, in a format not accepted, damaged, over the
            pixel budget, holds non-finite values, or is a DICOM that cannot be decoded here;
            the message says which.
    """
    data = _checked_bytes(data)
    if is_dicom(data, filename):
        scan = scan_from_dataset(parse_dicom(data))
    else:
        scan = _read_image(data)
    _check_geometry(scan.pixels)
    return scan


def _checked_bytes(data: Any) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ScanError("No file data was received.")
    data = bytes(data)
    if not data:
        raise ScanError("The file is empty (0 bytes).")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ScanError(
            f"The file is {len(data) / 2**20:.0f} MB; files over {MAX_UPLOAD_BYTES // 2**20} MB are not accepted.",
            kind="too_large",
        )
    return data


# ---------------------------------------------------------------- ordinary images

# Formats recognised from their first bytes, only to name them in the refusal (never opened).
_FOREIGN: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "a GIF image"),
    (0, b"GIF89a", "a GIF image"),
    (0, b"%!PS", "a PostScript (EPS) file"),
    (0, b"\xc5\xd0\xd3\xc6", "a PostScript (EPS) file"),
    (0, b"%PDF", "a PDF document"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (0, b"\xff\x4f\xff\x51", "a JPEG 2000 image"),
    (0, b"DDS ", "a DDS texture"),
    (0, b"8BPS", "a Photoshop (PSD) file"),
    (0, b"\x00\x00\x01\x00", "a Windows icon (ICO)"),
    (0, b"\x00\x00\x02\x00", "a Windows cursor (CUR)"),
    (0, b"\x01\xda", "an SGI image"),
    (0, b"qoif", "a QOI image"),
    (0, b"icns", "a macOS icon (ICNS)"),
    (0, b"SIMPLE  =", "a FITS file"),
    (0, b"Image type", "an IM image"),
    (0, b"#define", "an XBM image"),
    (0, b"DanM", "an MSP image"),
    (0, b"LinS", "an MSP image"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"PK\x05\x06", "a ZIP archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
    (4, b"ftypavif", "an AVIF image"),
    (4, b"ftyphei", "a HEIC image"),
    (4, b"ftypmif1", "a HEIC image"),
    (344, b"n+1\x00", "a NIfTI volume"),
    (344, b"ni1\x00", "a NIfTI volume"),
)


def _foreign_format(data: bytes) -> str | None:
    """The name of a known format the bytes are in, for the message; None when unknown."""
    for offset, magic, name in _FOREIGN:
        if data[offset:offset + len(magic)] == magic:
            return name
    if re.match(rb"P[1-7][ \t\r\n#]", data[:3]):
        return "a PPM/PGM/PBM image"
    if len(data) > 1 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5):
        return "a PCX image"
    if len(data) >= 26 and data[-18:-2] == b"TRUEVISION-XFILE":
        return "a TGA image"
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")):
        return "an XML or SVG document"
    if head.startswith((b"<!doctype html", b"<html")):
        return "a web page (HTML)"
    return None


def _read_image(data: bytes) -> Scan:
    from PIL import Image, UnidentifiedImageError

    steps: list[str] = []
    try:
        # No warnings.catch_warnings here: it swaps process-wide state under concurrent sessions.
        # Pillow raises DecompressionBombError itself past twice its limit; below that, the
        # declared size is refused here, before anything is decoded.
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
        fmt = image.format or "unknown"
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ScanError(
                f"The image declares {width} x {height} pixels, more than the "
                f"{MAX_PIXELS // 1_000_000} million accepted; it was not decoded.", kind="too_large"
            )
        _check_size(width, height)
        pages = _page_count(image)
        if pages > 1:
            count = f"{pages}" if pages < MAX_PAGES_COUNTED else f"{MAX_PAGES_COUNTED} or more"
            steps.append(f"first of {count} pages used")
        orientation = _exif_orientation(image)
        mode = image.mode
        target = _target_size(width, height)
        if fmt in ("JPEG", "MPO") and target != (width, height):
            # DCT scaling: the decoder itself produces a 1/2, 1/4 or 1/8 size image.
            image.draft(image.mode, target)
        image.load()
        if target != (width, height):
            steps.append(f"shrunk from {width} x {height} to {target[0]} x {target[1]} px "
                         f"(longest side at most {MAX_IMAGE_SIDE})")
        facts: dict[str, Any] = {}
        gray = _to_gray(image, target, steps, facts)
        method = _transpose_method(orientation)
        if method is not None:
            gray = gray.transpose(method)
            steps.append("rotated upright from EXIF orientation")
    except ScanError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError("The image declares an implausibly large size (a decompression bomb); it was not decoded.",
                        kind="too_large") from None
    except UnidentifiedImageError:
        found = _foreign_format(data)
        if found:
            raise ScanError(f"The file is not a readable image: it is {found}, which is not accepted. {ACCEPTED}",
                            kind="unsupported_format") from None
        raise ScanError(f"The file is not a readable image. {ACCEPTED}", kind="unsupported_format") from None
    except MemoryError:
        raise ScanError("The image is too large to read here.", kind="too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, TypeError, struct.error, ZeroDivisionError) as exc:
        logger.info("image decoding failed: %s", type(exc).__name__)
        raise ScanError(f"The image file is damaged or truncated and cannot be decoded ({type(exc).__name__}).") from None

    pixels = np.array(gray, dtype=np.float32)  # a writable copy (np.asarray of a Pillow image is read-only)
    if gray.mode == "L":
        pixels /= np.float32(255.0)
    info = {"format": fmt, "mode": mode, "width": width, "height": height, **facts}
    if pages > 1:
        info["frames"] = pages
    return Scan(pixels=pixels, kind="image", steps=tuple(steps), info=info)


def _page_count(image: Any) -> int:
    """Pages or frames in the file, counted up to MAX_PAGES_COUNTED, the image left on the first.

    Pillow's TIFF `n_frames` walks every page, in time growing with the square of their number;
    other formats declare the count in a header.
    """
    if image.format != "TIFF":
        return int(getattr(image, "n_frames", 1) or 1)
    pages = 1
    try:
        while pages < MAX_PAGES_COUNTED:
            image.seek(pages)
            pages += 1
    except EOFError:
        pass
    image.seek(0)
    return pages


def _exif_orientation(image: Any) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except (AttributeError, ValueError, TypeError, KeyError, OSError, SyntaxError, struct.error):
        return 1


def _transpose_method(orientation: int) -> Any | None:
    """The Pillow transpose that shows an image upright for an EXIF orientation (ImageOps.exif_transpose's table)."""
    from PIL import Image

    return {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)


def _target_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) with the longest side at most MAX_IMAGE_SIDE, aspect kept."""
    longest = max(width, height)
    if longest <= MAX_IMAGE_SIDE:
        return width, height
    scale = MAX_IMAGE_SIDE / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


_COLOUR_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_gray(image: Any, target: tuple[int, int], steps: list[str], facts: dict[str, Any] | None = None) -> Any:
    """Pillow image of any mode -> Pillow "L" (8-bit) or "F" (float in [0, 1]) image of `target` size.

    `facts`, where given, gets "colour_share": the share of clearly coloured pixels of a colour image.

    Colour and alpha are dealt with in 8 bits and the image is shrunk before anything becomes
    float, so a 40-megapixel RGBA file never exists as a float array.
    """
    from PIL import ImageChops

    mode = image.mode
    if mode in _DEEP_MODES:
        return _deep_to_unit(image, target, steps)
    if mode == "1":
        image = image.convert("L")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode in _COLOUR_MODES:
        image = image.convert("RGB")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode == "La":
        image = image.convert("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ScanError(f"The image's pixel layout ({mode}) is not supported. {ACCEPTED}", kind="unsupported_format")
    image = _shrink(image, target)
    alpha = image.getchannel("A") if image.mode in ("LA", "RGBA") else None
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB") if image.mode == "RGBA" else image)
        if rgb.size and int(np.ptp(rgb, axis=2).max()) > 12:
            # share of clearly coloured pixels: scans are grey; a photo or an annotated screenshot is not
            colour_share = float((np.ptp(rgb, axis=2) > COLOURED_SPREAD).mean())
            steps.append(f"colour image converted to grayscale ({colour_share:.0%} of pixels clearly coloured)")
            if facts is not None:
                facts["colour_share"] = colour_share
    gray = image.convert("L")
    if alpha is not None and alpha.getextrema()[0] < 255:
        # Compositing on black is multiplying by alpha: luminance is linear in R, G and B.
        gray = ImageChops.multiply(gray, alpha)
        steps.append("transparent areas shown as black")
    return gray


def _shrink(image: Any, target: tuple[int, int]) -> Any:
    from PIL import Image

    if image.size == target:
        return image
    # BOX is area averaging (what cv2.INTER_AREA does); the reducing gap lets Pillow first
    # shrink by an integer factor, which is fast and needs little memory.
    return image.resize(target, Image.Resampling.BOX, reducing_gap=3.0)


def _deep_to_unit(image: Any, target: tuple[int, int], steps: list[str]) -> Any:
    """16-bit, 32-bit integer or float image -> "F" image in [0, 1], scaled to its own range.

    Non-finite values, and ranges too wide to scale in float32, are refused before anything is scaled.
    """
    from PIL import Image

    mode = image.mode
    if mode == "F":
        low, high = _float_range(image)
    else:
        low, high = (float(v) for v in image.getextrema())
    if high - low > _FLOAT32_MAX:
        raise ScanError(
            "The image holds pixel values too extreme to scale (their range overflows); it is not a picture of a scan."
        )
    image = _shrink(image, target)
    steps.append(f"{mode} values scaled to their own range")
    array = np.asarray(image, dtype=np.float64)
    if high <= low:
        return Image.fromarray(np.zeros(array.shape, dtype=np.float32), mode="F")
    unit = np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return Image.fromarray(unit, mode="F")


def _float_range(image: Any) -> tuple[float, float]:
    """(min, max) of a float image, read in strips; ScanError if any value is NaN or infinite."""
    width, height = image.size
    rows = max(1, 2_000_000 // max(1, width))
    low, high = np.inf, -np.inf
    for top in range(0, height, rows):
        strip = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.float32)
        if not np.isfinite(strip).all():
            raise ScanError("The image contains undefined (NaN or infinite) pixel values.")
        low, high = min(low, float(strip.min())), max(high, float(strip.max()))
    return low, high


def _check_size(width: int, height: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ScanError(f"The image is {width} x {height} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ScanError(f"The image is {width} x {height} pixels; that shape is not a medical image slice.")


def _rescale(array: np.ndarray) -> np.ndarray:
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)) or high - low > _FLOAT32_MAX:
        raise ScanError("The image holds pixel values that cannot be scaled (undefined or overflowing).")
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((array.astype(np.float64) - low) / (high - low)).astype(np.float32)


def _check_geometry(pixels: np.ndarray) -> None:
    if pixels.ndim != 2:
        raise ScanError("The file does not hold a single 2-D image.")
    height, width = pixels.shape
    _check_size(width, height)
    low, high = float(pixels.min()), float(pixels.max())
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
        # Every step above keeps pixels finite in [0, 1]; this guards what a later change might break.
        raise ScanError("The image holds pixel values that cannot be shown (undefined or out of range).")
    if high - low < 1e-6:
        raise ScanError("The image is blank (every pixel has the same value).")


# ---------------------------------------------------------------- DICOM: parsing

_NOT_DICOM = "The file is named like a DICOM file but is not a readable DICOM file."
_TOO_DEEP = "The DICOM file nests its data (sequences within sequences) too deeply to be read safely."


def parse_dicom(data: bytes, stop_before_pixels: bool = False) -> Any:
    """Parse DICOM bytes into a pydicom Dataset, within the limits `read_scan` applies.

    A deflated file (Deflated Explicit VR Little Endian) is inflated in bounded steps and
    refused once it would pass `MAX_DICOM_BYTES`; sequences nested past Python's recursion
    limit are refused. No pixel is decoded here.

    Args:
        data: The whole file, with or without its 128-byte preamble.
        stop_before_pixels: Read the header only (to group and order a series' files before
            decoding any); such a dataset cannot be given to `scan_from_dataset`.

    Returns:
        A `pydicom.Dataset` (pixel data still encoded), `file_meta` set where the file has one.

    Raises:
        ScanError: If the bytes are not a readable DICOM file or pass the limits above.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = _checked_bytes(data)
    has_magic = len(data) >= 132 and data[128:132] == b"DICM"
    # Without the preamble, a DICOM stream starts with a group 0002 or 0008 tag (little endian).
    if not has_magic and data[:2] not in (b"\x02\x00", b"\x08\x00"):
        raise ScanError(_NOT_DICOM)
    try:
        meta, offset = _file_meta(data, has_magic)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            body = _inflate(memoryview(data)[offset:])
            ds = pydicom.dcmread(io.BytesIO(body), force=True, stop_before_pixels=stop_before_pixels)
            ds.file_meta = meta
        else:
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_magic, stop_before_pixels=stop_before_pixels)
    except ScanError:
        raise
    except RecursionError:
        raise ScanError(_TOO_DEEP) from None
    except MemoryError:
        raise ScanError("The DICOM file is too large to read here.", kind="too_large") from None
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            OverflowError, struct.error, zlib.error, NotImplementedError) as exc:
        logger.info("DICOM parsing failed: %s", type(exc).__name__)
        raise ScanError(_NOT_DICOM) from None
    return ds


def _file_meta(data: bytes, has_magic: bool) -> tuple[Any, int]:
    """The File Meta Information group (or None) and the offset of the dataset after it."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    start = 132 if has_magic else 0
    if data[start:start + 2] != b"\x02\x00":
        return None, start
    stream = io.BytesIO(data)
    stream.seek(start)
    # File meta is always explicit VR little endian (PS3.10 7.1).
    meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                        stop_when=lambda tag, vr, length: tag >> 16 != 2)
    return FileMetaDataset(meta), stream.tell()


def _inflate(compressed: memoryview) -> bytes:
    """Raw deflate stream (PS3.5 A.5) -> bytes, refused past MAX_DICOM_BYTES.

    The inflated size is first measured in 1 MB steps, keeping nothing, so a small file that
    would unpack to gigabytes is refused holding no more than a megabyte; only then is it
    inflated for real.
    """
    too_big = ScanError(
        f"The DICOM file is deflate-compressed and unpacks to more than {MAX_DICOM_BYTES // 2**20} MB; "
        "it was not read.", kind="too_large"
    )
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = 0, compressed
    while not inflater.eof:
        produced = len(inflater.decompress(pending, 2**20))
        pending = inflater.unconsumed_tail
        if not produced and not pending:
            break  # all input used, nothing more comes out, and no end of stream: truncated
        size += produced
        if size > MAX_DICOM_BYTES:
            raise too_big
    if not inflater.eof:
        raise ScanError("The DICOM file is deflate-compressed and its compressed data is damaged or truncated.")
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(compressed, MAX_DICOM_BYTES + 1)


# ---------------------------------------------------------------- DICOM: pixel budget


@dataclass(frozen=True)
class PixelGeometry:
    """What a DICOM file's header says its pixel data holds.

    Attributes:
        rows, columns: Size of one frame.
        frames: Number of frames (NumberOfFrames, 1 when absent).
        samples: Samples per pixel (1 for grayscale, 3 for colour).
        bytes_per_sample: Bytes one decoded sample takes (BitsAllocated rounded up to 1, 2, 4 or 8).
    """

    rows: int
    columns: int
    frames: int
    samples: int
    bytes_per_sample: int

    @property
    def frame_pixels(self) -> int:
        """Rows x Columns."""
        return self.rows * self.columns

    def decoded_bytes(self, frames: int = 1) -> int:
        """Bytes of `frames` decoded frames: Rows x Columns x frames x samples x bytes."""
        return self.frame_pixels * frames * self.samples * self.bytes_per_sample


def _header_int(ds: Any, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        number = int(value) if value is not None else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ScanError(f"The DICOM header has no valid {keyword}, so its image cannot be read.")
    return number


def pixel_geometry(ds: Any) -> PixelGeometry:
    """The pixel layout a DICOM header declares (nothing decoded).

    Raises:
        ScanError: If Rows, Columns, NumberOfFrames, SamplesPerPixel or BitsAllocated is missing or not positive.
    """
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", 1) or 1
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated")
    if min(rows, columns, frames, samples, bits) <= 0 or samples > 4 or bits > 64:
        raise ScanError("The DICOM header describes an impossible image size or layout.")
    size = 1
    while size * 8 < bits:
        size *= 2
    return PixelGeometry(rows, columns, frames, samples, size)


def dicom_frame_count(ds: Any) -> int:
    """Number of frames a DICOM dataset declares (1 for a single-frame image)."""
    return pixel_geometry(ds).frames


def check_pixel_budget(ds: Any, frames: int = 1, max_pixels: int = MAX_PIXELS,
                       max_bytes: int = MAX_DECODE_BYTES) -> PixelGeometry:
    """Refuse, before decoding, a DICOM whose frames would not fit the budget.

    Args:
        ds: The parsed dataset.
        frames: How many frames the caller will decode at once (`read_scan`: one).
        max_pixels: Most Rows x Columns of one frame.
        max_bytes: Most Rows x Columns x frames x samples x bytes decoded at once.

    Returns:
        The header's pixel geometry.

    Raises:
        ScanError: Over either budget, or an unusable header.
    """
    geometry = pixel_geometry(ds)
    if geometry.frame_pixels > max_pixels:
        raise ScanError(
            f"The DICOM image declares {geometry.columns} x {geometry.rows} pixels, more than the "
            f"{max_pixels // 1_000_000} million accepted; it was not decoded.", kind="too_large"
        )
    needed = geometry.decoded_bytes(frames)
    if needed > max_bytes:
        raise ScanError(
            f"The DICOM image would take {needed / 2**20:.0f} MB decoded, more than the "
            f"{max_bytes // 2**20} MB accepted; it was not decoded.", kind="too_large"
        )
    return geometry


def _check_codestream(ds: Any, index: int, geometry: PixelGeometry) -> None:
    """For a compressed frame, refuse before decoding a codestream larger than the header says.

    JPEG (all processes, JPEG-LS included) and JPEG 2000 codestreams carry their own size, and
    RLE segments can expand 64-fold: a decoder follows those, not Rows x Columns, whichever
    decoder plugin is installed.
    """
    from pydicom.encaps import get_frame
    from pydicom.uid import RLELossless

    syntax = ds.file_meta.TransferSyntaxUID
    frame = get_frame(ds.PixelData, index, number_of_frames=geometry.frames)
    if syntax == RLELossless:
        _check_rle(frame, geometry)
        return
    size = _codestream_size(frame)
    if size is None:
        return  # not JPEG or JPEG 2000: the decoder, if any is installed, decides
    width, height = size
    if width <= 0 or height <= 0 or width * height > geometry.frame_pixels:
        raise ScanError(
            "The compressed image inside the DICOM file is larger than its header says "
            f"({width} x {height} against {geometry.columns} x {geometry.rows}); it was not decoded."
        )


# JPEG start-of-frame markers (ITU T.81 B.1.1.3, T.87 for JPEG-LS): every process but DHT/JPG/DAC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the image and tile size marker


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG or JPEG 2000 codestream declares, without decoding; None for other data."""
    if frame[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(frame):
            if frame[pos] != 0xFF:
                return None
            marker = frame[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _JPEG_SOF:
                if pos + 9 > len(frame):
                    return None
                height, width = struct.unpack_from(">HH", frame, pos + 5)
                return width, height  # a height of 0 (set later by DNL) is refused by the caller
            if marker == 0xDA:  # start of scan before any frame header
                return None
            pos += 2 if 0xD0 <= marker <= 0xD7 or marker == 0x01 else 2 + struct.unpack_from(">H", frame, pos + 2)[0]
        return None
    at = frame.find(_J2K_SIZ, 0, 4096)  # a raw codestream starts with it; a JP2 file has it in a box
    if at < 0 or at + 24 > len(frame):
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack_from(">4L", frame, at + 8)
    return x_size - x_offset, y_size - y_offset


def _check_rle(frame: bytes, geometry: PixelGeometry) -> None:
    """Walk the RLE run headers (PS3.5 G.3) without expanding them; refuse a segment decoding past one plane."""
    if len(frame) < 64:
        raise ScanError("The DICOM RLE-compressed frame is damaged (no RLE header).")
    count, *offsets = struct.unpack("<16L", frame[:64])
    plane = geometry.frame_pixels
    if count != geometry.samples * geometry.bytes_per_sample or count > 15:
        raise ScanError("The DICOM RLE-compressed frame does not match its header (segment count).")
    ends = [*offsets[1:count], len(frame)]
    for start, end in zip(offsets[:count], ends):
        if not 64 <= start <= end <= len(frame):
            raise ScanError("The DICOM RLE-compressed frame is damaged (segment offsets).")
        produced, pos = 0, start
        while pos < end and produced <= plane:
            header = frame[pos]
            if header < 128:  # literal run of header + 1 bytes
                produced += header + 1
                pos += header + 2
            elif header > 128:  # one byte repeated 257 - header times
                produced += 257 - header
                pos += 2
            else:
                pos += 1
        if produced > plane + 1:  # one pad byte is allowed
            raise ScanError(
                "The DICOM RLE-compressed frame expands past the image size its header declares; it was not decoded."
            )


# ---------------------------------------------------------------- DICOM: one frame -> Scan


def scan_from_dataset(ds: Any, frame: int | None = None) -> Scan:
    """Turn one frame of a parsed DICOM dataset into a Scan, decoding only that frame.

    The pixel budget is checked first; the modality LUT comes from the frame's Pixel Value
    Transformation functional group where the object has one (enhanced CT/MR), else from the
    top-level RescaleSlope / Intercept or Modality LUT.

    Args:
        ds: A dataset from `parse_dicom` (or pydicom.dcmread), pixel data included.
        frame: 0-based frame index; None takes the middle frame (the only one of a single-frame file).

    Returns:
        The Scan, `info["frame"]` (1-based) and `info["frames"]` saying which frame it is.

    Raises:
        ScanError: For a file with no image, burned-in annotation, over the budget, or that
            cannot be decoded here.
        ValueError: If `frame` is outside the frames the file holds (a caller's mistake).
    """
    try:
        return _scan_from_dataset(ds, frame)
    except RecursionError:
        raise ScanError(_TOO_DEEP) from None
    except MemoryError:
        raise ScanError("The DICOM image is too large to read here.", kind="too_large") from None


def _scan_from_dataset(ds: Any, frame: int | None) -> Scan:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ScanError("The DICOM file holds no image (no pixel data): it may be a report or structured data.",
                        kind="unsupported_format")
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
        # The pixels carry text that may identify the patient; nothing of it is shown or kept.
        raise ScanError(
            "The DICOM file says its image has burned-in annotation (text in the pixels that may identify "
            "the patient), so it was not shown or analysed. Export the image without annotations."
        )
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise ScanError("The DICOM file does not say how its pixel data is encoded (no transfer syntax).")
    if not getattr(syntax, "is_transfer_syntax", False):
        raise ScanError("The DICOM file names a transfer syntax (pixel encoding) that is not a known one; "
                        "its image cannot be decoded.", kind="unsupported_format")
    geometry = check_pixel_budget(ds)
    n_frames = geometry.frames
    if frame is None:
        frame = n_frames // 2
    elif not 0 <= frame < n_frames:
        raise ValueError(f"frame {frame} is out of range; the file holds frames 0 to {n_frames - 1}")
    steps: list[str] = []
    if n_frames > 1:
        steps.append(f"frame {frame + 1} of {n_frames} shown" + (" (the middle one)" if frame == n_frames // 2 else ""))
    modality = _code(_text(ds, "Modality").upper())
    photometric = _text(ds, "PhotometricInterpretation").upper()

    array, photometric = _decode_frame(ds, frame, geometry, photometric)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            array = np.asarray(apply_color_lut(array, ds))
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            raise ScanError("The DICOM palette (colour lookup table) is missing or invalid.") from None
    if array.ndim == 3:
        array = _dicom_color_to_gray(array)
        steps.append(f"{photometric or 'colour'} image converted to grayscale")
        photometric = "MONOCHROME2"
    if array.ndim != 2:
        raise ScanError("The DICOM pixel data is not a 2-D image.")

    padding = _padding_mask(array, ds)
    values = _modality_lut(array, ds, frame, modality, steps)
    del array
    if padding is not None and padding.any():
        values[padding] = np.nan
        steps.append(f"{int(padding.sum())} padding pixels masked out")
    del padding
    if modality == "CT":
        # Scanners without a PixelPaddingValue tag (e.g. -2048 outside the reconstruction
        # circle) still store values no tissue or air can have; keep them out of the image.
        with np.errstate(invalid="ignore"):
            outside = values < CT_MIN_HU
        if outside.any():
            values[outside] = np.nan
            steps.append(f"{int(outside.sum())} pixels below {CT_MIN_HU:g} HU treated as outside the field of view")
        del outside
    if np.isinf(values).any():
        raise ScanError("The DICOM rescale produces values too large to represent (overflow); the file is inconsistent.")
    if not np.isfinite(values).any():
        raise ScanError("The DICOM image holds no valid pixel values.")

    pixels, window = _voi(values, ds, frame, modality, steps)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, pixels, out=pixels)
        steps.append("MONOCHROME1 inverted (bright = dense)")

    info = _safe_info(ds, n_frames, frame if n_frames > 1 else None)
    return Scan(pixels=pixels, kind="dicom", modality=modality, values=values, window=window,
                steps=tuple(steps), info=info)


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value or "").strip()


def _decode_frame(ds: Any, index: int, geometry: PixelGeometry, photometric: str) -> tuple[np.ndarray, str]:
    """Decode one frame; returns the array and the photometric interpretation it is now in."""
    from PIL import Image
    from pydicom.pixels import pixel_array

    syntax = ds.file_meta.TransferSyntaxUID
    syntax_name = getattr(syntax, "name", None) or "unknown"
    try:
        if getattr(syntax, "is_encapsulated", False) and "PixelData" in ds:
            _check_codestream(ds, index, geometry)
        array = pixel_array(ds, index=index)
    except ScanError:
        raise
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        logger.info("DICOM decoding failed for %s: %s", syntax_name, type(exc).__name__)
        if getattr(syntax, "is_compressed", False):
            raise ScanError(
                f"The DICOM pixel data is compressed ({syntax_name}) and no decoder for it is installed "
                "here; install pylibjpeg (with pylibjpeg-libjpeg / pylibjpeg-openjpeg) or python-gdcm, "
                "or export the image uncompressed.", kind="unsupported_format"
            ) from None
        raise ScanError(f"The DICOM pixel data cannot be decoded ({syntax_name}).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError("The compressed image inside the DICOM file is implausibly large; it was not decoded.",
                        kind="too_large") from None
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError, IndexError, struct.error) as exc:
        logger.info("DICOM decoding failed for %s: %s", syntax_name, type(exc).__name__)
        raise ScanError(f"The DICOM pixel data is damaged or inconsistent with its header ({type(exc).__name__}).") from None
    array = np.asarray(array)
    if array.size == 0:
        raise ScanError("The DICOM file holds an empty image.")
    if photometric in ("YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        photometric = "RGB"  # pydicom's decoders return these as RGB (their default as_rgb)
    return array, photometric


def _dicom_color_to_gray(array: np.ndarray) -> np.ndarray:
    if array.shape[-1] in (3, 4):
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return array[..., :3].astype(np.float32) @ weights
    raise ScanError("The DICOM colour layout is not supported.")


def _padding_mask(stored: np.ndarray, ds: Any) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or inside PixelPaddingRangeLimit), on stored values."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, (list, tuple, bytes)) or stored.dtype.kind not in "iu":
        return None
    try:
        pad = int(pad)
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is not None and not isinstance(limit, (list, tuple, bytes)):
            low, high = sorted((pad, int(limit)))
            return (stored >= low) & (stored <= high)
    except (TypeError, ValueError):
        return None
    return stored == pad


def _group_item(ds: Any, frame: int, macro: str) -> Any | None:
    """The first item of functional group `macro` for one frame: Per-frame first, then Shared (PS3.3 C.7.6.16)."""
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if not groups or len(groups) <= index:
            continue
        sequence = groups[index].get(macro)
        if sequence:
            return sequence[0]
    return None


def _rescale_source(ds: Any, frame: int) -> Any:
    """The dataset holding this frame's RescaleSlope / Intercept: its functional group item, or the top level."""
    item = _group_item(ds, frame, "PixelValueTransformationSequence")
    if item is not None and ("RescaleSlope" in item or "RescaleIntercept" in item):
        return item
    return ds


def _modality_lut(array: np.ndarray, ds: Any, frame: int, modality: str | None, steps: list[str]) -> np.ndarray:
    """Stored values -> float32 modality values (HU for CT), a new array the caller may edit."""
    source = _rescale_source(ds, frame)
    unit = " to Hounsfield units" if modality == "CT" else ""
    where = ", from the functional groups" if source is not ds else ""
    if "RescaleSlope" in source or "RescaleIntercept" in source:
        try:
            slope = _number(source.get("RescaleSlope"), 1.0)
            intercept = _number(source.get("RescaleIntercept"), 0.0)
        except (TypeError, ValueError, IndexError):
            raise ScanError("The DICOM rescale slope or intercept is not a number.") from None
        if not (np.isfinite(slope) and np.isfinite(intercept)):
            raise ScanError("The DICOM rescale slope or intercept is undefined (NaN or infinite).")
        if slope == 0.0:
            raise ScanError("The DICOM rescale slope is 0, which would make every pixel the same value.")
        # In float32, in place: pydicom's apply_modality_lut works in float64, twice the memory
        # for the same HU (stored values have at most 16 significant bits in practice).
        values = array.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused by the caller's isinf check
            if slope != 1.0:
                values *= np.float32(slope)
            if intercept != 0.0:
                values += np.float32(intercept)
        steps.append(f"rescaled{unit} (slope {slope:g}, intercept {intercept:g}{where})")
        return values
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            values = np.asarray(apply_modality_lut(array, ds), dtype=np.float32)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            raise ScanError("The DICOM modality LUT is invalid.") from None
        steps.append("modality LUT applied")
        return values
    return array.astype(np.float32)


def _number(value: Any, default: float) -> float:
    """A DS/IS value as float (the first of several), `default` when absent or empty."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    return float(value)


def window_values(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear DICOM window (PS3.3 C.11.2.1.2) of float values into [0, 1].

    Args:
        values: float array of any shape (NaN allowed; NaN maps to 0).
        center: Window centre.
        width: Window width (> 0).

    Returns:
        float32 array of the same shape, in [0, 1] (a new array; `values` is not changed).
    """
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    out = values.astype(np.float32, copy=True)  # worked in place: one image-sized array, not four
    out -= np.float32(low)
    out /= np.float32(width)
    np.clip(out, 0.0, 1.0, out=out)
    np.copyto(out, 0.0, where=np.isnan(out))  # clipped: NaN is the only non-finite value left
    return out


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window_source(ds: Any, frame: int) -> Any:
    item = _group_item(ds, frame, "FrameVOILUTSequence")
    if item is not None and "WindowCenter" in item and "WindowWidth" in item:
        return item
    return ds


def _voi(values: np.ndarray, ds: Any, frame: int, modality: str | None,
         steps: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
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
    source = _window_source(ds, frame)
    if "WindowCenter" in source and "WindowWidth" in source:
        try:
            center, width = _first(source.WindowCenter), _first(source.WindowWidth)
        except (ValueError, TypeError, IndexError):
            center = width = float("nan")
        if np.isfinite(center) and np.isfinite(width) and width > 0:
            steps.append(f"window from the file (centre {center:g}, width {width:g})")
            return window_values(values, center, width), (center, width)
        steps.append("the file's window is invalid and was ignored")
    finite = values[np.isfinite(values)]
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    del finite
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32), None
    steps.append("scaled to the 0.5-99.5 percentile range (no usable window in the file)")
    center, width = (low + high) / 2.0, high - low
    return window_values(values, center, width), (float(center), float(width))


def orientation_of(ds: Any, frame: int = 0) -> str | None:
    """'axial', 'coronal' or 'sagittal' from ImageOrientationPatient, else None.

    Enhanced multi-frame objects keep it in the Plane Orientation functional group, read for `frame`.
    """
    item = _group_item(ds, frame, "PlaneOrientationSequence")
    iop = (item if item is not None and "ImageOrientationPatient" in item else ds).get("ImageOrientationPatient")
    try:
        row = np.array([float(v) for v in iop[:3]])
        col = np.array([float(v) for v in iop[3:6]])
    except (TypeError, ValueError, IndexError):
        return None
    if row.size != 3 or col.size != 3:
        return None
    normal = np.cross(row, col)
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-6:
        return None
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


# Code String tags passed on only when they are valid code strings (PS3.5 6.2: upper-case
# letters, digits, space and underscore, at most 16 characters): free text never reaches `info`.
_CODE_TAGS = ("Modality", "BodyPartExamined", "PhotometricInterpretation")
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")
_NUMBER_TAGS = ("Rows", "Columns", "BitsStored", "SliceThickness")


def _code(value: Any) -> str | None:
    text = str(value or "").strip()
    return text if _CODE_STRING.fullmatch(text) else None


def _safe_info(ds: Any, n_frames: int, frame: int | None) -> dict[str, Any]:
    """Technical, non-identifying tags only: never names, IDs, dates, institutions or free text."""
    info: dict[str, Any] = {}
    for tag in _CODE_TAGS:
        code = _code(_text(ds, tag))
        if code:
            info[tag] = code
    measures = _group_item(ds, frame or 0, "PixelMeasuresSequence")
    for tag in _NUMBER_TAGS:
        source = measures if measures is not None and tag in measures else ds
        try:
            value = float(source.get(tag)) if source.get(tag) not in (None, "") else None
        except (TypeError, ValueError):
            value = None
        if value is not None and np.isfinite(value):
            info[tag] = int(value) if tag in ("Rows", "Columns", "BitsStored") else value
    source = measures if measures is not None and "PixelSpacing" in measures else ds
    spacing = source.get("PixelSpacing")
    if spacing is not None:
        try:
            values = [float(v) for v in spacing][:2]
            if all(np.isfinite(values)):
                info["PixelSpacing"] = values
        except (TypeError, ValueError):
            pass
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_transfer_syntax", False):
        info["TransferSyntax"] = syntax.name
    info["frames"] = n_frames
    if frame is not None:
        info["frame"] = frame + 1
    orientation = orientation_of(ds, frame or 0)
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
