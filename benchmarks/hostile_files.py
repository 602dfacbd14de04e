"""Hostile and unusual files made on the fly, for the hostile-input tests and `benchmarks.hostile`.

Every builder returns bytes; the large ones are built without holding their expanded form
(deflate streams are fed chunk by chunk, multi-page TIFFs and ZIP directories are written
record by record), so a 1 GB bomb costs a few MB to make. Never real patient data.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np

from benchmarks.samples import make_dicom, new_instance, synthetic_slice

# ---------------------------------------------------------------- ordinary images


def pillow_bytes(array: np.ndarray, fmt: str, mode: str | None = None, **params) -> bytes:
    """Encode `array` (converted to `mode` first when given) in a Pillow format."""
    from PIL import Image

    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# Formats Pillow can write that the reader must refuse (the mode each needs to be written in).
FOREIGN_FORMATS: dict[str, str] = {
    "EPS": "L", "GIF": "L", "PPM": "L", "PCX": "L", "TGA": "L", "SGI": "L", "ICO": "RGBA", "DDS": "RGBA",
    "JPEG2000": "L", "SPIDER": "L", "DIB": "L", "XBM": "1", "MSP": "1", "QOI": "RGB", "AVIF": "RGB",
    "ICNS": "RGBA",
}


def foreign_image(fmt: str, size: int = 64) -> bytes:
    """A small scan-like image written in `fmt`, one of FOREIGN_FORMATS."""
    return pillow_bytes(np.stack([synthetic_slice(size, seed=4)] * 3, axis=2), fmt, FOREIGN_FORMATS[fmt])


def float_tiff(values: np.ndarray) -> bytes:
    """A 32-bit float TIFF of `values`."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buffer, format="TIFF", compression="tiff_deflate")
    return buffer.getvalue()


def extreme_float_tiff(size: int = 64) -> bytes:
    """A float TIFF holding +-3e38: finite, but its range overflows float32."""
    values = np.full((size, size), 3e38, dtype=np.float32)
    values[: size // 2] = -3e38
    return float_tiff(values)


def large_image(width: int, height: int, fmt: str = "PNG", mode: str = "RGBA", **params) -> bytes:
    """A large, highly compressible scan-like image (a smooth ellipse), written in `fmt` / `mode`."""
    from PIL import Image

    yy, xx = np.ogrid[0:height, 0:width]
    body = (((xx - width / 2) / (0.4 * width)) ** 2 + ((yy - height / 2) / (0.45 * height)) ** 2) < 1
    gray = Image.fromarray((40 + 150 * body).astype(np.uint8))
    del body
    if mode == "I;16":
        image = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    elif mode == "RGBA":
        image = Image.merge("RGBA", (gray, gray, gray, Image.new("L", gray.size, 200)))
    elif mode == "P":
        image = gray.convert("P")
        params.setdefault("transparency", 0)
    elif mode == "F":
        image = Image.fromarray(np.asarray(gray).astype(np.float32) * 10.5)
    else:
        image = gray.convert(mode)
    buffer = io.BytesIO()
    if fmt == "PNG":
        params.setdefault("compress_level", 1)
    if fmt == "TIFF":
        params.setdefault("compression", "tiff_deflate")
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def many_page_tiff(pages: int, side: int = 16) -> bytes:
    """A TIFF of `pages` tiny 8-bit pages sharing one strip, written IFD by IFD (fast for 50,000 pages)."""
    strip = synthetic_slice(side, seed=9).tobytes()
    entries = 9
    ifd_size = 2 + entries * 12 + 4
    first_ifd = 8 + len(strip)
    out = bytearray(b"II*\x00" + struct.pack("<L", first_ifd) + strip)
    for page in range(pages):
        at = first_ifd + page * ifd_size
        following = at + ifd_size if page + 1 < pages else 0
        tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
                (277, 3, 1), (278, 4, side), (279, 4, len(strip))]
        out += struct.pack("<H", entries)
        for tag, kind, value in tags:
            out += struct.pack("<HHLL", tag, kind, 1, value) if kind == 4 else struct.pack("<HHLHH", tag, kind, 1, value, 0)
        out += struct.pack("<L", following)
    return bytes(out)


# ---------------------------------------------------------------- DICOM


