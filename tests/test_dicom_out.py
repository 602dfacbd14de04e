"""DICOM outputs (core.dicom_out): SR, secondary captures and Encapsulated PDF of a real model output.

The synthetic head-CT series is analysed by the bundled head_ct model (tests/dicom_study.py);
the outputs are validated with dicom3tools' dciodvfy where it is installed, read back with
pydicom and highdicom, and checked for identifiers and references in both forms.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from core.dicom_out import (
    IDENTIFYING_ATTRIBUTES,
    SCHEME,
    FindingResult,
    OutputError,
    Overlay,
    ResultSummary,
    build_outputs,
    check_outputs,
    summary_from_prediction,
    to_bytes,
    write_pdf,
)
from tests.dicom_study import PATIENT, analyse, bundled_model, dciodvfy, read, synthetic_series


@pytest.fixture(scope="module")
def summary() -> ResultSummary:
    """The bundled head_ct model's real output on an 8-slice synthetic series."""
    return analyse(bundled_model("head_ct"), read(synthetic_series()))


def reread(dataset):
    return dcmread(io.BytesIO(to_bytes(dataset)))


def all_uids(dataset) -> set[str]:
    found = set()
    for element in dataset.iterall():
        if element.VR == "UI" and element.value:
            found.update([str(v) for v in element.value] if element.VM > 1 else [str(element.value)])
    return found


def source_uids(summary: ResultSummary) -> set[str]:
    return set().union(*(all_uids(ds) for ds in summary.sources))


def sr_tree(sr) -> dict[str, list]:
    """{concept meaning: [values]} over the whole content tree of an SR."""
    found: dict[str, list] = {}

    def visit(items):
        for item in items:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            value = (item.get("TextValue") or item.get("UID") or
                     (item.ConceptCodeSequence[0].CodeMeaning if "ConceptCodeSequence" in item else None) or
                     (float(item.MeasuredValueSequence[0].NumericValue) if "MeasuredValueSequence" in item else None) or
                     (item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID if "ReferencedSOPSequence" in item else None))
            found.setdefault(meaning, []).append(value)
            visit(item.get("ContentSequence", []))

    visit(sr.ContentSequence)
    return found


def test_summary_comes_from_the_real_model(summary: ResultSummary) -> None:
    card = bundled_model("head_ct").card
    assert summary.model_sha256 == card.sha256 and summary.model_version == card.version
    assert summary.labels == ("normal", "hemorrhage") and sum(summary.probabilities) == pytest.approx(1.0)
    assert [f.key for f in summary.findings] == ["ivh", "iph", "sah", "edh", "sdh", "fracture"]
    assert summary.threshold == pytest.approx(card.threshold) and summary.positive == "hemorrhage"
    assert len(summary.sources) == 8 and not any("PixelData" in ds for ds in summary.sources)
    assert summary.pdf.startswith(b"%PDF-") and summary.overlays[0].image.dtype == np.uint8


@pytest.mark.parametrize("pacs_ready", [False, True], ids=["identifier-free", "pacs-ready"])
def test_outputs_pass_dciodvfy(summary: ResultSummary, pacs_ready: bool) -> None:
    outputs = build_outputs(summary, pacs_ready=pacs_ready)
    assert len(outputs.all()) == 3
    for dataset in outputs.all():
        verdict = dciodvfy(to_bytes(dataset))
        if verdict is None:
            pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
        errors, warnings = verdict
        assert errors == [], f"{dataset.Modality}: {errors}"
        # What is left: the private coding scheme is not one dciodvfy knows; the identifier-free
        # form leaves the attributes a DICOMDIR would index empty on purpose.
        allowed = (f"Unrecognized defined term <{SCHEME}>", "needed to build DICOMDIR")
        assert all(any(a in w for a in allowed) for w in warnings), warnings
        if pacs_ready:
            assert not any("DICOMDIR" in w for w in warnings)


