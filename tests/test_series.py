"""core.series: whole studies in (ZIPs, several files, folders, multi-frame DICOM, NIfTI), ordered
and checked series out; every case made here with pydicom / nibabel, plus real data where present."""

from __future__ import annotations

import csv
import gzip
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core import series as series_module
from core.imaging import CT_WINDOW_PRESETS, Scan, ScanError, read_scan, window_values
from core.preprocess import eight_bit
from core.series import (
    BURNED_IN_REASON,
    Series,
    Study,
    StudyError,
    read_members,
    read_path,
    read_study,
    read_uploads,
)
from core.tasks import BRAIN_WINDOW, get_task
from tests.conftest import data_folder, make_dicom

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def phantom(rows: int, columns: int, marker: float) -> np.ndarray:
    """HU slice: air, a skull ring, brain at 35 HU, and a square whose HU says which slice it is."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    r = np.hypot((yy - rows / 2) / (rows / 2), (xx - columns / 2) / (columns / 2))
    hu = np.full((rows, columns), -1000.0)
    hu[r < 0.9] = 1000.0
    hu[r < 0.8] = 35.0
    hu[rows // 2 - 3:rows // 2 + 3, columns // 2 - 3:columns // 2 + 3] = marker
    return hu


def marker_of(values: np.ndarray) -> float:
    rows, columns = values.shape
    return float(np.nanmean(values[rows // 2 - 2:rows // 2 + 2, columns // 2 - 2:columns // 2 + 2]))


def ct_slices(n: int = 8, rows: int = 64, columns: int = 64, spacing: float = 5.0, iop: tuple = AXIAL,
              series_uid: str = "1.2.3.4.1", study_uid: str = "1.2.3.4", number: int = 2,
              start: tuple = (-100.0, -120.0, 40.0), step: tuple | None = None, modality: str = "CT",
              description: str = "HEAD 5mm", extra: dict | None = None) -> list[bytes]:
    """One series of n CT slices, slice k at start + k * step (default: spacing along the normal)
    with marker HU 100 + 10 k, InstanceNumber k + 1."""
    normal = np.cross(iop[:3], iop[3:])
    step_vector = np.asarray(step if step is not None else normal * spacing, dtype=float)
    files = []
    for k in range(n):
        position = np.asarray(start) + k * step_vector
        tags = {
            "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SeriesNumber": number,
            "SeriesDescription": description, "InstanceNumber": k + 1, "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "ImageOrientationPatient": [f"{v:.6f}" for v in iop],
            "ImagePositionPatient": [f"{v:.4f}" for v in position],
            "PixelSpacing": [0.5, 0.5], "SliceThickness": spacing, "BodyPartExamined": "HEAD",
        }
        tags.update(extra or {})
        files.append(make_dicom((phantom(rows, columns, 100 + 10 * k) + 1024).astype(np.int16),
                                modality=modality, extra=tags))
    return files


def zipped(files: list[bytes], shuffle: bool = True, seed: int = 0, extra: dict[str, bytes] | None = None) -> bytes:
    """A ZIP in any order and folder layout, names without extension."""
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for place, k in enumerate(order):
            archive.writestr(f"export/{'AB'[place % 2]}/IM{place:05d}", files[k])
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def only(study: Study) -> Series:
    assert len(study.series) == 1, study.listing()
    return study.series[0]


def reasons(item: Series | Study) -> dict[str, int]:
    return {entry.reason: entry.count for entry in item.left_out}


# ---------------------------------------------------------------- grouping and order


def test_shuffled_zip_is_ordered_by_position() -> None:
    study = read_study(zipped(ct_slices(12)), "study.zip")
    series = only(study)
    assert len(series) == 12 and series.refused is None
    geometry = series.geometry
    assert geometry.ordered_by == "position" and geometry.plane == "axial"
    assert geometry.spacing == pytest.approx(5.0) and geometry.gaps == () and geometry.duplicates == 0
    assert geometry.tilt == pytest.approx(0.0, abs=1e-6)
    assert list(geometry.positions) == sorted(geometry.positions)
    assert [marker_of(series.hu(i)) for i in range(12)] == pytest.approx([100 + 10 * k for k in range(12)])
    assert series.warnings == () and series.left_out == () and study.left_out == ()
    assert series.key == "1.2.3.4.1" and series.number == 2 and series.description == "HEAD 5mm"


def test_order_follows_the_normal_not_the_instance_number() -> None:
    """Positions descending along z with InstanceNumber ascending: the order is by position."""
    files = ct_slices(6, start=(0.0, 0.0, 100.0), step=(0.0, 0.0, -5.0))
    series = only(read_uploads([("", f) for f in files]))
    # slice k sits at z = 100 - 5k: anatomical (ascending z) order is k = 5, 4, ..., 0
    assert [marker_of(series.hu(i)) for i in range(6)] == pytest.approx([150, 140, 130, 120, 110, 100])


def test_instance_number_is_the_fallback_and_says_so() -> None:
    files = ct_slices(5, extra={"ImagePositionPatient": None})
    files = [files[k] for k in (3, 0, 4, 2, 1)]
    series = only(read_uploads([("x.dcm", f) for f in files]))
    assert series.geometry.ordered_by == "instance number" and series.geometry.positions is None
    assert [marker_of(series.hu(i)) for i in range(5)] == pytest.approx([100, 110, 120, 130, 140])
    assert any("InstanceNumber" in w and "no slice positions" in w for w in series.warnings)


def test_two_series_in_one_zip_are_listed_and_the_axial_ct_is_chosen() -> None:
    axial = ct_slices(10, series_uid="1.2.3.4.1", number=2, description="HEAD 5mm")
    coronal = ct_slices(20, iop=CORONAL, series_uid="1.2.3.4.2", number=3, description="COR MPR",
                        extra={"ImageType": ["DERIVED", "SECONDARY", "REFORMATTED"]})
    study = read_study(zipped(axial + coronal), "two.zip")
    assert [len(s) for s in study.series] == [10, 20]
    rows = study.listing()
    assert [(r["index"], r["number"], r["plane"], r["slices"], r["thickness_mm"]) for r in rows] == [
        (0, 2, "axial", 10, 5.0), (1, 3, "coronal", 20, 5.0)]
    assert all("1.2.3.4" not in str(row) for row in rows)  # no UIDs in what the page lists
    choice = study.choose(get_task("head_ct"))
    assert choice.series is study.series[0] and choice.index == 0 and choice.suited
    assert "axial" in choice.reason and "Series 2" in choice.reason
    assert study.get("1.2.3.4.2") is study.series[1]
    with pytest.raises(ValueError, match="unknown series .* one of 1.2.3.4.1, 1.2.3.4.2"):
        study.get("nope")
    # the coronal series: ordered along its own normal (posterior), usable when the reader picks it
    coronal_series = study.series[1]
    assert coronal_series.geometry.ordered_by == "position" and coronal_series.scan(0).info["orientation"] == "coronal"


def test_choice_prefers_original_then_complete_then_longest() -> None:
    derived = ct_slices(30, series_uid="9.1", number=5, extra={"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]})
    original = ct_slices(12, series_uid="9.2", number=6)
    study = read_uploads([("", f) for f in derived + original])
    choice = study.choose(get_task("head_ct"))
    assert choice.series.key == "9.2" and "original" in choice.reason
    short = ct_slices(8, series_uid="9.3", number=7)
    longer = ct_slices(14, series_uid="9.4", number=8)
    choice = read_uploads([("", f) for f in short + longer]).choose(get_task("ct_covid"))
    assert choice.series.key == "9.4" and "most slices" in choice.reason


def test_choice_says_when_no_series_fits_the_model() -> None:
    mr = ct_slices(6, modality="MR", extra={"BodyPartExamined": "BRAIN"})
    choice = read_uploads([("", f) for f in mr]).choose(get_task("head_ct"))
    assert choice.series is not None and not choice.suited
    assert "no series has the model's modality (CT)" in choice.reason


def test_several_studies_and_modalities_are_reported() -> None:
    ct = ct_slices(4, study_uid="1.1", series_uid="1.1.1")
    mr = ct_slices(4, study_uid="2.2", series_uid="2.2.1", modality="MR")
    study = read_uploads([("", f) for f in ct + mr])
    assert len(study.series) == 2
    assert any("2 studies" in w for w in study.warnings)
    assert any("several modalities (CT, MR)" in w for w in study.warnings)


# ---------------------------------------------------------------- left out and reported


def test_scouts_and_other_orientations_are_left_out_with_reasons() -> None:
    files = ct_slices(8)
    scout = make_dicom((phantom(96, 128, 0) + 1024).astype(np.int16), extra={
        "StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.4.1", "InstanceNumber": 1,
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "ImageOrientationPatient": list(CORONAL),
        "ImagePositionPatient": [-250, 0, 200]})
    lateral = make_dicom((phantom(64, 64, 0) + 1024).astype(np.int16), extra={
        "StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.4.1", "InstanceNumber": 2,
        "ImageOrientationPatient": list(SAGITTAL), "ImagePositionPatient": [0, -250, 200]})
    small = ct_slices(1, rows=32, columns=32, start=(0, 0, 500))
    series = only(read_study(zipped(files + [scout, lateral] + small), "scouts.zip"))
    assert len(series) == 8
    assert reasons(series) == {"localizer (scout) image": 1, "another orientation (sagittal)": 1,
                               "another matrix size (32 x 32)": 1}
    assert series.left_out_count == 3 and series.summary()["left_out"] == 3


def test_a_scout_only_series_is_refused_with_the_reason() -> None:
    scouts = ct_slices(2, series_uid="7.7", extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    study = read_uploads([("", f) for f in ct_slices(5) + scouts])
    refused = study.get("7.7")
    assert refused.refused and "localizer" in refused.refused and len(refused) == 0
    assert study.usable == (study.get("1.2.3.4.1"),)
    assert study.choose(get_task("head_ct")).series.key == "1.2.3.4.1"
    with pytest.raises(StudyError, match="localizer"):
        refused.scan(0)


def test_a_missing_slice_is_reported_as_a_gap() -> None:
    files = ct_slices(10)
    del files[4]
    series = only(read_study(zipped(files), "gap.zip"))
    assert len(series) == 9
    gaps = series.geometry.gaps
    assert len(gaps) == 1 and gaps[0].after == 3 and gaps[0].distance == pytest.approx(10.0) and gaps[0].missing == 1
    assert any(w.startswith("Missing slices: 1 gap") and "after slice 4" in w for w in series.warnings)


def test_duplicated_positions_are_left_out_and_reported() -> None:
    files = ct_slices(6)
    again = ct_slices(6, extra={"SOPInstanceUID": None})[2:4]  # same positions, new instances
    series = only(read_uploads([("", f) for f in files + again]))
    assert len(series) == 6 and series.geometry.duplicates == 2
    assert reasons(series) == {"duplicate position (another image lies at the same place)": 2}
    assert any("repeat the position" in w for w in series.warnings)


def test_gantry_tilt_is_measured_and_reported() -> None:
    angle = np.radians(15.0)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle)))
    files = ct_slices(8, iop=tilted, step=(0.0, 0.0, 5.0), extra={"GantryDetectorTilt": 15.0})
    series = only(read_study(zipped(files), "tilt.zip"))
    assert series.geometry.plane == "axial" and len(series) == 8
    assert series.geometry.tilt == pytest.approx(15.0, abs=0.01)
    assert [marker_of(series.hu(i)) for i in range(8)] == pytest.approx([100 + 10 * k for k in range(8)])
    assert any(w.startswith("Gantry tilt") and "15.0 degrees" in w for w in series.warnings)
    # along the normal the step is 5 cos 15 mm
    assert series.geometry.spacing == pytest.approx(5.0 * np.cos(angle), rel=1e-4)


def test_gantry_tilt_from_the_tag_alone_is_reported() -> None:
    series = only(read_uploads([("", f) for f in ct_slices(4, extra={"GantryDetectorTilt": -12.0})]))
    assert series.geometry.tilt == pytest.approx(0.0, abs=1e-6)
    assert "The DICOM says the gantry was tilted by 12.0 degrees." in series.warnings


def test_a_few_images_without_position_are_left_out() -> None:
    files = ct_slices(6) + ct_slices(1, extra={"ImagePositionPatient": None, "InstanceNumber": 99})
    series = only(read_uploads([("", f) for f in files]))
    assert len(series) == 6 and series.geometry.ordered_by == "position"
    assert reasons(series) == {"no slice position (ImagePositionPatient missing)": 1}


def test_mixed_modalities_in_a_series_are_reported_and_left_out() -> None:
    files = ct_slices(6) + ct_slices(1, modality="MR", start=(0, 0, 200))
    series = only(read_uploads([("", f) for f in files]))
    assert series.modality == "CT" and len(series) == 6
    assert reasons(series) == {"modality MR in a CT series": 1}
    assert any("Mixed modalities" in w for w in series.warnings)


def test_inconsistent_pixel_spacing_and_thickness_are_reported() -> None:
    files = ct_slices(4) + ct_slices(2, start=(-100, -120, 60), extra={"PixelSpacing": [0.7, 0.7], "SliceThickness": 2.5})
    series = only(read_uploads([("", f) for f in files]))
    assert len(series) == 6
    assert any(w.startswith("Pixel spacing differs") for w in series.warnings)
    assert any(w.startswith("Slice thickness differs") for w in series.warnings)
    assert series.geometry.pixel_spacing == (0.5, 0.5) and series.geometry.thickness == 5.0


def test_burned_in_annotation_refuses_the_series_and_keeps_no_pixels() -> None:
    files = ct_slices(5)
    files[2] = ct_slices(5, extra={"BurnedInAnnotation": "YES"})[2]
    study = read_study(zipped(files), "burned.zip")
    series = only(study)
    assert series.refused == BURNED_IN_REASON and len(series) == 0 and series.nbytes == 0
    assert study.usable == ()
    choice = study.choose(get_task("head_ct"))
    assert choice.series is None and "burned-in" in choice.reason
    with pytest.raises(StudyError, match="burned-in"):
        series.scan(0)


def test_non_square_matrix() -> None:
    series = only(read_study(zipped(ct_slices(5, rows=48, columns=80)), "wide.zip"))
    scan = series.scan(2)
    assert scan.shape == (48, 80) and series.hu(2).shape == (48, 80) and series.window_8bit(2, BRAIN_WINDOW).shape == (48, 80)
    assert series.geometry.rows == 48 and series.geometry.columns == 80 and series.summary()["matrix"] == "80 x 48"


# ---------------------------------------------------------------- multi-frame


def test_legacy_multi_frame_is_read_in_frame_order() -> None:
    frames = np.stack([(phantom(40, 40, 100 + 10 * k) + 1024).astype(np.int16) for k in range(5)])
    data = make_dicom(frames, extra={"SeriesInstanceUID": "5.5", "ImageOrientationPatient": list(AXIAL)})
    series = only(read_study(data, "multi.dcm"))
    assert len(series) == 5 and series.geometry.ordered_by == "frame order"
    assert [marker_of(series.hu(i)) for i in range(5)] == pytest.approx([100, 110, 120, 130, 140])
    assert series.scan(3).info["frame"] == 4 and series.scan(3).info["frames"] == 5


def enhanced_ct(order: list[int], slope: float = 2.0, intercept: float = -1024.0) -> bytes:
    """An enhanced CT: frame f shows slice order[f]; positions, orientation and rescale live only
    in the functional groups (shared: orientation, spacing, rescale; per frame: position)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item(**tags) -> Dataset:
        ds = Dataset()
        for key, value in tags.items():
            setattr(ds, key, value)
        return ds

    stored = np.stack([((phantom(40, 40, 100 + 10 * k) - intercept) / slope).astype(np.int16) for k in order])
    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=list(AXIAL))]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.6, 0.6], SliceThickness=2.0)]),
                  PixelValueTransformationSequence=Sequence([item(RescaleSlope=slope, RescaleIntercept=intercept)]))
    per_frame = [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0.0, 0.0, 2.0 * k])]))
                 for k in order]
    return make_dicom(stored, slope=None, extra={
        "SeriesInstanceUID": "6.6", "SharedFunctionalGroupsSequence": Sequence([shared]),
        "PerFrameFunctionalGroupsSequence": Sequence(per_frame)})


