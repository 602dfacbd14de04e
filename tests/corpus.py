"""A corpus of hostile and unusual uploads, generated on the fly (nothing downloaded or copied).

`CORPUS` maps a case name to (filename, bytes factory, expectation) where expectation is
"ok" (must read as a scan), "refused" (must raise ScanError) or "either". Every case is small
(the whole corpus goes through the reader, the command line and the app); the large ones
(40-megapixel images, gigabyte bombs, 600,000-entry archives) are in tests/test_imaging_limits.py,
tests/test_archive.py and `python -m benchmarks.hostile`.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Callable

import numpy as np
from PIL import Image

from benchmarks import hostile_files as hf
from tests.conftest import encode, make_dicom, synthetic_slice


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _pil(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _slice(size: int = 128, seed: int = 0) -> np.ndarray:
    return synthetic_slice(size, seed=seed)


def _exif_rotated() -> bytes:
    image = Image.fromarray(np.pad(_slice(64), ((0, 0), (0, 64))))
    exif = image.getexif()
    exif[0x0112] = 8
    return _pil(image, "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_slice(64, seed=i)) for i in range(4)]
    return _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    pages = [Image.fromarray(_slice(64, seed=i)) for i in range(3)]
    return _pil(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scan.png", encode(_slice(64)))
    return buffer.getvalue()


def _ct() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:96]
    return np.where(((yy - 48) ** 2 + (xx - 48) ** 2) < 35**2, 1064, 24).astype(np.int16)


def _dicom_compressed() -> bytes:
    """A JPEG 2000 DICOM (encapsulated junk): no decoder here can read it."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000

    ds = pydicom.dcmread(io.BytesIO(make_dicom(_ct())))
    ds.file_meta.TransferSyntaxUID = JPEG2000
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom_edit(**changes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(_ct())))
    for key, value in changes.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _unknown_syntax_dicom() -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(_ct())))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _voi_lut_dicom() -> bytes:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.add_new(0x00283002, "US", [256, 0, 12])
    lut.add_new(0x00283006, "US", [i * 16 for i in range(256)])
    array = np.tile(np.arange(128, dtype=np.uint16) * 2, (128, 1))
    return make_dicom(array, modality="MR", slope=None, extra={"VOILUTSequence": Sequence([lut])})


Factory = Callable[[], bytes]

