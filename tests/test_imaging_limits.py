"""core.imaging under hostile input: pixel budgets, bounded inflation, only the formats we mean,
finite values, bounded memory, enhanced multi-frame CT, and messages that carry no library text.

Memory is checked with tracemalloc, which sees Python and NumPy allocations (not Pillow's C
buffers): enough to show that no full-size float array, inflated buffer or decoded bomb exists.
Time and resident memory of the large cases are measured by `python -m benchmarks.hostile`.
"""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable

import numpy as np
import pydicom
import pytest

import core.imaging as imaging
from benchmarks import hostile_files as hf
from core.imaging import ScanError, is_dicom, read_scan
from tests.conftest import encode, make_dicom, synthetic_slice

# Only names that existed before these limits are imported at the top, so that on the old
# reader each test fails on its behaviour, not on an import; the limits are read where used.

MB = 2**20


def traced_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """(result or the ScanError raised, peak bytes tracemalloc saw while running fn)."""
    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except ScanError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ DICOM pixel budget


def test_dicom_over_the_pixel_budget_is_refused_before_decoding() -> None:
    data = hf.native_dicom(6500, 6200)  # 40.3 million 8-bit pixels: a 40 MB file
    result, peak = traced_peak(lambda: read_scan(data, "big.dcm"))
    assert isinstance(result, ScanError) and "not decoded" in str(result), result
    assert "6200 x 6500" in str(result) and f"{imaging.MAX_PIXELS // 1_000_000} million" in str(result)
    assert peak < 1.5 * len(data), peak  # parsing holds the pixel bytes once; nothing is decoded


def test_check_pixel_budget_counts_frames_samples_and_bytes() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((4, 64, 64), np.uint16), modality="MR", slope=None)))
    check_pixel_budget = imaging.check_pixel_budget
    geometry = check_pixel_budget(ds)
    assert (geometry.rows, geometry.columns, geometry.frames, geometry.samples, geometry.bytes_per_sample) == (64, 64, 4, 1, 2)
    assert geometry.decoded_bytes(4) == 64 * 64 * 4 * 2
    check_pixel_budget(ds, frames=4, max_bytes=64 * 64 * 4 * 2)
    with pytest.raises(ScanError, match="MB decoded"):
        check_pixel_budget(ds, frames=4, max_bytes=64 * 64 * 4 * 2 - 1)
    with pytest.raises(ScanError, match="million accepted"):
        check_pixel_budget(ds, max_pixels=64 * 64 - 1)
    ds.Rows = 0
    with pytest.raises(ScanError, match="impossible"):
        check_pixel_budget(ds)


def test_deflated_dicom_is_read() -> None:
    scan = read_scan(hf.deflated_dicom(), "deflated.dcm")
    assert scan.modality == "CT" and float(np.nanmax(scan.values)) == 40.0


def test_deflated_dicom_bomb_is_refused_without_inflating_it() -> None:
    data = hf.deflated_dicom_bomb(216 * MB)  # past the 200 MB a deflated file may unpack to
    assert len(data) < MB
    result, peak = traced_peak(lambda: read_scan(data, "bomb.dcm"))
    assert isinstance(result, ScanError) and "deflate-compressed" in str(result), result
    assert peak < 8 * MB, peak
    assert imaging.MAX_DICOM_BYTES == 200 * MB


def test_truncated_deflate_stream_is_refused() -> None:
    with pytest.raises(ScanError, match="damaged or truncated"):
        read_scan(hf.deflated_dicom()[:-40], "cut.dcm")


def test_rle_segment_expanding_past_the_frame_is_refused_before_decoding() -> None:
    data = hf.rle_dicom_bomb(64, 16 * MB)  # 64 x 64 declared, one segment expanding to 16 MB
    result, peak = traced_peak(lambda: read_scan(data, "rle.dcm"))
    assert isinstance(result, ScanError) and "expands past" in str(result), result
    assert peak < 2 * len(data) + MB, peak


@pytest.mark.parametrize("codec", ["JPEG", "JPEG2000", "JPEGLS"])
def test_codestream_larger_than_its_header_is_refused(codec: str) -> None:
    with pytest.raises(ScanError, match="larger than its header says"):
        read_scan(hf.compressed_dicom(64, 1024, codec), "compressed.dcm")


@pytest.mark.parametrize("codec", ["JPEG", "JPEG2000"])
def test_codestream_matching_its_header_is_read(codec: str) -> None:
    assert read_scan(hf.compressed_dicom(64, 64, codec), "compressed.dcm").shape == (64, 64)