def test_enhanced_multi_frame_uses_its_functional_groups() -> None:
    series = only(read_study(enhanced_ct([3, 0, 4, 1, 2]), "enhanced.dcm"))
    assert len(series) == 5 and series.geometry.ordered_by == "position"
    assert series.geometry.spacing == pytest.approx(2.0) and series.geometry.pixel_spacing == (0.6, 0.6)
    # rescale from the shared functional groups: HU, not the raw stored values
    assert [marker_of(series.hu(i)) for i in range(5)] == pytest.approx([100, 110, 120, 130, 140])
    assert np.nanmin(series.hu(0)) == pytest.approx(-1000.0)
    assert series.scan(0).info["PixelSpacing"] == [0.6, 0.6] and series.scan(0).info["orientation"] == "axial"


# ---------------------------------------------------------------- NIfTI


def nifti_volume(affine: np.ndarray | None = None, compressed: bool = False, version: int = 1) -> bytes:
    """A (40, 48, 12) int16 CT volume in RAS+ voxel order (x: to the right, y: anterior, z: superior):
    values are HU + 1024 with scl_slope 1, scl_inter -1024; markers on the patient's right
    (x high), anterior (y high) side, and a slice marker 100 + 10 z."""
    import nibabel as nib

    hu = np.full((40, 48, 12), -1000.0)
    hu[5:35, 5:43, :] = 35.0
    hu[30:35, 20:28, :] = 500.0  # patient's right
    hu[15:25, 38:43, :] = 300.0  # anterior
    for z in range(12):
        hu[18:22, 20:24, z] = 100 + 10 * z
    affine = np.diag([0.8, 0.7, 3.0, 1.0]) if affine is None else affine
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = cls((hu + 1024).astype(np.int16), affine)
    image.header.set_slope_inter(1.0, -1024.0)
    data = image.to_bytes()
    return gzip.compress(data) if compressed else data