def test_identifier_free_by_default(summary: ResultSummary) -> None:
    outputs = build_outputs(summary)
    assert not outputs.pacs_ready
    sources = source_uids(summary)
    studies = set()
    for dataset in outputs.all():
        data = to_bytes(dataset)
        for secret in ("Secret", "ID-12345", "ACC-777", "19600101", "20240102", "Doc^Tor", "S-42", "General Hospital",
                       "CT head without contrast"):
            assert secret.encode() not in data, (dataset.Modality, secret)
        read_back = dcmread(io.BytesIO(data))
        for keyword in IDENTIFYING_ATTRIBUTES:
            assert not read_back.get(keyword), (dataset.Modality, keyword)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber"):
            assert keyword in read_back  # type 2: present and empty
        assert read_back.PatientIdentityRemoved == "YES" and read_back.DeidentificationMethod
        assert not all_uids(read_back) & sources, dataset.Modality
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "SourceImageSequence", "SourceInstanceSequence"):
            assert keyword not in read_back
        studies.add(read_back.StudyInstanceUID)
    assert len(studies) == 1 and studies.isdisjoint(sources)
    assert "Upload hash" in sr_tree(outputs.sr)


def test_pacs_ready_copies_identity_and_references_the_sources(summary: ResultSummary) -> None:
    outputs = build_outputs(summary, pacs_ready=True)
    first = summary.sources[0]
    key = summary.sources[summary.key_slices[0]]
    for dataset in outputs.all():
        read_back = reread(dataset)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "StudyDate", "StudyTime", "StudyInstanceUID", "ReferringPhysicianName", "SpecificCharacterSet"):
            assert read_back[keyword].value == first[keyword].value, (dataset.Modality, keyword)
        assert "PatientIdentityRemoved" not in read_back
        assert read_back.SeriesInstanceUID != first.SeriesInstanceUID
    sr = reread(outputs.sr)
    evidence = {(item.StudyInstanceUID, series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID)
                for item in sr.CurrentRequestedProcedureEvidenceSequence for series in item.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert evidence == {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
                        for ds in summary.sources}
    tree = sr_tree(sr)
    assert tree["Source of Measurement"] == [key.SOPInstanceUID]  # the key slice, as a viewer links it
    assert tree["Source"] == [key.SOPInstanceUID]  # the image library
    capture = reread(outputs.captures[0])
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert capture.PatientOrientation == ["L", "P"] and capture.BodyPartExamined == "HEAD"
    assert reread(outputs.pdf).SourceInstanceSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID


def test_every_output_gets_new_uids(summary: ResultSummary) -> None:
    first, second = build_outputs(summary, pacs_ready=True), build_outputs(summary, pacs_ready=True)
    sources = {str(ds.SOPInstanceUID) for ds in summary.sources} | {str(ds.SeriesInstanceUID) for ds in summary.sources}
    made = [str(ds.SOPInstanceUID) for ds in (*first.all(), *second.all())]
    series = {str(ds.SeriesInstanceUID) for ds in (*first.all(), *second.all())}
    assert len(set(made)) == 6 and len(series) == 6 and sources.isdisjoint(made) and sources.isdisjoint(series)
    assert [ds.SOPClassUID for ds in first.all()] == [ComprehensiveSRStorage, SecondaryCaptureImageStorage,
                                                      EncapsulatedPDFStorage]
    assert build_outputs(summary).sr.StudyInstanceUID != build_outputs(summary).sr.StudyInstanceUID


def test_sr_carries_the_model_the_probabilities_and_the_call(summary: ResultSummary) -> None:
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(reread(build_outputs(summary, pacs_ready=True).sr))
    assert sr.content[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (group,) = sr.content.get_image_measurement_groups()
    measured = {m.name.value: m.value for m in group.get_measurements()}
    expected = {f"p:{label}": p for label, p in zip(summary.labels, summary.probabilities)}
    expected |= {f"p:{f.key}": f.probability for f in summary.findings}
    assert measured.keys() == expected.keys()
    assert all(measured[k] == pytest.approx(v, abs=1e-9) for k, v in expected.items())
    evaluations = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
    if summary.uncertain:
        assert evaluations["CALL"].meaning == "Indeterminate" and evaluations["LIKELIER"].value == summary.call
    else:
        assert evaluations["CALL"].value == summary.call
    for finding in summary.findings:
        assert evaluations[finding.key].meaning == {"unreliable": "Not reported: unreliable output"}.get(
            finding.status, finding.status.capitalize())
    tree = sr_tree(sr)
    assert tree["Algorithm Name"] == [summary.model_name] and tree["Algorithm Version"] == [summary.model_version]
    assert f"weights sha256 {summary.model_sha256}" in tree["Algorithm Parameters"]
    assert f"operating threshold: P(hemorrhage) >= {summary.threshold:.4f}" in tree["Algorithm Parameters"]
    assert tree["Research-use notice"] == [summary.notice]
    assert tree["Model output"][0].startswith(summary.call_text)
    assert tree["Key slices"] == [f"{summary.key_slices[0] + 1} of 8 analysed slices (1 = first in anatomical order)"]
    assert "Upload hash" not in tree  # the PACS-ready form is linked by UIDs instead


def test_uncertain_decided_and_unreliable_are_written_as_such(summary: ResultSummary) -> None:
    decided = dataclasses.replace(summary, uncertain=False, call="hemorrhage",
                                  findings=(FindingResult("sdh", "subdural", 0.9, 0.5),
                                            FindingResult("edh", "epidural", 0.9, 0.1, reliable=False)))
    tree = sr_tree(build_outputs(decided).sr)
    assert tree["Model call at the operating threshold"] == ["hemorrhage"] and "Likelier class" not in tree
    assert tree["subdural"] == ["Present"] and tree["epidural"] == ["Not reported: unreliable output"]
    uncertain = dataclasses.replace(summary, uncertain=True, call="normal")
    tree = sr_tree(build_outputs(uncertain).sr)
    assert tree["Model call at the operating threshold"] == ["Indeterminate"]
    assert tree["Likelier class"] == ["normal"] and tree["Model output"][0].startswith("uncertain (likelier: normal)")


def test_capture_and_pdf_read_back(summary: ResultSummary) -> None:
    outputs = build_outputs(summary)
    capture = reread(outputs.captures[0])
    assert capture.PhotometricInterpretation == "RGB" and capture.BurnedInAnnotation == "NO"
    np.testing.assert_array_equal(capture.pixel_array, summary.overlays[0].image)
    pdf = reread(outputs.pdf)
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf" and pdf.Modality == "DOC"
    assert pdf.EncapsulatedDocument[:pdf.EncapsulatedDocumentLength] == summary.pdf


def test_several_key_slices_make_one_capture_each(summary: ResultSummary) -> None:
    image = summary.overlays[0].image
    study = dataclasses.replace(summary, key_slices=(2, 5), overlays=(Overlay(image, 2), Overlay(image[::2, ::2].copy(), 5)),
                                pdf=None)
    outputs = build_outputs(study, pacs_ready=True)
    assert outputs.pdf is None and len(outputs.captures) == 2
    assert [reread(c).InstanceNumber for c in outputs.captures] == [1, 2]
    assert len({c.SeriesInstanceUID for c in outputs.captures}) == 1
    assert [reread(c).SourceImageSequence[0].ReferencedSOPInstanceUID for c in outputs.captures] == \
        [study.sources[2].SOPInstanceUID, study.sources[5].SOPInstanceUID]
    assert sr_tree(outputs.sr)["Source of Measurement"] == [study.sources[2].SOPInstanceUID,
                                                            study.sources[5].SOPInstanceUID]


def test_a_non_dicom_upload_gets_identifier_free_outputs_only(summary: ResultSummary) -> None:
    image = dataclasses.replace(summary, sources=(), key_slices=(), overlays=(Overlay(summary.overlays[0].image),))
    outputs = build_outputs(image)
    capture = reread(outputs.captures[0])
    assert capture.PatientOrientation == "" and capture.Laterality == ""
    verdict = dciodvfy(to_bytes(outputs.captures[0]))
    if verdict is not None:
        assert verdict[0] == []
    with pytest.raises(OutputError, match="needs the source DICOM instances"):
        build_outputs(image, pacs_ready=True)


def test_bad_summaries_are_refused(summary: ResultSummary) -> None:
    with pytest.raises(ValueError, match="2 labels but 3 probabilities"):
        dataclasses.replace(summary, probabilities=(0.2, 0.3, 0.5))
    with pytest.raises(ValueError, match="key slices"):
        dataclasses.replace(summary, key_slices=(8,))
    with pytest.raises(ValueError, match="not uint8"):
        dataclasses.replace(summary, overlays=(Overlay(np.zeros((4, 4), np.float32)),))
    with pytest.raises(ValueError, match="call 'bleed' is not one of"):
        dataclasses.replace(summary, call="bleed")
    with pytest.raises(OutputError, match="no PDF report"):
        write_pdf(dataclasses.replace(summary, pdf=b"<html>"))
    other = read(synthetic_series(n=1))[0]
    with pytest.raises(OutputError, match="2 studies"):
        build_outputs(dataclasses.replace(summary, sources=(*summary.sources, other)), pacs_ready=True)


def test_a_flagged_prediction_gets_no_dicom_result() -> None:
    import torch

    from core.decision import predict
    from core.guard import GuardVerdict

    classifier = bundled_model("head_ct")
    prediction = dataclasses.replace(predict(classifier, torch.zeros(1, 3, classifier.spec.input_size,
                                                                     classifier.spec.input_size))[0],
                                     guard=GuardVerdict("out_of_range", "the DICOM file says its modality is MR"))
    with pytest.raises(ValueError, match="refused"):
        summary_from_prediction(prediction, classifier.card)
    with pytest.raises(ValueError, match="unknown findings"):
        summary_from_prediction(dataclasses.replace(prediction, guard=GuardVerdict.passed()), classifier.card,
                                unreliable=["nope"])


def test_check_outputs_catches_a_leak_and_a_reused_uid(summary: ResultSummary) -> None:
    outputs = build_outputs(summary)
    outputs.captures[0].PatientName = PATIENT["PatientName"]
    with pytest.raises(OutputError, match=r"SC carries identifying attributes \['PatientName'\]"):
        check_outputs(outputs, summary)
    outputs = build_outputs(summary, pacs_ready=True)
    outputs.pdf.SOPInstanceUID = summary.sources[0].SOPInstanceUID
    with pytest.raises(OutputError, match="PDF reuses SOPInstanceUID"):
        check_outputs(outputs, summary)
    outputs = build_outputs(summary, pacs_ready=True)
    outputs.pdf.preamble = None  # what a bare pydicom Dataset sends through dicomweb-client: no "DICM"
    with pytest.raises(OutputError, match="PDF does not write and read back as a DICOM file"):
        check_outputs(outputs, summary)


def test_sparse_and_multiframe_sources(summary: ResultSummary) -> None:
    from pydicom.uid import generate_uid

    from benchmarks.samples import make_dicom

    study = generate_uid()
    sparse = read([make_dicom(np.zeros((32, 32), np.int16), extra={"StudyInstanceUID": study,
                                                                    "SeriesInstanceUID": generate_uid()})])[0]
    del sparse.PatientName, sparse.PatientID  # type 2, yet some files leave them out
    multiframe = read([make_dicom(np.zeros((3, 32, 32), np.int16), extra={"StudyInstanceUID": study,
                                                                          "SeriesInstanceUID": generate_uid()})])[0]
    image = summary.overlays[0].image
    odd = dataclasses.replace(summary, sources=(sparse, multiframe), key_slices=(), overlays=(Overlay(image, 1),))
    outputs = build_outputs(odd, pacs_ready=True)
    assert "PatientName" not in sparse and "PatientBirthDate" not in sparse  # the source is left as it was
    sr = reread(outputs.sr)
    assert sr.PatientName == "" and sr.PatientID == "" and sr.StudyInstanceUID == study
    assert sorted(sr_tree(sr)["Source of Measurement"]) == sorted([sparse.SOPInstanceUID, multiframe.SOPInstanceUID])
    for dataset in outputs.all():
        verdict = dciodvfy(to_bytes(dataset))
        assert verdict is None or verdict[0] == [], verdict
