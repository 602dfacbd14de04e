"""Studies through the slice model (core.study), the study call's calibration (core.lab.study), the command
lines (core.predict --study, core.evaluate --by patient), the study report and the batch rows per series.

Synthetic series are made here with pydicom and nibabel (a head phantom the guard accepts); a series
rebuilt from one real head CT patient runs where ../shared/data is present.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from benchmarks.study import head_phantom, series_files, zip_files
from core.cards import read_card
from core.guard import GuardVerdict
from core.models import WEIGHTS_DIR
from core.pipeline import Refusal, analyse
from core.report import render_study_pdf
from core.series import StudyError
from core.study import (
    AGGREGATIONS,
    ROW_FIELDS,
    StudyAnalysis,
    StudyRule,
    aggregate,
    analyse_series,
    call_study,
    is_study,
    read_study_path,
    read_upload,
    series_label,
    study_guard,
    study_report_content,
    study_row,
    study_rows,
    study_rule,
)
from core.tasks import get_task
from tests.conftest import data_folder, encode, make_dicom, synthetic_slice
from tests.dicom_study import bundled_model
from tests.test_workflow import pdf_text

HEAD = get_task("head_ct")


@pytest.fixture(scope="module")
def head_ct():
    return bundled_model("head_ct")


def retag(files: list[bytes], change) -> list[bytes]:
    """The files with `change(dataset, k)` applied to the k-th one."""
    out = []
    for k, data in enumerate(files):
        ds = dcmread(io.BytesIO(data))
        change(ds, k)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def mr_series(n: int = 4, size: int = 64) -> list[bytes]:
    """An MR series in the same study as `series_files`: another modality."""
    rng = np.random.default_rng(3)
    return [make_dicom(np.clip(head_phantom(size, k, n, rng) + 1024, 0, 4000).astype(np.int16), modality="MR",
                       slope=None, intercept=None, extra={
                           "StudyInstanceUID": "2.25.10", "SeriesInstanceUID": "2.25.10.9", "SeriesNumber": 7,
                           "InstanceNumber": k + 1, "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                           "ImagePositionPatient": [0.0, 0.0, 5.0 * k], "SeriesDescription": "T2 **bold** [x](http://x)"})
            for k in range(n)]


def enhanced_head_ct(n: int = 6, size: int = 64) -> bytes:
    """One enhanced multi-frame CT of the head phantom; frames stored in reverse order, positions in the groups."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item(**tags) -> Dataset:
        ds = Dataset()
        for key, value in tags.items():
            setattr(ds, key, value)
        return ds

    rng = np.random.default_rng(5)
    order = list(range(n))[::-1]
    stored = np.stack([np.round(head_phantom(size, k, n, rng) + 1024).astype(np.int16) for k in order])
    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.9, 0.9], SliceThickness=3.0)]),
                  PixelValueTransformationSequence=Sequence([item(RescaleSlope=1.0, RescaleIntercept=-1024.0)]))
    per_frame = [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0.0, 0.0, 3.0 * k])])) for k in order]
    return make_dicom(stored, slope=None, extra={
        "SeriesInstanceUID": "2.25.30", "BodyPartExamined": "HEAD", "SharedFunctionalGroupsSequence": Sequence([shared]),
        "PerFrameFunctionalGroupsSequence": Sequence(per_frame)})