@pytest.mark.parametrize("compressed,name,version", [(False, "ct.nii", 1), (True, "ct.nii.gz", 1), (False, "ct2.nii", 2)])
def test_nifti_axial_in_dicom_display_convention(compressed: bool, name: str, version: int) -> None:
    series = only(read_study(nifti_volume(compressed=compressed, version=version), name, modality="CT"))
    assert series.source == "nifti" and series.modality == "CT" and len(series) == 12
    geometry = series.geometry
    assert geometry.plane == "axial" and geometry.ordered_by == "volume axis"
    assert geometry.spacing == pytest.approx(3.0) and geometry.pixel_spacing == pytest.approx((0.7, 0.8))
    # inferior -> superior
    values = [series.hu(i) for i in range(12)]
    assert [float(np.nanmean(v[48 - 24:48 - 20, 40 - 22:40 - 18])) for v in values] == pytest.approx(
        [100 + 10 * z for z in range(12)])
    first = values[0]
    assert first.shape == (48, 40)  # rows: anterior -> posterior, columns: patient's right -> left
    assert float(np.nanmean(first[21:27, 6:9])) == pytest.approx(500.0)  # patient's right on the image's left
    assert float(np.nanmean(first[6:9, 16:24])) == pytest.approx(300.0)  # anterior at the top
    scan = series.scan(0)
    assert scan.kind == "nifti" and scan.modality == "CT" and scan.window == CT_WINDOW_PRESETS["Lung"]
    assert scan.info["orientation"] == "axial" and scan.info["format"] == f"NIfTI-{version}"
    assert series.nbytes == 40 * 48 * 12 * 2  # the stored int16, nothing more


