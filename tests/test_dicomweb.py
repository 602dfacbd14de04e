"""DICOMweb connector (core.dicomweb) against a real Orthanc with its DICOMweb plugin.

A synthetic head-CT study goes archive -> SecondLook -> archive: uploaded to Orthanc, found by
QIDO-RS, pulled by WADO-RS, analysed by the bundled model, its SR, overlay capture and PDF
stored by STOW-RS and read back from Orthanc. Also: credentials (401), an unreachable server, a
study with no series the model is for, a transfer that stops half-way, an archive that refuses
some outputs, and outputs that fail before anything is sent.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import date

import pytest
import requests
from pydicom.uid import ComprehensiveSRStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from core.dicom_out import OutputError, build_outputs
from core.dicomweb import (
    Archive,
    ArchiveAuthError,
    ArchiveError,
    ArchiveSettings,
    ArchiveUnreachable,
    NoSuitableSeries,
    StoreError,
    archive_settings,
    safe_url,
    send_results,
    suitable_series,
)
from core.tasks import get_task
from tests.dicom_study import analyse, bundled_model, read, synthetic_series
from tests.orthanc import free_port, orthanc_missing, orthanc_server

HEAD = get_task("head_ct")


def upload(server, files: list[bytes]) -> str:
    """Upload a series through Orthanc's REST API; its Study Instance UID."""
    for data in files:
        server.upload(data)
    return str(read(files[:1])[0].StudyInstanceUID)


@pytest.fixture(scope="module")
def head_study(orthanc) -> str:
    """An 8-slice head CT (2024-01-02) and, in another study, a chest CT (2023-05-05)."""
    upload(orthanc, [_dated(f, "20230505") for f in synthetic_series(n=3, body_part="CHEST", series_number=3)])
    return upload(orthanc, synthetic_series(n=8))


def _dated(data: bytes, study_date: str) -> bytes:
    from core.dicom_out import to_bytes

    (ds,) = read([data])
    ds.StudyDate = study_date
    return to_bytes(ds)


@pytest.fixture(scope="module")
def archive(orthanc) -> Archive:
    with Archive(ArchiveSettings(orthanc.dicomweb_url)) as client:
        yield client


# --- settings ---------------------------------------------------------------------------------


def test_settings_come_from_the_environment() -> None:
    assert archive_settings({}) is None
    settings = archive_settings({"SECONDLOOK_DICOMWEB_URL": "http://pacs:8042/dicom-web/",
                                 "SECONDLOOK_DICOMWEB_USER": "reader", "SECONDLOOK_DICOMWEB_PASSWORD": "pw",
                                 "SECONDLOOK_DICOMWEB_SHOW_NAMES": "1", "SECONDLOOK_DICOMWEB_TIMEOUT": "5"})
    assert settings.url == "http://pacs:8042/dicom-web" and settings.user == "reader" and settings.show_names
    assert settings.timeout == 5.0 and "pw" not in repr(settings)
    with pytest.raises(ValueError, match="must be an http"):
        archive_settings({"SECONDLOOK_DICOMWEB_URL": "ftp://pacs"})
    with pytest.raises(ValueError, match="go together"):
        archive_settings({"SECONDLOOK_DICOMWEB_URL": "http://pacs", "SECONDLOOK_DICOMWEB_USER": "reader"})
    with pytest.raises(ValueError, match="TIMEOUT must be a number"):
        archive_settings({"SECONDLOOK_DICOMWEB_URL": "http://pacs", "SECONDLOOK_DICOMWEB_TIMEOUT": "soon"})
    with pytest.raises(ArchiveError, match="no archive configured: set SECONDLOOK_DICOMWEB_URL"):
        Archive.from_environment({})
    assert safe_url("http://user:secret@pacs:8042/dicom-web") == "http://pacs:8042/dicom-web"


# --- archive -> SecondLook -> archive ------------------------------------------------------------