def ct_slice(side: int = 96) -> np.ndarray:
    """Stored CT values: a water disc (1064 -> 40 HU) in air (24 -> -1000 HU), int16."""
    yy, xx = np.mgrid[0:side, 0:side]
    return np.where(((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (0.36 * side) ** 2, 1064, 24).astype(np.int16)


def _meta_bytes(syntax: str, sop_class: str) -> bytes:
    """Preamble, DICM and a File Meta group for `syntax`."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_file_meta_info(stream, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + stream.getvalue()


def _image_header(rows: int, columns: int, bits: int = 8, frames: int = 1, modality: str = "OT") -> bytes:
    """An explicit VR little endian dataset of the image pixel module (no pixel data), as bytes."""
    from pydicom.dataset import Dataset
    from pydicom.filewriter import dcmwrite

    ds = Dataset()
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def deflated_dicom_bomb(inflated_bytes: int, chunk: int = 16 * 2**20) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to about `inflated_bytes`.

    The pixel data is zeros streamed through the compressor, so the file is about 1/1000 of that.
    """
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    side = int(inflated_bytes ** 0.5)
    size = side * side
    header = _image_header(side, side) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, size)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(header)]
    zeros = bytes(min(chunk, size))
    left = size
    while left:
        step = min(left, len(zeros))
        body.append(deflater.compress(zeros[:step] if step < len(zeros) else zeros))
        left -= step
    body.append(deflater.flush())
    return _meta_bytes(DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage) + b"".join(body)


def deflated_dicom() -> bytes:
    """A small, valid deflated CT slice (pydicom writes the deflate stream)."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(make_dicom(ct_slice())))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def native_dicom(rows: int, columns: int, bits: int = 8, frames: int = 1) -> bytes:
    """An uncompressed DICOM of a smooth pattern, built without an intermediate dataset copy."""
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    dtype = np.uint8 if bits == 8 else np.uint16
    row = (np.arange(columns) % 200 + 20).astype(dtype)
    plane = np.broadcast_to(row, (rows, columns))
    size = rows * columns * frames * (bits // 8)
    header = _image_header(rows, columns, bits, frames) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", 0, size)
    body = np.ascontiguousarray(plane).tobytes() * frames
    return _meta_bytes(ExplicitVRLittleEndian, SecondaryCaptureImageStorage) + header + body


def rle_dicom_bomb(side: int = 64, expanded: int = 20 * 2**20) -> bytes:
    """An RLE Lossless DICOM declaring side x side 8-bit, whose one segment expands to `expanded` bytes."""
    from pydicom.uid import RLELossless

    runs = b"\x81\x7f" * (expanded // 128)  # header 0x81: the next byte repeated 128 times
    frame = struct.pack("<16L", 1, 64, *([0] * 14)) + runs
    return _encapsulated_dicom(side, RLELossless, frame)


def compressed_dicom(declared: int, actual: int, codec: str = "JPEG") -> bytes:
    """A compressed DICOM whose header says declared x declared but whose codestream is actual x actual.

    Args:
        declared: Rows and Columns written in the header.
        actual: Side of the image inside the codestream.
        codec: "JPEG" (baseline, written by Pillow), "JPEG2000" (a raw codestream, by Pillow)
            or "JPEGLS" (only a frame header: enough for a size check, not for decoding).
    """
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

    if codec == "JPEG":
        codestream, syntax = pillow_bytes(synthetic_slice(actual, seed=2), "JPEG", quality=90), JPEGBaseline8Bit
    elif codec == "JPEG2000":
        codestream = pillow_bytes(synthetic_slice(actual, seed=2), "JPEG2000", no_jp2=True, irreversible=False)
        syntax = JPEG2000Lossless
    elif codec == "JPEGLS":
        # SOI, then SOF55 (JPEG-LS): length 11, precision 8, height, width, one component
        codestream = b"\xff\xd8\xff\xf7" + struct.pack(">HBHHB3B", 11, 8, actual, actual, 1, 1, 0x11, 0) + b"\x00" * 64
        syntax = JPEGLSLossless
    else:
        raise ValueError(f"unknown codec {codec!r}; one of JPEG, JPEG2000, JPEGLS")
    return _encapsulated_dicom(declared, syntax, codestream)


def _encapsulated_dicom(side: int, syntax: str, frame: bytes) -> bytes:
    """An 8-bit unsigned side x side DICOM whose one encapsulated frame is `frame`, as is.

    The header is an ordinary blank slice's; only the transfer syntax and the pixel data are
    replaced, so whatever `frame` holds (a bomb, a codestream of another size) reaches the reader.

    Args:
        side: Rows and Columns written in the header.
        syntax: The transfer syntax UID (RLE, a JPEG family).
        frame: The frame's bytes, never checked against the header.
    """
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((side, side), np.int16), modality="OT", slope=None)))
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"  # encapsulated pixel data is always OB
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nested_sequence_dicom(depth: int = 200) -> bytes:
    """A valid small CT slice that also carries a Content Sequence nested `depth` levels deep (undefined lengths)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(ct_slice())))
    pixels = ds.PixelData
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    open_levels = (struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
                   + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)) * depth
    close_levels = (struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)) * depth
    pixel_element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels
    return buffer.getvalue() + open_levels + close_levels + pixel_element