def test_only_the_shown_frame_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels.decoders.base import Decoder

    indices: list[int | None] = []
    original = Decoder.as_array

    def spy(self, src, *, index=None, **kwargs):  # noqa: ANN001 - pydicom's signature
        indices.append(index)
        return original(self, src, index=index, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", spy)
    frames = np.stack([np.full((32, 32), 100 * (i + 1), np.uint16) for i in range(9)])
    frames[:, :8] = 0
    scan = read_scan(make_dicom(frames, modality="MR", slope=None), "cine.dcm")
    assert indices == [4]
    assert float(np.nanmax(scan.values)) == 500.0 and scan.info["frame"] == 5


def test_sequences_nested_200_deep_are_refused_not_crashed() -> None:
    with pytest.raises(ScanError, match="too deeply"):
        read_scan(hf.nested_sequence_dicom(200), "nested.dcm")
    assert read_scan(hf.nested_sequence_dicom(5), "nested.dcm").modality == "CT"


def test_unknown_transfer_syntax_is_refused_plainly() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((32, 32), np.int16))))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ScanError, match="not a known one"):
        read_scan(buffer.getvalue(), "odd.dcm")


def test_rescale_that_overflows_is_refused() -> None:
    array = np.full((32, 32), 30000, np.int16)
    array[:16] = 1
    with pytest.raises(ScanError, match="overflow"):
        read_scan(make_dicom(array, modality="MR", slope=1e37, intercept=0.0), "huge.dcm")


# ------------------------------------------------------------------ enhanced multi-frame CT


def test_enhanced_ct_rescale_from_shared_functional_groups() -> None:
    scan = read_scan(hf.enhanced_ct(frames=3), "enhanced.dcm")
    assert scan.modality == "CT" and scan.info["frame"] == 2 and scan.info["frames"] == 3
    # stored 24 (air) and 1064 (water disc) with intercept -1024: -1000 and 40 HU, not raw values
    assert float(np.nanmin(scan.values)) == -1000.0 and float(np.nanmax(scan.values)) == 40.0
    assert any("functional groups" in step for step in scan.steps)
    assert scan.info["orientation"] == "axial" and scan.info["PixelSpacing"] == [0.7, 0.7]


def test_enhanced_ct_rescale_per_frame() -> None:
    ds = imaging.parse_dicom(hf.enhanced_ct(frames=3, per_frame=True))
    assert imaging.dicom_frame_count(ds) == 3
    for frame in range(3):
        scan = imaging.scan_from_dataset(ds, frame)
        intercept = -1024 - 100 * frame
        assert float(np.nanmax(scan.values)) == 1064 + intercept
        assert scan.info["frame"] == frame + 1
    with pytest.raises(ValueError, match="frames 0 to 2"):
        imaging.scan_from_dataset(ds, 3)
    header = imaging.parse_dicom(hf.enhanced_ct(frames=3), stop_before_pixels=True)
    assert "PixelData" not in header and imaging.dicom_frame_count(header) == 3
    with pytest.raises(ScanError, match="no pixel data"):
        imaging.scan_from_dataset(header)


# ------------------------------------------------------------------ only the formats we mean


@pytest.mark.parametrize("fmt", sorted(hf.FOREIGN_FORMATS))
def test_other_formats_are_refused_whatever_their_name(fmt: str) -> None:
    with pytest.raises(ScanError, match="not a readable image") as caught:
        read_scan(hf.foreign_image(fmt), "scan.png")
    assert "Upload a PNG, JPEG, WebP, TIFF, BMP or DICOM file." in str(caught.value)


def test_eps_never_reaches_ghostscript_or_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import tempfile

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the reader wrote a temporary file or started a process")

    for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    with pytest.raises(ScanError, match="PostScript"):
        read_scan(hf.foreign_image("EPS", 128), "scan.png")


def test_names_do_not_decide_the_format() -> None:
    png = encode(synthetic_slice(64))
    assert read_scan(png, "scan.jpg").info["format"] == "PNG"
    assert read_scan(png, "scan.gif").info["format"] == "PNG"


def test_raw_dicom_dataset_is_recognised_from_its_bytes() -> None:
    data = make_dicom(synthetic_slice(64).astype(np.int16), preamble=False)
    assert is_dicom(data, "IM0001") and read_scan(data, "IM0001").kind == "dicom"


# ------------------------------------------------------------------ finite values


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
def test_non_finite_float_tiff_is_refused(fill: float) -> None:
    values = synthetic_slice(64).astype(np.float32)
    values[5, 7] = fill
    with pytest.raises(ScanError, match="NaN or infinite"):
        read_scan(hf.float_tiff(values), "scan.tif")


def test_float_tiff_whose_range_overflows_is_refused() -> None:
    with pytest.raises(ScanError, match="overflows"):
        read_scan(hf.extreme_float_tiff(), "extreme.tif")