CORPUS: dict[str, tuple[str, Factory, str]] = {
    "zero_bytes": ("empty.png", lambda: b"", "refused"),
    "random_bytes": ("noise.jpg", lambda: np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "refused"),
    "text_as_png": ("notes.png", lambda: b"Patient doing well. Follow up in 2 weeks.\n" * 20, "refused"),
    "html_as_png": ("page.png", lambda: b"<!doctype html><html><body><img src=x></body></html>", "refused"),
    "pdf_as_png": ("report.png", lambda: b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "refused"),
    "svg_as_png": ("icon.png", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"/></svg>', "refused"),
    "zip_archive": ("scans.zip", _zip, "refused"),
    "truncated_png": ("cut.png", lambda: encode(_slice(160))[:700], "refused"),
    "truncated_jpeg": ("cut.jpg", lambda: encode(_slice(160), "JPEG")[:600], "refused"),
    "truncated_bmp": ("cut.bmp", lambda: encode(_slice(160), "BMP")[:3000], "refused"),
    "decompression_bomb": ("bomb.png", lambda: _png_declaring(60_000, 60_000), "refused"),
    "declared_huge_but_small": ("wide.png", lambda: _png_declaring(10_000, 8_000), "refused"),
    "one_by_one": ("dot.png", lambda: encode(np.array([[128]], dtype=np.uint8)), "refused"),
    "very_wide": ("strip.png", lambda: encode(np.random.default_rng(0).integers(0, 255, (20, 20000), dtype=np.uint8)), "refused"),
    "blank": ("blank.png", lambda: encode(np.zeros((64, 64), dtype=np.uint8)), "refused"),
    "float_tiff_nan": ("nan.tif", lambda: encode(np.where(np.eye(32) > 0, np.nan, 0.5).astype(np.float32), "TIFF", mode="F"), "refused"),
    "tiny_valid": ("tiny.png", lambda: encode(_slice(8)), "ok"),
    "gray_png": ("scan.png", lambda: encode(_slice()), "ok"),
    "gray16_png": ("deep.png", lambda: encode((_slice().astype(np.uint16) * 200)), "ok"),
    "int32_tiff": ("int.tif", lambda: _pil(Image.fromarray(_slice().astype(np.int32) * 1000, mode="I"), "TIFF"), "ok"),
    "float_tiff": ("float.tif", lambda: encode((_slice() / 255.0).astype(np.float32), "TIFF", mode="F"), "ok"),
    "rgba_png": ("alpha.png", lambda: encode(np.dstack([np.stack([_slice()] * 3, 2), np.full((128, 128), 180, np.uint8)])), "ok"),
    "la_png": ("la.png", lambda: _pil(Image.fromarray(_slice()).convert("LA"), "PNG"), "ok"),
    "palette_png": ("palette.png", lambda: _pil(Image.fromarray(_slice()).convert("P"), "PNG"), "ok"),
    "palette_gif_transparent": ("t.gif", lambda: _pil(Image.fromarray(_slice()).convert("P"), "GIF", transparency=0), "refused"),
    "bilevel_bmp": ("bw.bmp", lambda: _pil(Image.fromarray(_slice()).convert("1"), "BMP"), "ok"),
    "cmyk_jpeg": ("cmyk.jpg", lambda: _pil(Image.fromarray(np.stack([_slice()] * 3, 2)).convert("CMYK"), "JPEG"), "ok"),
    "colour_photo_jpeg": ("photo.jpg", lambda: encode(np.random.default_rng(2).integers(0, 255, (96, 128, 3), dtype=np.uint8), "JPEG"), "ok"),
    "progressive_jpeg": ("prog.jpg", lambda: encode(_slice(), "JPEG", progressive=True), "ok"),
    "lossless_webp": ("scan.webp", lambda: encode(_slice(), "WEBP", lossless=True), "ok"),
    "animated_gif": ("cine.gif", _animated_gif, "refused"),
    "multipage_tiff": ("stack.tif", _multipage_tiff, "ok"),
    "exif_rotated_jpeg": ("phone.jpg", _exif_rotated, "ok"),
    "dicom_ct": ("ct.dcm", lambda: make_dicom(_ct()), "ok"),
    "dicom_no_extension": ("IM000001", lambda: make_dicom(_ct()), "ok"),
    "dicom_without_preamble": ("raw.dcm", lambda: make_dicom(_ct(), preamble=False), "ok"),
    "dicom_no_pixels": ("sr.dcm", lambda: make_dicom(_ct(), with_pixels=False), "refused"),
    "dicom_compressed_no_decoder": ("j2k.dcm", _dicom_compressed, "either"),
    "dicom_multiframe": ("cine.dcm", lambda: make_dicom(np.stack([_ct()] * 4), modality="MR", slope=None), "ok"),
    "dicom_rgb": ("rgb.dcm", lambda: make_dicom(np.stack([_slice(96)] * 3, 2), modality="XC", slope=None, photometric="RGB"), "ok"),
    "dicom_monochrome1": ("m1.dcm", lambda: make_dicom(_ct().astype(np.uint16), modality="DX", slope=None, photometric="MONOCHROME1"), "ok"),
    "dicom_voi_lut": ("voi.dcm", _voi_lut_dicom, "ok"),
    "dicom_wrong_modality": ("us.dcm", lambda: make_dicom(_ct(), modality="US"), "ok"),
    "dicom_padding": ("pad.dcm", lambda: make_dicom(np.where(_ct() == 24, -2000, _ct()).astype(np.int16), intercept=-1024, padding=-2000), "ok"),
    "dicom_truncated_pixels": ("cut.dcm", lambda: make_dicom(_ct())[:-5000], "refused"),
    "dicom_rows_lie": ("rows.dcm", lambda: _dicom_edit(Rows=4000, Columns=4000), "refused"),
    "dicom_zero_slope": ("flat.dcm", lambda: _dicom_edit(RescaleSlope=0), "refused"),
    "dicom_bad_window": ("win.dcm", lambda: make_dicom(_ct(), modality="MR", slope=None, window=(100, -5)), "ok"),
    "dicom_burned_in_annotation": ("burned.dcm", lambda: make_dicom(_ct(), extra={"BurnedInAnnotation": "YES"}), "refused"),
    "dicom_magic_only": ("magic.dcm", lambda: b"\x00" * 128 + b"DICM", "refused"),
    "dcm_name_not_dicom": ("fake.dcm", lambda: b"just some text in a file called .dcm " * 10, "refused"),
    # Only the formats the README names, decided from the bytes: each of these is named scan.png.
    **{f"{fmt.lower()}_named_png": ("scan.png", lambda fmt=fmt: hf.foreign_image(fmt), "refused")
       for fmt in hf.FOREIGN_FORMATS},
    "float_tiff_3e38": ("extreme.tif", hf.extreme_float_tiff, "refused"),
    "float_tiff_inf": ("inf.tif", lambda: hf.float_tiff(np.where(np.eye(32) > 0, np.inf, 0.5)), "refused"),
    "large_rgba_png": ("big.png", lambda: hf.large_image(2400, 1800, "PNG", "RGBA"), "ok"),
    "large_jpeg": ("big.jpg", lambda: hf.large_image(2400, 1800, "JPEG", "RGB"), "ok"),
    "tiff_300_pages": ("pages.tif", lambda: hf.many_page_tiff(300), "ok"),
    "dicom_deflated": ("deflated.dcm", hf.deflated_dicom, "ok"),
    "dicom_enhanced_ct": ("enhanced.dcm", hf.enhanced_ct, "ok"),
    "dicom_enhanced_ct_per_frame": ("enhanced2.dcm", lambda: hf.enhanced_ct(per_frame=True), "ok"),
    "dicom_nested_200": ("nested.dcm", hf.nested_sequence_dicom, "refused"),
    "dicom_rle_bomb": ("rle.dcm", lambda: hf.rle_dicom_bomb(64, 8 * 2**20), "refused"),
    "dicom_jpeg_larger_than_header": ("jpeg.dcm", lambda: hf.compressed_dicom(64, 1024), "refused"),
    "dicom_j2k_larger_than_header": ("j2k.dcm", lambda: hf.compressed_dicom(64, 512, "JPEG2000"), "refused"),
    "dicom_header_over_budget": ("huge.dcm", lambda: _dicom_edit(Rows=20000, Columns=20000), "refused"),
    "dicom_unknown_transfer_syntax": ("odd.dcm", _unknown_syntax_dicom, "refused"),
}