def enhanced_ct(frames: int = 3, per_frame: bool = False) -> bytes:
    """An Enhanced CT (multi-frame) whose rescale lives only in the functional groups.

    Stored values are 0..4095 (air 24, water disc 1064 in frame 0); the rescale intercept is
    -1024 for every frame (Shared Functional Groups) or -1024 - 100 * frame (Per-frame).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    def item(**values) -> Dataset:
        ds = Dataset()
        for key, value in values.items():
            setattr(ds, key, value)
        return ds

    def transform(intercept: float) -> Sequence:
        return Sequence([item(RescaleIntercept=intercept, RescaleSlope=1, RescaleType="HU")])

    ds = new_instance(EnhancedCTImageStorage)
    ds.Modality = "CT"
    ds.PatientName = "Secret^Patient"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    stack = np.stack([ct_slice().astype(np.uint16)] * frames)
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.7, 0.7], SliceThickness=1.25)]))
    if per_frame:
        ds.PerFrameFunctionalGroupsSequence = Sequence(
            [item(PixelValueTransformationSequence=transform(-1024 - 100 * f)) for f in range(frames)])
    else:
        shared.PixelValueTransformationSequence = transform(-1024)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = stack.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------- ZIP


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A ZIP archive of the given (name, bytes) members, in that order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_of_zeros(name: str, size: int, chunk: int = 16 * 2**20) -> bytes:
    """A ZIP holding one member of `size` zero bytes, written in chunks (deflates about 1000:1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open(name, "w", force_zip64=size > 2**31) as handle:
            zeros = bytes(min(chunk, size))
            left = size
            while left:
                step = min(left, len(zeros))
                handle.write(zeros if step == len(zeros) else zeros[:step])
                left -= step
    return buffer.getvalue()


def many_entry_zip(entries: int, declared: int | None = None) -> bytes:
    """A ZIP of `entries` empty stored files, written record by record (600,000 in about a second).

    Args:
        entries: Entries actually in the central directory.
        declared: Entry count written in the end record (default: the true count; more than
            65,535 gives a ZIP64 end record, as zipfile writes).
    """
    local, central = bytearray(), bytearray()
    for index in range(entries):
        name = f"f{index:07d}.png".encode()
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0,
                               len(name), 0, 0, 0, 0, 0, offset) + name
    declared = entries if declared is None else declared
    end = b""
    if declared > 0xFFFF:
        zip64_at = len(local) + len(central)
        end += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared, len(central), len(local))
        end += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
        count = 0xFFFF
    else:
        count = declared
    end += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    return bytes(local + central + end)


def mark_encrypted(data: bytes, name: str) -> bytes:
    """Set the 'encrypted' flag of member `name` in a ZIP (local and central headers), contents unchanged."""
    out = bytearray(data)
    encoded = name.encode()
    for magic, flag_at, name_len_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        start = 0
        while (start := out.find(magic, start)) >= 0:
            length = struct.unpack_from("<H", out, start + name_len_at)[0]
            if bytes(out[start + name_at:start + name_at + length]) == encoded:
                flags = struct.unpack_from("<H", out, start + flag_at)[0]
                struct.pack_into("<H", out, start + flag_at, flags | 1)
            start += 4
    return bytes(out)