def test_search_filters_by_modality_and_date_without_names(orthanc, archive: Archive, head_study: str) -> None:
    studies = archive.search_studies(modality="CT", date_from=date(2024, 1, 1), date_to=date(2024, 1, 31))
    assert [s.study_uid for s in studies] == [head_study]
    (study,) = studies
    assert study.date == "2024-01-02" and study.modalities == ("CT",) and study.instance_count == 8
    assert study.patient_name is None and study.patient_id is None and study.accession is None
    assert "Secret" not in repr(studies) and "ID-12345" not in repr(studies)
    assert head_study not in {s.study_uid for s in archive.search_studies(modality="MR")}
    assert len(archive.search_studies(modality="CT", date_to=date(2023, 12, 31))) >= 1
    with Archive(ArchiveSettings(orthanc.dicomweb_url, show_names=True)) as named:
        (shown,) = named.search_studies(modality="CT", date_from=date(2024, 1, 2), date_to=date(2024, 1, 2))
    assert shown.patient_name == "Secret^Patient" and shown.patient_id == "ID-12345" and shown.accession == "ACC-777"
    with pytest.raises(ValueError, match="DICOM modality code"):
        archive.search_studies(modality="CT*")
    with pytest.raises(ValueError, match="reversed"):
        archive.search_studies(date_from=date(2024, 2, 1), date_to=date(2024, 1, 1))


def test_a_study_goes_archive_secondlook_archive(orthanc, archive: Archive, head_study: str) -> None:
    from dicomweb_client.api import DICOMwebClient

    series = archive.list_series(head_study)
    (chosen,) = suitable_series(series, HEAD)
    instances = archive.fetch_series(chosen)
    assert len(instances) == 8 and all("PixelData" in ds for ds in instances)
    assert {str(ds.SeriesInstanceUID) for ds in instances} == {chosen.series_uid}
    instances.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    summary = analyse(bundled_model("head_ct"), instances)
    key = instances[summary.key_slices[0]]
    before = orthanc.instance_count()
    result = send_results(archive, summary)
    assert result.verified and len(result.stored) == 3 and result.study_uid == head_study
    assert orthanc.instance_count() == before + 3

    # Read back through DICOMweb, as a viewer would.
    viewer = DICOMwebClient(orthanc.dicomweb_url)
    listed = {row["00080060"]["Value"][0]: row for row in viewer.search_for_series(head_study)}
    assert set(listed) == {"CT", "SR", "OT", "DOC"}
    stored = {}
    for modality in ("SR", "OT", "DOC"):
        series_uid = listed[modality]["0020000E"]["Value"][0]
        (ds,) = viewer.retrieve_series(head_study, series_uid)
        stored[modality] = ds
        assert str(ds.SOPInstanceUID) in result.stored and ds.StudyInstanceUID == head_study
        assert ds.PatientID == "ID-12345" and ds.PatientName == "Secret^Patient"
        assert str(ds.SOPInstanceUID) not in {str(i.SOPInstanceUID) for i in instances}
    sr, capture, pdf = stored["SR"], stored["OT"], stored["DOC"]
    assert (sr.SOPClassUID, capture.SOPClassUID, pdf.SOPClassUID) == (
        ComprehensiveSRStorage, SecondaryCaptureImageStorage, EncapsulatedPDFStorage)
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series_item in item.ReferencedSeriesSequence for ref in series_item.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID for ds in instances}
    images = [item for item in sr.iterall() if item.keyword == "ReferencedSOPInstanceUID"]
    assert key.SOPInstanceUID in {element.value for element in images}
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert pdf.EncapsulatedDocument[:pdf.EncapsulatedDocumentLength] == summary.pdf


def test_a_study_with_no_series_the_model_is_for(archive: Archive, head_study: str) -> None:
    with pytest.raises(NoSuitableSeries, match=r"no series the brain_mri model is for \(MR, .*it holds: CT HEAD \(8"):
        archive.fetch_study(head_study, get_task("brain_mri"))
    chest = archive.search_studies(modality="CT", date_to=date(2023, 12, 31))[0]
    with pytest.raises(NoSuitableSeries, match="no series the head_ct model is for.*CT CHEST"):
        archive.fetch_study(chest.study_uid, HEAD)
    fetched = archive.fetch_study(head_study, HEAD)
    assert [len(v) for v in fetched.values()] == [8]
    with pytest.raises(ArchiveError, match="no series for study"):
        archive.list_series("1.2.3.4.5")
    with pytest.raises(ValueError, match="DICOM UID"):
        archive.list_series("../../etc")


