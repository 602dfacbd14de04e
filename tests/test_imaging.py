"""core.imaging: every way a file can arrive, good or bad."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.imaging import MAX_PIXELS, Scan, ScanError, is_dicom, read_scan, window_values
from tests.conftest import data_folder, encode, make_dicom, synthetic_slice


def assert_scan(scan: Scan) -> None:
    assert isinstance(scan, Scan)
    assert scan.pixels.dtype == np.float32 and scan.pixels.ndim == 2
    assert 0.0 <= float(scan.pixels.min()) and float(scan.pixels.max()) <= 1.0


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_reads_common_formats(fmt: str, suffix: str) -> None:
    array = synthetic_slice(96, seed=3)
    scan = read_scan(encode(array, fmt), f"scan.{suffix}")
    assert_scan(scan)
    assert scan.kind == "image" and scan.shape == (96, 96)
    # lossless formats round-trip exactly
    if fmt in ("PNG", "TIFF", "BMP"):
        np.testing.assert_allclose(scan.pixels, array / 255.0, atol=1e-6)


def test_sixteen_bit_png_is_scaled_to_its_range() -> None:
    array = (np.linspace(1000, 3000, 64 * 64).reshape(64, 64)).astype(np.uint16)
    scan = read_scan(encode(array, "PNG"), "deep.png")
    assert_scan(scan)
    assert scan.pixels.min() == 0.0 and scan.pixels.max() == 1.0
    assert any("scaled" in step for step in scan.steps)


def test_rgba_is_flattened_on_black() -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :32, 3] = 255  # left half opaque, right half transparent
    scan = read_scan(encode(rgba, "PNG"), "alpha.png")
    assert scan.pixels[:, :32].mean() > 0.7 and scan.pixels[:, 40:].max() == 0.0
    assert any("transparent" in step for step in scan.steps)


def test_palette_and_cmyk_are_converted() -> None:
    gray = synthetic_slice(64, seed=5)
    palette = Image.fromarray(gray).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert_scan(read_scan(buffer.getvalue(), "palette.png"))
    cmyk = Image.fromarray(np.stack([gray] * 3, axis=2)).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG")
    assert_scan(read_scan(buffer.getvalue(), "cmyk.jpg"))


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((40, 80), dtype=np.uint8)
    array[:, :40] = 255  # bright left half, wider than tall
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    scan = read_scan(buffer.getvalue(), "phone.jpg")
    assert scan.shape == (80, 40)
    assert scan.pixels[:40].mean() > 0.8 and scan.pixels[40:].mean() < 0.2
    assert any("EXIF" in step for step in scan.steps)


def test_gif_is_refused_by_its_bytes() -> None:
    frames = [Image.fromarray(synthetic_slice(64, seed=i)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ScanError, match="it is a GIF image, which is not accepted"):
        read_scan(buffer.getvalue(), "cine.png")


def test_multipage_tiff_uses_first_page() -> None:
    pages = [Image.fromarray(synthetic_slice(64, seed=i)) for i in range(3)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    scan = read_scan(buffer.getvalue(), "stack.tif")
    assert "first of 3 pages used" in scan.steps
    np.testing.assert_allclose(scan.pixels, synthetic_slice(64, seed=0) / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "data,name,fragment",
    [
        (b"", "empty.png", "empty"),
        (b"hello, this is not an image at all" * 10, "notes.png", "not a readable image"),
        (b"<html><body>login</body></html>", "page.png", "not a readable image"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "noise.jpg", "not a readable image"),
        (b"PK\x03\x04" + b"\x00" * 200, "archive.zip", "not a readable image"),
    ],
)
def test_non_images_are_refused_plainly(data: bytes, name: str, fragment: str) -> None:
    with pytest.raises(ScanError, match=fragment):
        read_scan(data, name)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = encode(synthetic_slice(128, seed=2), fmt)
    with pytest.raises(ScanError, match="damaged or truncated"):
        read_scan(data[: len(data) // 2], f"cut.{fmt.lower()}")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_not_decoded() -> None:
    with pytest.raises(ScanError, match="not decoded"):
        read_scan(_png_header_only(50_000, 50_000), "bomb.png")
    assert 50_000 * 50_000 > MAX_PIXELS


@pytest.mark.parametrize("shape,fragment", [((1, 1), "at least"), ((20, 2000), "not a medical image slice")])
def test_degenerate_geometry_is_refused(shape: tuple[int, int], fragment: str) -> None:
    array = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    with pytest.raises(ScanError, match=fragment):
        read_scan(encode(array, "PNG"), "odd.png")


def test_blank_image_is_refused() -> None:
    with pytest.raises(ScanError, match="blank"):
        read_scan(encode(np.full((64, 64), 7, dtype=np.uint8), "PNG"), "blank.png")


def test_float_tiff_with_nan_is_refused() -> None:
    array = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    array[3, 4] = np.nan
    with pytest.raises(ScanError, match="NaN"):
        read_scan(encode(array, "TIFF", mode="F"), "float.tif")


# ------------------------------------------------------------------ DICOM


def ct_array() -> np.ndarray:
    """Stored values of a CT slice: air (0 -> -1024 HU) around a water disc (1024 -> 0 HU)."""
    yy, xx = np.mgrid[0:64, 0:64]
    array = np.zeros((64, 64), dtype=np.int16)
    array[((yy - 32) ** 2 + (xx - 32) ** 2) < 20**2] = 1024
    return array


def test_dicom_ct_rescale_and_lung_window() -> None:
    scan = read_scan(make_dicom(ct_array()), "slice.dcm")
    assert_scan(scan)
    assert scan.kind == "dicom" and scan.modality == "CT"
    assert scan.values is not None
    assert float(scan.values.min()) == -1024.0 and float(scan.values.max()) == 0.0
    assert scan.window == (-600.0, 1500.0)
    # water (0 HU) sits above the lung-window centre; air near the bottom of the window
    assert scan.pixels[32, 32] == pytest.approx((0 + 600 + 750) / 1500, abs=1e-3)
    assert scan.pixels[0, 0] == pytest.approx(max(0.0, (-1024 + 600 + 750) / 1500), abs=1e-3)


def test_dicom_magic_is_enough_without_a_name() -> None:
    data = make_dicom(ct_array())
    assert is_dicom(data, None) and is_dicom(data, "upload")
    assert read_scan(data, "no_extension").kind == "dicom"


def test_dicom_padding_is_masked() -> None:
    array = ct_array()
    array[:4] = -2000
    scan = read_scan(make_dicom(array, intercept=0.0, padding=-2000), "padded.dcm")
    assert np.isnan(scan.values[:4]).all()
    assert np.nanmin(scan.values) == 0.0
    assert scan.pixels[:4].max() == 0.0
    assert any("padding" in step for step in scan.steps)


def test_monochrome1_is_inverted() -> None:
    array = np.tile(np.arange(64, dtype=np.uint16) * 100, (64, 1))
    mono2 = read_scan(make_dicom(array, modality="DX", slope=None, window=(3150, 6300)), "m2.dcm")
    mono1 = read_scan(make_dicom(array, modality="DX", slope=None, window=(3150, 6300), photometric="MONOCHROME1"), "m1.dcm")
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert any("MONOCHROME1" in step for step in mono1.steps)


def test_multiframe_picks_the_middle_frame() -> None:
    frames = np.stack([np.full((32, 32), 100 * (i + 1), dtype=np.uint16) for i in range(5)])
    frames[:, :16] = 0
    scan = read_scan(make_dicom(frames, modality="MR", slope=None), "cine.dcm")
    assert scan.info["frames"] == 5 and scan.info["frame"] == 3
    assert float(np.nanmax(scan.values)) == 300.0
    assert any("frame 3 of 5" in step for step in scan.steps)


def test_rgb_dicom_is_converted() -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:, 16:] = (255, 128, 0)
    scan = read_scan(make_dicom(rgb, modality="XC", slope=None, photometric="RGB"), "photo.dcm")
    assert_scan(scan)
    assert any("grayscale" in step for step in scan.steps)


def test_dicom_without_pixels_is_refused() -> None:
    with pytest.raises(ScanError, match="no pixel data"):
        read_scan(make_dicom(ct_array(), with_pixels=False), "report.dcm")


def test_dcm_name_that_is_not_dicom() -> None:
    with pytest.raises(ScanError, match="not a readable DICOM"):
        read_scan(b"this is plain text pretending to be DICOM" * 20, "fake.dcm")


def test_patient_tags_never_reach_the_scan() -> None:
    scan = read_scan(make_dicom(ct_array()), "slice.dcm")
    text = repr(scan.info) + repr(scan.steps)
    assert "Secret" not in text and "ID-12345" not in text


def test_window_values_contract() -> None:
    values = np.array([-2000.0, -600.0, 1000.0, np.nan], dtype=np.float32)
    out = window_values(values, -600.0, 1500.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError):
        window_values(values, 0.0, 0.0)


# ------------------------------------------------------------------ pydicom's bundled examples


def _pydicom_file(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled in this pydicom")
    with open(path, "rb") as handle:
        return handle.read()


def test_pydicom_mr_example() -> None:
    scan = read_scan(_pydicom_file("MR_small.dcm"), "MR_small.dcm")
    assert_scan(scan)
    assert scan.modality == "MR"


def test_pydicom_ct_example_hounsfield() -> None:
    scan = read_scan(_pydicom_file("CT_small.dcm"), "CT_small.dcm")
    assert scan.modality == "CT" and scan.values is not None
    assert -1100 < float(np.nanmin(scan.values)) < 500


def test_voi_lut_sequence_is_applied() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.add_new(0x00283002, "US", [256, 0, 16])  # LUT Descriptor
    lut.add_new(0x00283006, "US", [int(4095 * (1 - i / 255)) for i in range(256)])  # decreasing: inverts
    array = np.tile(np.arange(256, dtype=np.uint16), (16, 1))
    data = make_dicom(array, modality="MR", slope=None, extra={"VOILUTSequence": Sequence([lut])})
    scan = read_scan(data, "voi.dcm")
    assert any("VOI LUT" in step for step in scan.steps)
    assert scan.pixels[0, 0] == pytest.approx(1.0) and scan.pixels[0, 255] == pytest.approx(0.0)


def test_pydicom_compressed_without_decoder_names_the_syntax() -> None:
    data = _pydicom_file("JPEG2000.dcm")
    try:
        scan = read_scan(data, "JPEG2000.dcm")
    except ScanError as exc:
        assert "JPEG 2000" in str(exc) and "pylibjpeg" in str(exc)
    else:  # a decoder happens to be installed: then it must read properly
        assert_scan(scan)


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_ybr_full_422_uncompressed.dcm", "examples_palette.dcm"])
def test_pydicom_colour_examples(name: str) -> None:
    scan = read_scan(_pydicom_file(name), name)
    assert_scan(scan)
    assert any("grayscale" in step for step in scan.steps)


def test_pydicom_multiframe_example() -> None:
    scan = read_scan(_pydicom_file("SC_rgb_rle_2frame.dcm"), "SC_rgb_rle_2frame.dcm")
    assert scan.info["frames"] == 2
    assert_scan(scan)


# ------------------------------------------------------------------ the real CT samples


def test_dicom_ct_samples_read_in_plausible_hounsfield_units() -> None:
    folder = data_folder("dicom_ct")
    files = sorted(folder.glob("*.dcm"))
    assert files
    for path in files:
        scan = read_scan(path.read_bytes(), path.name)
        assert_scan(scan)
        assert scan.modality == "CT"
        finite = scan.values[np.isfinite(scan.values)]
        low = np.percentile(finite, 1)
        assert -1100 <= low <= -850, f"{path.name}: 1st percentile {low} HU is not air"
        assert float(finite.min()) > -1500, f"{path.name}: padding leaked ({finite.min()} HU)"
        assert scan.info.get("orientation") in {"axial", "coronal", "sagittal"}
        assert scan.info["orientation"] in path.name