def head_nifti(n: int = 6, size: int = 64) -> bytes:
    """The head phantom as a NIfTI volume (RAS+, HU + 1024 with scl_inter -1024)."""
    import nibabel as nib

    rng = np.random.default_rng(6)
    hu = np.stack([head_phantom(size, k, n, rng) for k in range(n)], axis=-1)  # (rows, columns, slices)
    volume = np.transpose(hu, (1, 0, 2))[::-1, ::-1]  # to x = right, y = anterior, as NIfTI stores it
    image = nib.Nifti1Image(np.round(volume + 1024).astype(np.int16), np.diag([0.9, 0.9, 3.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    return image.to_bytes()


def only_analysis(classifier, files, name: str = "study.zip", **kwargs) -> StudyAnalysis:
    study = read_upload([(name, zip_files(files))] if len(files) > 1 else [(name, files[0])], classifier.spec)
    outcome = analyse_series(classifier, study, digest="0123abcd4567ef89", **kwargs)
    assert isinstance(outcome, StudyAnalysis), outcome
    return outcome


# ---------------------------------------------------------------- aggregations and the study call


def test_aggregations_give_their_definitions() -> None:
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.7])
    assert aggregate(scores, "max") == pytest.approx(0.9)
    assert aggregate(scores, "top_k_mean", {"k": 2}) == pytest.approx(0.85)
    assert aggregate(scores, "top_k_mean", {"k": 50}) == pytest.approx(scores.mean())  # k past n: every slice
    assert aggregate(scores, "smoothed_max", {"window": 3}) == pytest.approx(np.mean([0.9, 0.2, 0.8]))
    assert aggregate(scores, "noisy_or", {"k": 2}) == pytest.approx(1 - 0.1 * 0.2)
    logistic = {"mean": [0, 0, 0, 0], "scale": [1, 1, 1, 1], "weights": [1.0, 0, 0, 0], "bias": 0.0}
    assert aggregate(scores, "logistic", logistic) == pytest.approx(0.9)  # sigmoid(logit(max))
    with pytest.raises(ValueError, match="one of max, top_k_mean"):
        aggregate(scores, "median")
    with pytest.raises(ValueError, match="needs the parameter 'k'"):
        aggregate(scores, "top_k_mean", {})
    with pytest.raises(ValueError, match="at least one slice"):
        aggregate(np.array([]), "max")


def test_study_call_thresholds_the_aggregate_and_marks_key_slices() -> None:
    rule = StudyRule("max", {}, "hemorrhage", "hemorrhage", 0.5, "test rule")
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    findings = np.tile(np.linspace(0.1, 0.6, 6), (4, 1)) * np.array([[1], [0.5], [0.2], [0.1]])
    call = call_study(rule, HEAD, probabilities, findings)
    assert call.score == pytest.approx(0.8) and call.prediction.label == "hemorrhage"
    np.testing.assert_allclose(call.prediction.probabilities, [0.2, 0.8])
    assert call.key_slices == (3, 1, 2) and call.prediction.threshold == 0.5
    assert [f.probability for f in call.prediction.findings] == pytest.approx(findings.max(axis=0))
    below = call_study(StudyRule("max", {}, "hemorrhage", "hemorrhage", 0.85, ""), HEAD, probabilities, findings)
    assert below.prediction.label == "normal" and below.prediction.probabilities[1] == pytest.approx(0.8)


def test_a_group_without_its_absent_class_is_thresholded_together() -> None:
    spec = get_task("brain_mri")  # glioma, meningioma, no_tumor, pituitary
    rule = StudyRule("top_k_mean", {"k": 2}, "glioma+meningioma+pituitary", "tumour", 0.5, "")
    probabilities = np.array([[0.05, 0.05, 0.85, 0.05], [0.6, 0.1, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
    call = call_study(rule, spec, probabilities)
    study = call.prediction
    assert study.probabilities.sum() == pytest.approx(1.0)
    assert study.positive_probability == pytest.approx(np.mean([0.8, 0.7]))  # the two highest group scores
    assert study.label == "glioma" and study.headline()[0] == "tumour"
    no_group = call_study(StudyRule("max", {}, None, None, None, ""), spec, probabilities)
    np.testing.assert_allclose(no_group.prediction.probabilities, probabilities.mean(axis=0))


def test_study_call_refuses_shapes_that_do_not_fit() -> None:
    rule = StudyRule("max", {}, "hemorrhage", "hemorrhage", 0.5, "")
    with pytest.raises(ValueError, match="slice probabilities"):
        call_study(rule, HEAD, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="finding probabilities"):
        call_study(rule, HEAD, np.full((2, 2), 0.5), np.zeros((2, 3)))


def test_the_card_section_is_read_in_one_place_and_checked() -> None:
    card = read_card(WEIGHTS_DIR / "head_ct.json")
    rule = study_rule(card, HEAD)
    assert rule.validated and rule.aggregation == card.study["aggregation"]["name"]
    assert rule.threshold == card.study["threshold"] and "test patients" in rule.note
    bare = copy.deepcopy(card)
    bare.study = {}
    default = study_rule(bare, HEAD)
    assert not default.validated and default.threshold == card.threshold and "not validated" in default.note
    stale = copy.deepcopy(card)
    stale.sha256 = "0" * 64
    assert not study_rule(stale, HEAD).validated and "other weights" in study_rule(stale, HEAD).note
    broken = copy.deepcopy(card)
    broken.study["aggregation"] = {"name": "median", "params": {}}
    with pytest.raises(ValueError, match="one of max"):
        study_rule(broken, HEAD)
    broken.study["aggregation"] = {"name": "max", "params": {}}
    broken.study["threshold"] = 1.5
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        study_rule(broken, HEAD)
    for key in ("ct_cancer", "brain_mri"):
        unvalidated = study_rule(read_card(WEIGHTS_DIR / f"{key}.json"), get_task(key))
        assert not unvalidated.validated and "no patient IDs" in unvalidated.note


def test_the_study_guard_counts_its_slices() -> None:
    inside = GuardVerdict("in_range", None, 0.9, 0.5, 0.6)
    out = GuardVerdict("out_of_range", "outside", 0.2, 0.5, 0.6)
    assert study_guard([inside] * 4).outcome == "in_range"
    edge = study_guard([inside] * 3 + [out])
    assert edge.outcome == "borderline" and "1 of 4 slices" in edge.reason
    assert study_guard([inside] + [out] * 3).refused
    edge_only = GuardVerdict("borderline", "edge", 0.55, 0.5, 0.6)
    assert study_guard([inside] * 3 + [edge_only]).outcome == "in_range"  # one slice at the edge: no warning
    assert study_guard([inside] + [edge_only] * 3).outcome == "borderline"
    tagged = GuardVerdict("out_of_range", "the DICOM file says its modality is MR.")
    assert study_guard([tagged] * 3) is tagged


# ---------------------------------------------------------------- the pipeline on synthetic series


def test_every_slice_is_predicted_as_its_own_upload_would_be(head_ct) -> None:
    files = series_files(10, 96)
    calls: list[tuple[int, int]] = []
    analysis = only_analysis(head_ct, files, progress=lambda done, total: calls.append((done, total)), batch_size=4)
    assert len(analysis) == 10 and {i.reason: i.count for i in analysis.left_out} == {"localizer (scout) image": 1}
    assert calls == [(4, 10), (8, 10), (10, 10)]
    for k, data in enumerate(files[:-1]):  # the files are in anatomical order; the scout is last
        single = analyse(head_ct, data, "slice.dcm")
        np.testing.assert_allclose(analysis.probabilities[k], single.prediction.probabilities, atol=1e-4)
        np.testing.assert_allclose(analysis.finding_probabilities[k], [f.probability for f in single.prediction.findings],
                                   atol=1e-4)
    rule = study_rule(head_ct.card, HEAD)
    expected = aggregate(analysis.probabilities[:, 1], rule.aggregation, rule.params)
    assert analysis.prediction.probabilities[1] == pytest.approx(expected, abs=1e-6)
    assert analysis.prediction.label == ("hemorrhage" if expected >= rule.threshold else "normal")
    assert analysis.key_slices == tuple(np.argsort(-analysis.probabilities[:, 1], kind="stable")[:rule.key_slices])
    assert analysis.chosen and not analysis.prediction.guard.refused


def test_slice_heatmaps_are_cached_per_slice_output_and_method(head_ct) -> None:
    analysis = only_analysis(head_ct, series_files(6, 80))
    key = analysis.key_slices[0]
    first = analysis.heatmap(key)
    assert analysis.heatmap(key) is first and first.target == analysis.explained
    assert analysis.has_heatmap(key, first.target, first.method)
    other = analysis.heatmap(key, "normal", "HiResCAM")
    assert other is not first and analysis.slice_analysis(key).computed("heatmaps") == 2
    assert first.placed.shape == (80, 80) and 0.0 <= first.placed.min() and first.placed.max() <= 1.0
    with pytest.raises(ValueError, match="unknown output"):
        analysis.heatmap(key, "tumour")
    with pytest.raises(IndexError, match="out of range"):
        analysis.slice_analysis(6)
    # the heatmap explains the pixels the model saw: the slice's own model input
    np.testing.assert_array_equal(analysis.slice_input(key).pixels, analysis.slice_analysis(key).input.pixels)


def test_non_square_slices_keep_their_shape_through_the_heatmap(head_ct) -> None:
    files = retag(series_files(4, 96)[:-1], lambda ds, k: _crop_columns(ds, 64))
    analysis = only_analysis(head_ct, files)
    assert analysis.series.geometry.rows == 96 and analysis.series.geometry.columns == 64
    assert analysis.heatmap(0).placed.shape == (96, 64)


def _crop_columns(ds, columns: int) -> None:
    array = ds.pixel_array[:, :columns].copy()
    ds.Columns = columns
    ds.PixelData = array.tobytes()


def test_two_series_in_one_zip_give_one_row_each_the_default_first(head_ct) -> None:
    files = series_files(8, 64) + mr_series()
    rows = study_rows(head_ct, zip_files(files), "two.zip")
    assert [row["status"] for row in rows] == ["ok", "rejected"]
    ct, mr = rows
    assert list(ct) == list(ROW_FIELDS) and ct["file"] == "two.zip" and ct["series"] == "2.25.10.1"
    assert ct["slices"] == 8 and ct["left_out"] == {"count": 1, "reasons": {"localizer (scout) image": 1}}
    assert len(ct["slice_probabilities"]) == 8 and set(ct["slice_probabilities"][0]) == set(HEAD.outputs)
    assert all(0 <= k < 8 for k in ct["key_slices"]) and ct["prediction"] in HEAD.labels
    assert set(ct["probabilities"]) == set(HEAD.labels) and set(ct["findings"]) == set(HEAD.findings)
    assert mr["series"] == "2.25.10.9" and "modality is MR" in mr["reason"] and mr["slices"] == 4
    assert "several modalities" in (ct["reason"] or "")
    json.dumps(rows)  # every value is JSON


def test_missing_slices_and_tilt_are_reported_in_the_row(head_ct) -> None:
    files = series_files(10, 64)[:-1]
    gapped = files[:4] + files[6:]
    row = study_rows(head_ct, zip_files(gapped), "gap.zip")[0]
    assert row["status"] == "ok" and row["slices"] == 8 and "Missing slices" in row["reason"]

    def tilt(ds, k: int) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.4 * z, z]  # the stack shears forward: a tilted gantry

    row = study_rows(head_ct, zip_files(retag(files, tilt)), "tilt.zip")[0]
    assert row["status"] == "ok" and "Gantry tilt" in row["reason"]


def test_a_bad_upload_gives_one_row_and_never_raises(head_ct) -> None:
    rows = study_rows(head_ct, b"PK\x03\x04 not really a zip", "broken.zip")
    assert len(rows) == 1 and rows[0]["status"] == "rejected" and rows[0]["series"] is None
    assert "not a readable ZIP" in rows[0]["reason"]
    rows = study_rows(head_ct, encode(synthetic_slice(64, seed=1)), "photo.png")
    assert rows[0]["status"] == "rejected" and "No DICOM series" in rows[0]["reason"]
    burned = retag(series_files(3, 48)[:-1], lambda ds, k: setattr(ds, "BurnedInAnnotation", "YES"))
    rows = study_rows(head_ct, zip_files(burned), "burned.zip")
    assert rows[0]["status"] == "rejected" and "burned-in" in rows[0]["reason"]


def test_detail_rows_add_the_call_and_name_no_uid(head_ct) -> None:
    row = study_rows(head_ct, zip_files(series_files(5, 64)), "s.zip", detail=True, safe_series=True)[0]
    assert row["series"] == "Series 2 (axial, 5 slices, 2.5 mm)" and "2.25" not in json.dumps(row["series"])
    assert row["call"] in (*HEAD.labels, "uncertain") and row["validated"] is True
    # a synthetic phantom: the guard may find it borderline, never out of range (then there would be no call)
    assert row["guard"]["outcome"] in ("in_range", "borderline") and isinstance(row["present"], list)


def test_uploads_are_recognised_as_studies() -> None:
    files = series_files(3, 48)
    assert is_study(zip_files(files), "x.zip") and is_study(enhanced_head_ct(3, 32), "x.dcm")
    assert is_study(head_nifti(3, 32), "x.nii")
    assert not is_study(files[0], "x.dcm") and not is_study(encode(synthetic_slice(64, seed=1)), "x.png")


def test_multi_frame_and_nifti_are_studies_too(head_ct) -> None:
    multi = only_analysis(head_ct, [enhanced_head_ct()], "enhanced.dcm")
    assert len(multi) == 6 and multi.series.geometry.ordered_by == "position"
    volume = only_analysis(head_ct, [head_nifti()], "head.nii")
    assert len(volume) == 6 and volume.series.modality == "CT"  # the model's modality: values are HU
    np.testing.assert_allclose(volume.probabilities, volume.probabilities.clip(0, 1))


def test_zip_members_go_through_the_archive_budget(head_ct) -> None:
    files = series_files(3, 48)
    data = zip_files(files)
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        with zipfile.ZipFile(io.BytesIO(data)) as source:
            for info in source.infolist():
                archive.writestr(info.filename, source.read(info))
        archive.writestr("../escape.dcm", files[0])
        archive.writestr("nested.zip", data)
        archive.writestr(".hidden", b"x")
    study = read_upload([("odd.zip", buffer.getvalue())], HEAD)
    reasons = {item.reason: item.count for item in study.left_out}
    assert any("unsafe path" in r for r in reasons) and any("archive inside" in r for r in reasons)
    assert any("hidden" in r for r in reasons) and len(study.choose(HEAD).series) == 3


# ---------------------------------------------------------------- command lines


def test_predict_study_prints_one_line_per_series_for_every_kind_of_path(head_ct, tmp_path: Path, capsys) -> None:
    from core.predict import main

    files = series_files(6, 64)
    (tmp_path / "study.zip").write_bytes(zip_files(files + mr_series()))
    folder = tmp_path / "folder" / "deep"
    folder.mkdir(parents=True)
    for k, data in enumerate(files):
        (folder / f"IM{k}").write_bytes(data)
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    (tmp_path / "enhanced.dcm").write_bytes(enhanced_head_ct())
    (tmp_path / "head.nii").write_bytes(head_nifti())
    (tmp_path / "bad.dcm").write_bytes(b"garbage" * 50)
    paths = [tmp_path / "study.zip", tmp_path / "folder", tmp_path / "enhanced.dcm", tmp_path / "head.nii",
             tmp_path / "bad.dcm", tmp_path / "missing.zip"]
    assert main(["--task", "head_ct", "--study", *map(str, paths)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(Path(r["file"]).name, r["status"]) for r in rows] == [
        ("study.zip", "ok"), ("study.zip", "rejected"), ("folder", "ok"), ("enhanced.dcm", "ok"), ("head.nii", "ok"),
        ("bad.dcm", "rejected"), ("missing.zip", "rejected")]
    assert [r["slices"] for r in rows] == [6, 4, 6, 6, 6, 0, 0]
    assert rows[0]["file"] == str(paths[0]) and all(list(r) == list(ROW_FIELDS) for r in rows if r["status"] == "ok")
    assert rows[2]["left_out"]["reasons"] == {"localizer (scout) image": 1, "not a DICOM or NIfTI file": 1}
    assert rows[4]["series"] == "volume-1" and rows[6]["reason"] == "The path is neither a file nor a folder."
    # the same series, whichever way it came: ZIP and folder agree
    assert rows[0]["slice_probabilities"] == rows[2]["slice_probabilities"]


def test_predict_study_command_line_errors_exit_2(capsys) -> None:
    from core.predict import main

    for argv in (["--task", "head_ct"], ["--task", "head_ct", "a.png", "--study", "b.zip"],
                 ["--task", "nope", "--study", "b.zip"]):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2


def _patient_folder(root: Path) -> Path:
    """A labelled folder of 4 patients x 3 slices (synthetic PNGs) with head_ct's finding columns."""
    root.mkdir()
    columns = ["path", "label", "patient", "slice", *HEAD.findings]
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for p in range(4):
            for s in range(3):
                name = f"p{p}_{s}.png"
                (root / name).write_bytes(encode(synthetic_slice(96, seed=10 * p + s)))
                bleed = p < 2 and s == 1
                writer.writerow([name, "hemorrhage" if bleed else "normal", f"P{p}", 3 - s,
                                 *(["1" if bleed and f == "edh" else "0" for f in HEAD.findings])])
    return root


def test_evaluate_by_patient_scores_the_apps_study_call(head_ct, tmp_path: Path, capsys) -> None:
    from core.lab.data import read_records
    from core.lab.evaluate import main, score_records
    from core.lab.patients import group_patients

    folder = _patient_folder(tmp_path / "patients")
    assert main(["--task", "head_ct", "--data", str(folder), "--by", "patient", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["unit"] == "patient" and metrics["patients"] == 4 and metrics["positives"] == 2
    assert metrics["findings"]["edh"]["positives"] == 2 and metrics["threshold"] == study_rule(head_ct.card, HEAD).threshold
    records = read_records(folder)
    patients = group_patients(records, score_records(head_ct, records), HEAD, "hemorrhage")
    assert [p.key for p in patients] == ["P0", "P1", "P2", "P3"] and [p.positive for p in patients] == [1, 1, 0, 0]
    rule = study_rule(head_ct.card, HEAD)
    called = [call_study(rule, HEAD, p.probabilities, p.finding_probabilities).prediction.called_positive
              for p in patients]
    sensitivity = np.mean(called[:2])
    assert metrics["sensitivity"]["estimate"] == pytest.approx(sensitivity)
    # slices in the manifest's `slice` order, not file order
    np.testing.assert_allclose(patients[0].probabilities[0],
                               score_records(head_ct, [r for r in records if r.rel == "p0_2.png"]).probabilities[0],
                               atol=1e-6)
    assert main(["--task", "head_ct", "--data", str(folder), "--by", "patient"]) == 0
    assert "per patient" in capsys.readouterr().out


def test_evaluate_by_patient_needs_patient_ids(tmp_path: Path, capsys) -> None:
    from core.lab.evaluate import main

    folder = tmp_path / "plain" / "non_covid"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(encode(synthetic_slice(64, seed=1)))
    with pytest.raises(SystemExit) as stopped:
        main(["--task", "ct_covid", "--data", str(tmp_path / "plain"), "--by", "patient"])
    assert stopped.value.code == 2 and "no patient ID" in capsys.readouterr().err


# ---------------------------------------------------------------- calibration pieces


def test_threshold_keeps_the_sensitivity_and_sits_between_scores() -> None:
    from core.lab.study import choose_threshold

    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.2, 0.1])
    truth = np.array([1, 1, 1, 0, 0, 0], bool)
    threshold = choose_threshold(scores, truth)
    assert 0.3 < threshold < 0.4  # every positive kept, halfway (log-odds) to the next lower score
    assert (scores[truth] >= threshold).all()
    with pytest.raises(ValueError, match="no positive"):
        choose_threshold(scores, np.zeros(6, bool))


def test_patient_figures_have_intervals_around_the_estimate() -> None:
    from core.lab.patients import patient_figures

    rng = np.random.default_rng(0)
    truth = np.array([1] * 10 + [0] * 10, bool)
    scores = np.where(truth, rng.uniform(0.4, 1.0, 20), rng.uniform(0.0, 0.6, 20))
    figures = patient_figures(scores, truth, scores >= 0.5, resamples=300)
    assert figures["patients"] == 20 and figures["positives"] == 10
    for name in ("roc_auc", "sensitivity", "specificity"):
        value = figures[name]
        assert value["low"] <= value["estimate"] <= value["high"]
    assert figures["sensitivity"]["count"] == f"{int((scores[truth] >= 0.5).sum())}/10"
    assert figures["specificity"]["exact_low"] < figures["specificity"]["estimate"]
    perfect = patient_figures(np.array([0.9, 0.1]), np.array([1, 0], bool), np.array([1, 0], bool), resamples=50)
    assert perfect["sensitivity"]["exact_low"] < 0.1  # one positive patient shows almost nothing


def test_the_aggregation_is_chosen_on_validation_patients() -> None:
    from core.lab.patients import Patient
    from core.lab.study import choose_aggregation

    def patient(slices: list[float], positive: bool) -> Patient:
        p = np.array(slices)
        return Patient("x", positive, np.zeros(6, bool), np.stack([1 - p, p], axis=1), np.zeros((len(p), 6)))

    # a positive shows one strong slice; a negative several middling ones: only the maximum separates them
    patients = [patient([0.05, 0.95, 0.05, 0.05], True), patient([0.1, 0.9, 0.1, 0.1], True),
                patient([0.6, 0.6, 0.6, 0.6], False), patient([0.55, 0.65, 0.5, 0.6], False)]
    name, params, table = choose_aggregation(HEAD, "hemorrhage", "hemorrhage", patients)
    assert name == "max" and table[0]["validation"]["roc_auc"] == 1.0
    assert {row["name"] for row in table} == set(AGGREGATIONS)


@pytest.mark.slow
def test_the_bundled_study_figures_come_from_the_command(tmp_path: Path) -> None:
    """The command rerun on the bundled weights (a copy) writes the very section the bundled card holds."""
    import shutil

    from core.lab.study import main

    folder = data_folder("head_ct")
    for name in ("head_ct.safetensors", "head_ct.json"):
        shutil.copy(WEIGHTS_DIR / name, tmp_path / name)
    shutil.copytree(WEIGHTS_DIR / "guard", tmp_path / "guard")
    assert main(["--task", "head_ct", "--data", str(folder), "--weights", str(tmp_path / "head_ct.safetensors"),
                 "--write-card"]) == 0
    fresh = read_card(tmp_path / "head_ct.json").study
    bundled = read_card(WEIGHTS_DIR / "head_ct.json").study
    for key in ("aggregation", "threshold", "patients", "validation", "test", "candidates", "findings"):
        assert fresh[key] == bundled[key], key


# ---------------------------------------------------------------- real data


def test_head_ct_patient_as_a_zip_gets_the_labs_study_call(head_ct, tmp_path: Path, capsys) -> None:
    """One real patient's slices rebuilt as CT DICOM (HU from the brain window) with a scout, shuffled in a
    ZIP, through `python -m core.predict --study`: the slice count is right and the call is the one
    `core.evaluate --by patient` makes from the same slices."""
    from PIL import Image

    from core.lab.data import read_records
    from core.lab.evaluate import score_records
    from core.lab.patients import group_patients
    from core.predict import main

    folder = data_folder("head_ct")
    records = read_records(folder)
    patient = next(r.patient for r in records if r.label == "hemorrhage")
    mine = sorted((r for r in records if r.patient == patient), key=lambda r: int(dict(r.columns)["slice"]))
    center, width = HEAD.ct_window
    files = []
    for record in mine:
        grey = np.asarray(Image.open(record.path).convert("L")).astype(np.float64)
        stored = np.round((center - width / 2 + grey / 255.0 * width + 1024.0) * 10.0).astype(np.int16)
        number = int(dict(record.columns)["slice"])
        files.append(make_dicom(stored, slope=0.1, intercept=-1024.0, extra={
            "StudyInstanceUID": "2.25.7", "SeriesInstanceUID": "2.25.7.1", "SeriesNumber": 2, "InstanceNumber": number,
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
            "ImagePositionPatient": [0.0, 0.0, 5.0 * number], "PixelSpacing": [0.45, 0.45], "SliceThickness": 5.0,
            "BodyPartExamined": "HEAD"}))
    files.append(make_dicom(np.zeros((64, 96), np.int16), extra={
        "StudyInstanceUID": "2.25.7", "SeriesInstanceUID": "2.25.7.1", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}))
    path = tmp_path / "patient.zip"
    path.write_bytes(zip_files(files, seed=3))
    assert main(["--task", "head_ct", "--study", str(path)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["status"] == "ok" and row["slices"] == len(mine)
    assert row["left_out"]["reasons"] == {"localizer (scout) image": 1}
    lab = group_patients(mine, score_records(head_ct, mine), HEAD, "hemorrhage")[0]
    call = call_study(study_rule(head_ct.card, HEAD), HEAD, lab.probabilities, lab.finding_probabilities)
    assert row["prediction"] == call.prediction.label
    assert row["probabilities"]["hemorrhage"] == pytest.approx(call.score, abs=1e-4)
    slices = np.array([[d[label] for label in HEAD.labels] for d in row["slice_probabilities"]])
    np.testing.assert_allclose(slices, lab.probabilities, atol=1e-4)
    assert row["key_slices"] == list(call.key_slices)


# ---------------------------------------------------------------- report and batch


def test_study_report_is_one_page_with_the_call_and_key_slices_and_no_identifiers(head_ct) -> None:
    files = retag(series_files(6, 64), lambda ds, k: setattr(ds, "SeriesDescription", "DOE^JANE head"))
    analysis = only_analysis(head_ct, files)
    content = study_report_content(analysis)
    assert [k.number for k in content.key_slices] == [i + 1 for i in analysis.key_slices]
    assert content.key_slices[0].overlay.shape == (64, 64, 3)
    data = render_study_pdf(content)
    assert data.startswith(b"%PDF-") and len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 1
    text = pdf_text(data)
    for fact in (b"Study call", analysis.prediction.headline_text().encode(), head_ct.card.sha256.encode(),
                 analysis.digest.encode(), b"Series 2 (axial, 6 slices", b"not for diagnosis",
                 f"{analysis.rule.threshold:.3f}".encode()):
        assert fact in text, fact
    for secret in (b"DOE", b"Secret", b"ID-12345", b"2.25.10"):
        assert secret not in data and secret not in text


def test_batch_rows_per_series_in_the_table_and_csv(head_ct) -> None:
    from ui.batch_page import rows_csv, table_rows

    rows = study_rows(head_ct, zip_files(series_files(5, 64) + mr_series()), "two.zip", detail=True, safe_series=True)
    table = table_rows(rows, HEAD)
    assert [(r["file"], r["series"], r["status"]) for r in table] == [
        ("two.zip", "Series 2 (axial, 5 slices, 2.5 mm)", "ok"), ("two.zip", "Series 7 (axial, 4 slices)", "rejected")]
    assert list(table[0])[:4] == ["file", "series", "slices", "status"] and table[0]["p_hemorrhage"] is not None
    assert b"2.25.10" not in rows_csv(table)


def test_series_label_names_no_uid() -> None:
    study = read_upload([("s.zip", zip_files(series_files(3, 32)))], HEAD)
    assert series_label(study.series[0], 0) == "Series 2 (axial, 3 slices, 2.5 mm)"


def test_reading_a_path_that_is_not_there_is_a_study_error(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="neither a file nor a folder"):
        read_study_path(tmp_path / "nothing", HEAD)
    assert isinstance(study_row("x", Refusal("error", "internal error: X")), dict)


def test_the_api_serves_studies_with_the_real_pipeline(head_ct) -> None:
    """POST /v1/studies/head_ct (the HTTP API's endpoint) answers with the rows `study_rows` makes."""
    from api.settings import ApiSettings
    from tests.test_api import start

    client, _ = start(ApiSettings(models=("head_ct",), token=None))
    try:
        data = zip_files(series_files(6, 64) + mr_series())
        answer = client.post("/v1/studies/head_ct", files={"file": ("two.zip", data, "application/zip")})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["series"]
        expected = study_rows(head_ct, data, "two.zip")
        assert [(r["status"], r["slices"], r["series"]) for r in rows] == [
            (r["status"], r["slices"], r["series"]) for r in expected]
        assert rows[0]["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=1e-6)
        assert rows[0]["key_slices"] == expected[0]["key_slices"]
    finally:
        client.__exit__(None, None, None)