def test_a_transfer_that_stops_half_way_keeps_nothing(orthanc, head_study: str, monkeypatch) -> None:
    with Archive(ArchiveSettings(orthanc.dicomweb_url)) as archive:
        (series,) = suitable_series(archive.list_series(head_study), HEAD)
        real = archive._client.retrieve_series

        def drops_after_two(*args, **kwargs):
            for number, ds in enumerate(real(*args, **kwargs)):
                if number == 2:
                    raise requests.ConnectionError("connection reset by peer")
                yield ds

        monkeypatch.setattr(archive._client, "retrieve_series", drops_after_two)
        with pytest.raises(ArchiveUnreachable, match="stopped after 2 images and nothing was kept"):
            archive.fetch_series(series)
    with Archive(ArchiveSettings(orthanc.dicomweb_url, max_instances=5)) as small:
        with pytest.raises(ArchiveError, match="8 images, more than the 5"):
            small.fetch_series(series)
    with Archive(ArchiveSettings(orthanc.dicomweb_url, max_bytes=2**16)) as small:
        with pytest.raises(ArchiveError, match="larger than the 0.0625 MB .*nothing was kept"):
            small.fetch_series(series)


def test_nothing_is_sent_when_an_output_fails(orthanc, archive: Archive, head_study: str) -> None:
    (series,) = suitable_series(archive.list_series(head_study), HEAD)
    summary = analyse(bundled_model("head_ct"), archive.fetch_series(series), with_pdf=False)
    before = orthanc.instance_count()
    with pytest.raises(OutputError, match="no PDF report"):
        send_results(archive, dataclasses.replace(summary, pdf=b"not a pdf"))
    other = read(synthetic_series(n=1))[0]
    with pytest.raises(OutputError, match="2 studies"):
        send_results(archive, dataclasses.replace(summary, sources=(*summary.sources, other)))
    with pytest.raises(ArchiveError, match="only PACS-ready outputs"):
        archive.store(build_outputs(summary))
    assert orthanc.instance_count() == before


# --- a refusing archive, credentials, no server -------------------------------------------------


# Stages an archive policy that refuses one kind of object: Orthanc drops Encapsulated PDFs,
# yet its STOW-RS answer (DICOMweb plugin 1.7) still lists them as stored.
REFUSE_PDF = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= "DOC"
end
"""


def test_an_archive_that_refuses_some_outputs(tmp_path) -> None:
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    with orthanc_server(tmp_path, lua=REFUSE_PDF) as server, Archive(ArchiveSettings(server.dicomweb_url)) as archive:
        study = upload(server, synthetic_series(n=4))
        (series,) = suitable_series(archive.list_series(study), HEAD)
        summary = analyse(bundled_model("head_ct"), archive.fetch_series(series))
        with pytest.raises(StoreError, match="2 of 3 outputs are in the archive") as caught:
            send_results(archive, summary)
        assert "missing: the PDF report" in str(caught.value)
        assert len(caught.value.stored) == 2 and len(caught.value.failed) == 1
        assert server.instance_count() == 4 + 2


def test_credentials_are_required_and_checked(tmp_path) -> None:
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    with orthanc_server(tmp_path, auth=("reader", "right")) as server:
        with Archive(ArchiveSettings(server.dicomweb_url)) as anonymous:
            with pytest.raises(ArchiveAuthError, match="HTTP 401 .*requires credentials: set SECONDLOOK_DICOMWEB_USER"):
                anonymous.search_studies()
        with Archive(ArchiveSettings(server.dicomweb_url, user="reader", password="wrong")) as wrong:
            with pytest.raises(ArchiveAuthError, match="HTTP 401 .*user and password were refused"):
                wrong.search_studies()
        with Archive(ArchiveSettings(server.dicomweb_url, user="reader", password="right")) as right:
            assert right.search_studies() == []


def test_an_unreachable_archive() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    started = time.monotonic()
    with Archive(ArchiveSettings(url, attempts=2, timeout=2)) as archive:
        with pytest.raises(ArchiveUnreachable, match=r"cannot be reached \(the study search, 2 attempt"):
            archive.search_studies(modality="CT")
    assert time.monotonic() - started < 5