def test_nifti_orientation_is_undone_whatever_the_voxel_order() -> None:
    """The same anatomy stored LPS (x and y flipped): the same slices come out."""
    ras = only(read_study(nifti_volume(), "a.nii", modality="CT"))
    import nibabel as nib

    volume = nib.Nifti1Image.from_bytes(nifti_volume())
    data = np.asanyarray(volume.dataobj.get_unscaled())[::-1, ::-1, :]
    affine = np.diag([-0.8, -0.7, 3.0, 1.0])
    affine[:3, 3] = [0.8 * 39, 0.7 * 47, 0]
    lps = nib.Nifti1Image(data, affine)
    lps.header.set_slope_inter(1.0, -1024.0)
    other = only(read_study(lps.to_bytes(), "b.nii", modality="CT"))
    for i in (0, 5, 11):
        np.testing.assert_array_equal(ras.window_8bit(i, BRAIN_WINDOW), other.window_8bit(i, BRAIN_WINDOW))


def test_nifti_without_modality_uses_its_own_range() -> None:
    series = only(read_study(nifti_volume(), "x.nii"))
    scan = series.scan(4)
    assert series.modality is None and scan.modality is None
    assert any("percentile" in step for step in scan.steps)


def test_nifti_gzip_inflation_is_bounded() -> None:
    """Only the bytes the header declares are inflated: 50 MB of trailing data never are, and a
    header declaring a huge volume is refused before anything is inflated."""
    import tracemalloc

    import nibabel as nib

    small = nib.Nifti1Image(np.zeros((8, 8, 2), dtype=np.int16) + 5, np.eye(4)).to_bytes()
    bomb = gzip.compress(small + bytes(50 * 2**20))
    assert len(bomb) < 200_000
    tracemalloc.start()
    series = only(read_study(bomb, "bomb.nii.gz"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(series) == 2 and peak < 2 * 2**20
    huge = nib.Nifti1Image(np.zeros((8, 8, 2), dtype=np.int16), np.eye(4))
    huge.header.set_data_shape((4000, 4000, 4000))
    with pytest.raises(StudyError, match="million pixels"):
        read_study(gzip.compress(huge.header.binaryblock + bytes(4)), "huge.nii.gz")


def test_nifti_4d_reads_its_first_volume_and_says_so() -> None:
    import nibabel as nib

    volume = np.zeros((16, 16, 3, 4), dtype=np.int16)
    for t in range(4):
        volume[4:12, 4:12, :, t] = 100 * (t + 1)
    series = only(read_study(nib.Nifti1Image(volume, np.eye(4)).to_bytes(), "fmri.nii"))
    assert len(series) == 3 and float(np.nanmax(series.hu(1))) == 100.0
    assert reasons(series) == {"further volume of a 4-D NIfTI (only the first is used)": 3}
    assert any("4 volumes" in w for w in series.warnings)


def test_nifti_without_orientation_says_so() -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.arange(16 * 16 * 3, dtype=np.int16).reshape(16, 16, 3), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    series = only(read_study(image.to_bytes(), "plain.nii"))
    assert series.geometry.plane is None and len(series) == 3
    assert any("records no orientation" in w for w in series.warnings)


def test_nifti_pair_header_and_damaged_volume_are_explained() -> None:
    data = bytearray(nifti_volume())
    data[344:348] = b"ni1\x00"
    with pytest.raises(StudyError, match=r"\.hdr/\.img pair"):
        read_study(bytes(data), "pair.hdr")
    with pytest.raises(StudyError, match="truncated NIfTI"):
        read_study(nifti_volume()[:2000], "cut.nii")


# ---------------------------------------------------------------- the single-image path, unchanged


def test_each_slice_is_the_scan_read_scan_gives_for_that_file() -> None:
    files = ct_slices(4, extra={"PixelPaddingValue": 0})
    series = only(read_uploads([("", f) for f in files]))
    for i, data in enumerate(files):
        expected = read_scan(data, "slice.dcm")
        scan = series.scan(i)
        assert isinstance(scan, Scan) and scan.kind == "dicom" and scan.modality == "CT"
        np.testing.assert_allclose(scan.values, expected.values, atol=1e-4, equal_nan=True)
        np.testing.assert_allclose(scan.pixels, expected.pixels, atol=1e-6)
        assert scan.window == expected.window and scan.steps[1:] == expected.steps
        assert {k: v for k, v in scan.info.items() if k in expected.info} == expected.info
        assert scan.info["slice"] == i + 1 and scan.info["slices"] == 4


def test_model_window_8bit_is_what_preprocessing_gives_the_model() -> None:
    series = only(read_study(zipped(ct_slices(5)), "s.zip"))
    for key in ("head_ct", "ct_cancer", "ct_covid"):
        spec = get_task(key)
        for i in range(5):
            eight = series.window_8bit(i, spec.ct_window)
            assert eight.dtype == np.uint8
            expected = np.round(window_values(series.hu(i), *spec.ct_window) * 255).astype(np.uint8)
            np.testing.assert_array_equal(eight, expected)
            np.testing.assert_array_equal(eight, eight_bit(series.scan(i), spec))
    assert sum(1 for _ in series.windowed(BRAIN_WINDOW)) == 5


def test_only_stored_int16_values_are_held() -> None:
    series = only(read_study(zipped(ct_slices(6, rows=64, columns=48)), "s.zip"))
    assert series.nbytes == 6 * 64 * 48 * 2
    assert {s.stored.dtype for s in series._slices} == {np.dtype(np.int16)}


def test_slice_index_is_checked() -> None:
    series = only(read_study(zipped(ct_slices(3)), "s.zip"))
    with pytest.raises(IndexError, match="the series has 3 slices"):
        series.scan(3)
    with pytest.raises(ValueError, match="width must be positive"):
        series.window_8bit(0, (40.0, 0.0))


# ---------------------------------------------------------------- files, limits, privacy


def test_other_files_in_the_zip_are_counted_with_reasons() -> None:
    inner = zipped(ct_slices(1), shuffle=False)
    extra = {"README.txt": b"hello", "__MACOSX/._IM1": b"\x00" * 10, "nested.zip": inner, "DICOMDIR": make_dicom(
        np.zeros((8, 8), np.int16), with_pixels=False)}
    study = read_study(zipped(ct_slices(4), extra=extra), "s.zip")
    assert len(only(study)) == 4
    assert reasons(study) == {"not a DICOM or NIfTI file": 1, "macOS metadata file": 1,
                              "an archive inside the archive (not opened)": 1,
                              "DICOM file without an image (a report or structured data)": 1}


def test_nothing_usable_is_a_clear_error() -> None:
    with pytest.raises(StudyError, match=r"No DICOM series or NIfTI volume was found \(2 not a DICOM or NIfTI file\)"):
        read_study(zipped([b"abc", b"def"]), "junk.zip")
    with pytest.raises(StudyError, match="damaged or not a ZIP"):
        read_study(b"PK\x03\x04" + bytes(100), "bad.zip")
    with pytest.raises(StudyError):
        read_study(b"", "empty.zip")


def test_limits_are_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    files = ct_slices(6)
    monkeypatch.setattr(series_module, "MAX_STUDY_PIXELS", 64 * 64 * 5)
    with pytest.raises(StudyError, match="million pixels"):
        read_study(zipped(files), "big.zip")
    monkeypatch.setattr(series_module, "MAX_STUDY_PIXELS", 10**9)
    monkeypatch.setattr(series_module, "MAX_MEMBERS", 5)
    with pytest.raises(StudyError, match="at most 5 are accepted"):
        read_study(zipped(files), "many.zip")
    monkeypatch.setattr(series_module, "MAX_MEMBERS", 100)
    monkeypatch.setattr(series_module, "MAX_STUDY_BYTES", 3 * len(files[0]))
    with pytest.raises(StudyError, match="unpacks to"):
        read_study(zipped(files), "large.zip")


def test_an_oversized_image_is_left_out_undecoded() -> None:
    header_only = make_dicom(np.zeros((8, 8), np.int16), extra={"Rows": 8000, "Columns": 8000})
    study = read_uploads([("", f) for f in ct_slices(3)] + [("big.dcm", header_only)])
    assert len(only(study)) == 3
    assert reasons(study) == {"image over 40 million pixels (not decoded)": 1}


def test_study_error_is_a_scan_error() -> None:
    assert issubclass(StudyError, ScanError)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the over-long description on writing
def test_no_identifying_tag_reaches_the_result(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="core.series")
    files = ct_slices(3, description="HEAD\x00\x1b[31m 5mm\nline two" + "x" * 200,
                      extra={"InstitutionName": "General Hospital", "PatientBirthDate": "19700101"})
    study = read_uploads([("Doe_Jane_0042.dcm", f) for f in files])
    series = only(study)
    assert series.description.startswith("HEAD [31m 5mm line two") and len(series.description) == 64
    shown = (repr(study) + str(study.listing()) + str(series.scan(0).info) + str(series.scan(0).steps)
             + str(series.warnings) + caplog.text)
    assert "study read: 1 series" in caplog.text
    for secret in ("Secret", "ID-12345", "General Hospital", "19700101", "Doe_Jane", "1.2.3.4"):
        assert secret not in shown


def test_a_folder_and_a_zip_path_read_the_same(tmp_path: Path) -> None:
    files = ct_slices(5)
    folder = tmp_path / "study"
    for k, data in enumerate(files):
        (folder / f"sub{k % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{k % 2}" / f"{k}").write_bytes(data)
    (tmp_path / "study.zip").write_bytes(zipped(files))
    from_folder = only(read_path(folder))
    from_zip = only(read_path(tmp_path / "study.zip"))
    assert len(from_folder) == len(from_zip) == 5
    for i in range(5):
        np.testing.assert_array_equal(from_folder.window_8bit(i, BRAIN_WINDOW), from_zip.window_8bit(i, BRAIN_WINDOW))
    with pytest.raises(StudyError, match="neither a file nor a folder"):
        read_path(tmp_path / "absent")


def test_members_interface_takes_an_archive_readers_skips() -> None:
    skipped: list[str] = []

    def members():
        for k, data in enumerate(ct_slices(3)):
            yield f"m{k}", data
        skipped.append("hidden file")  # filled while iterating, read afterwards

    study = read_members(members(), skipped=skipped)
    assert len(only(study)) == 3 and reasons(study) == {"hidden file": 1}


# ---------------------------------------------------------------- real data, where present


def test_head_ct_patient_rebuilt_as_a_series_windows_back_to_its_pixels() -> None:
    """One patient's brain-window slices (W 80 / L 40) as CT DICOM in HU, shuffled in a ZIP: the
    series comes back in slice order and the brain window gives back every original pixel."""
    from PIL import Image

    folder = data_folder("head_ct")
    with open(folder / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle)]
    patient = sorted({row["patient"] for row in rows})[0]
    rows = sorted((row for row in rows if row["patient"] == patient), key=lambda row: int(row["slice"]))
    center, width = BRAIN_WINDOW
    originals, files = [], []
    for k, row in enumerate(rows):
        grey = np.asarray(Image.open(folder / row["path"]).convert("L"))
        hu = center - width / 2 + grey.astype(np.float64) / 255.0 * width
        stored = np.round((hu + 1024.0) * 10.0).astype(np.int16)  # slope 0.1: finer than one grey level
        originals.append(grey)
        files.append(make_dicom(stored, slope=0.1, intercept=-1024.0, extra={
            "StudyInstanceUID": "2.25.1", "SeriesInstanceUID": "2.25.1.1", "SeriesNumber": 3,
            "InstanceNumber": int(row["slice"]), "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "ImageOrientationPatient": list(AXIAL), "ImagePositionPatient": [0.0, 0.0, 5.0 * int(row["slice"])],
            "PixelSpacing": [0.45, 0.45], "SliceThickness": 5.0, "BodyPartExamined": "HEAD"}))
    scout = make_dicom(np.zeros((64, 96), np.int16), extra={
        "StudyInstanceUID": "2.25.1", "SeriesInstanceUID": "2.25.1.1", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    study = read_study(zipped(files + [scout], seed=7), "patient.zip")
    spec = get_task("head_ct")
    choice = study.choose(spec)
    series = choice.series
    assert choice.suited and len(series) == len(rows) and reasons(series) == {"localizer (scout) image": 1}
    assert series.geometry.gaps == () and series.geometry.spacing == pytest.approx(5.0)
    for i, grey in enumerate(originals):
        np.testing.assert_array_equal(series.window_8bit(i, spec.ct_window), grey)
        np.testing.assert_array_equal(eight_bit(series.scan(i), spec), grey)


def test_real_ct_files_group_into_their_series_and_match_read_scan() -> None:
    folder = data_folder("dicom_ct")
    paths = sorted(folder.glob("*.dcm"))
    study = read_uploads([(p.name, p.read_bytes()) for p in paths])
    assert len(study.series) == len(paths)
    planes = sorted(s.geometry.plane for s in study.series)
    assert planes == sorted(p.name.split("_")[1] for p in paths)
    for path in paths:
        expected = read_scan(path.read_bytes(), path.name)
        matches = [s for s in study.series if s.scan(0).info.get("Rows") == expected.info.get("Rows")
                   and np.allclose(s.hu(0), expected.values, atol=1e-3, equal_nan=True)]
        assert len(matches) == 1
        np.testing.assert_allclose(matches[0].scan(0).pixels, expected.pixels, atol=1e-6)


def test_study_benchmark_prints_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark runs (tiny) and prints every figure; its timings are not asserted here."""
    import json

    from benchmarks.study import main

    assert main(["--slices", "6", "--size", "64", "--rounds", "1", "--no-model"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["slices_used"] == 6 and figures["left_out"] == 1  # the scout
    assert set(figures["p50_s"]) == {"read_s", "window_s", "zip_to_8bit_s", "scan_preprocess_s"}
    assert figures["held_mb"] == pytest.approx(6 * 64 * 64 * 2 / 2**20, abs=0.05)