def test_large_but_finite_float_values_scale_exactly() -> None:
    values = np.linspace(-1e38, 1e38, 64 * 64, dtype=np.float32).reshape(64, 64)
    scan = read_scan(hf.float_tiff(values), "wide.tif")
    assert np.isfinite(scan.pixels).all()
    assert scan.pixels[0, 0] == 0.0 and scan.pixels[-1, -1] == 1.0


# ------------------------------------------------------------------ memory and size


def test_large_rgba_png_is_shrunk_in_8_bits() -> None:
    data = hf.large_image(4096, 4096, "PNG", "RGBA")
    scan, peak = traced_peak(lambda: read_scan(data, "big.png"))
    assert not isinstance(scan, ScanError), scan
    assert scan.shape == (2048, 2048) and imaging.MAX_IMAGE_SIDE == 2048
    assert any("shrunk from 4096 x 4096" in step for step in scan.steps)
    # the float result is 16 MB; a float copy of the full image alone would be 64 MB
    assert peak < 40 * MB, peak


def test_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    data = hf.large_image(6000, 4000, "JPEG", "RGB")
    scan, peak = traced_peak(lambda: read_scan(data, "big.jpg"))
    assert not isinstance(scan, ScanError), scan
    assert scan.shape == (1365, 2048)
    assert peak < 40 * MB, peak


@pytest.mark.parametrize("mode", ["I;16", "F", "P", "L"])
def test_large_images_of_every_depth_keep_their_content(mode: str) -> None:
    fmt = "TIFF" if mode == "F" else "PNG"
    scan = read_scan(hf.large_image(3000, 2400, fmt, mode), f"big.{fmt.lower()}")
    assert scan.shape == (1638, 2048)
    # the ellipse body is brighter than the background, whatever the depth
    assert scan.pixels[819, 1024] > scan.pixels[10, 10] + 0.3


def test_shrunk_image_matches_area_average() -> None:
    array = np.random.default_rng(0).integers(0, 256, (2048 * 2, 1000), dtype=np.uint8)
    scan = read_scan(encode(array), "tall.png")
    assert scan.shape == (2048, 500)
    expected = array.reshape(2048, 2, 500, 2).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(scan.pixels, expected, atol=1 / 255 + 1e-6)


def test_exif_rotation_survives_the_shrink() -> None:
    from PIL import Image

    array = np.zeros((2000, 4000), dtype=np.uint8)
    array[:, :2000] = 255  # bright left half, wider than tall
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    scan = read_scan(buffer.getvalue(), "phone.jpg")
    assert scan.shape == (2048, 1024)
    assert scan.pixels[:900].mean() > 0.9 and scan.pixels[1150:].mean() < 0.1


def test_multipage_tiff_is_counted_only_up_to_a_cap() -> None:
    scan = read_scan(hf.many_page_tiff(3000), "stack.tif")
    assert "first of 100 or more pages used" in scan.steps and imaging.MAX_PAGES_COUNTED == 100
    scan = read_scan(hf.many_page_tiff(3), "stack.tif")
    assert "first of 3 pages used" in scan.steps and scan.info["frames"] == 3


def test_dicom_keeps_its_resolution() -> None:
    array = synthetic_slice(2600).astype(np.int16)
    scan = read_scan(make_dicom(array), "large.dcm")
    assert scan.shape == (2600, 2600)
    np.testing.assert_array_equal(scan.values[np.isfinite(scan.values)] + 1024,
                                  array[np.isfinite(scan.values)].astype(np.float32))


# ------------------------------------------------------------------ what the reader is told


def test_messages_carry_no_names_paths_or_library_text() -> None:
    cases = [
        (b"garbage bytes " * 20, "/home/someone/secret/scan.png"),
        (encode(synthetic_slice(64))[:300], "/srv/app/uploads/cut.png"),
        (make_dicom(synthetic_slice(64).astype(np.int16))[:-900], "/srv/uploads/patient/cut.dcm"),
    ]
    for data, name in cases:
        with pytest.raises(ScanError) as caught:
            read_scan(data, name)
        message = str(caught.value)
        assert "/" not in message and "secret" not in message and "patient" not in message, message
        assert "Error:" not in message and "Traceback" not in message


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # pydicom warns on the invalid CS it is given
def test_free_text_tags_never_reach_info() -> None:
    data = make_dicom(synthetic_slice(64).astype(np.int16),
                      extra={"BodyPartExamined": "DOE^JANE MRN-0042", "Manufacturer": "Dr Who's Clinic"})
    scan = read_scan(data, "tags.dcm")
    assert "BodyPartExamined" not in scan.info and "Manufacturer" not in scan.info
    assert "DOE" not in repr(scan.info) + repr(scan.steps)
    chest = read_scan(make_dicom(synthetic_slice(64).astype(np.int16), extra={"BodyPartExamined": "CHEST"}), "c.dcm")
    assert chest.info["BodyPartExamined"] == "CHEST"
