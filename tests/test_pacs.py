"""Archive -> SecondLook -> archive, and the DICOM downloads, end to end.

Against a real Orthanc with its DICOMweb plugin (tests/orthanc.py; skipped with the reason where it
is missing): `python -m core.predict --dicomweb ... --store` stores each analysed series' SR, key
slice captures and PDF back into the study, read back from Orthanc with the source's references and
the model's identity; its errors (unreachable, 401, no suitable series, a transfer that stops
half-way, an archive that refuses an output) are rows with a reason. The app's path: the Archive
page searches, opens the study in the study view and sends the results back. The downloads of the
task and study pages and the API's `?format=dicom-sr|dicom-sc` are read back with pydicom, and
checked by dciodvfy where dicom3tools is installed.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage
from streamlit.testing.v1 import AppTest

from benchmarks.study import zip_files
from core.dicom_out import to_bytes
from core.predict import main
from core.study import ROW_FIELDS, read_upload
from core.tasks import get_task
from tests.conftest import encode, page_texts, synthetic_slice
from tests.dicom_study import PATIENT, bundled_model, dciodvfy, read, synthetic_series
from tests.orthanc import free_port, orthanc_missing, orthanc_server
from ui.plain import ZERO_WIDTH_SPACE

HEAD = get_task("head_ct")
STUDY_DATE = "20250303"  # after every study date other modules search the shared Orthanc for
APP_DATE = date(2025, 4, 4)  # the Archive page's study


def dated(files: list[bytes], study_uid: str, study_date: str = STUDY_DATE) -> list[bytes]:
    """The files moved into one study of a given date."""
    out = []
    for ds in read(files):
        ds.StudyInstanceUID, ds.StudyDate = study_uid, study_date
        out.append(to_bytes(ds))
    return out


@pytest.fixture(scope="module")
def head_study(orthanc) -> dict:
    """A study with two head-CT series (8 and 6 slices) and a chest-CT series, uploaded to Orthanc."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    series = {"first": dated(synthetic_series(n=8, series_number=2), uid),
              "second": dated(synthetic_series(n=6, series_number=4, bleed=(2,)), uid),
              "chest": dated(synthetic_series(n=3, body_part="CHEST", series_number=5), uid)}
    for files in series.values():
        for data in files:
            orthanc.upload(data)
    return {"uid": uid, "series": series}


@pytest.fixture(scope="module")
def app_study(orthanc) -> dict:
    """For the Archive page, a study of its own date: a head-CT series (8 slices) and a chest-CT series (3)."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    head = dated(synthetic_series(n=8, series_number=2), uid, APP_DATE.strftime("%Y%m%d"))
    for data in head + dated(synthetic_series(n=3, body_part="CHEST", series_number=5), uid, APP_DATE.strftime("%Y%m%d")):
        orthanc.upload(data)
    return {"uid": uid, "head": head}


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[dict]]:
    code = main(list(argv))
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def series_uid(files: list[bytes]) -> str:
    return str(read(files[:1])[0].SeriesInstanceUID)


def key_instances(files: list[bytes], row: dict) -> list[Dataset]:
    """The source instances of a row's key slices, found by position: the slices are in anatomical order
    (by ImagePositionPatient along the slice normal, here z), whichever way the study pipeline sorts them."""
    study = read_upload([(f"{n}.dcm", data) for n, data in enumerate(files)], HEAD)
    positions = study.series[0].geometry.positions
    by_z = {round(float(ds.ImagePositionPatient[2]), 3): ds for ds in read(files)}
    return [by_z[round(float(positions[i]), 3)] for i in row["key_slices"]]


def stored_outputs(orthanc, study_uid: str) -> dict[str, list[Dataset]]:
    """Every SR, OT (captures) and DOC instance in the study, read back through DICOMweb as a viewer would."""
    viewer = DICOMwebClient(orthanc.dicomweb_url)
    found: dict[str, list[Dataset]] = {"SR": [], "OT": [], "DOC": []}
    for row in viewer.search_for_series(study_uid):
        modality = row["00080060"]["Value"][0]
        if modality in found:
            found[modality] += viewer.retrieve_series(study_uid, row["0020000E"]["Value"][0])
    return found


def unescaped(elements) -> str:
    """The text of alerts as the reader sees it (`ui.plain` escapes Markdown's characters)."""
    return re.sub(r"\\(.)", r"\1", "\n".join(e.value for e in elements)).replace(ZERO_WIDTH_SPACE, "")


def assert_valid(dataset: Dataset | bytes) -> None:
    """dciodvfy finds no error (where dicom3tools is installed)."""
    verdict = dciodvfy(dataset if isinstance(dataset, bytes) else to_bytes(dataset))
    if verdict is not None:
        errors, _ = verdict
        assert errors == [], errors


def archived_file(orthanc, sop_instance_uid: str) -> bytes:
    """An instance's file exactly as the archive holds it (Orthanc's REST API), not as pydicom would rewrite it."""
    import requests

    found = requests.post(f"{orthanc.url}/tools/lookup", data=sop_instance_uid, auth=orthanc.auth, timeout=10).json()
    (instance,) = [item["ID"] for item in found if item["Type"] == "Instance"]
    return requests.get(f"{orthanc.url}/instances/{instance}/file", auth=orthanc.auth, timeout=10).content


# ---------------------------------------------------------------- the command line


def test_command_line_analyses_the_archived_study_and_stores_its_results(orthanc, head_study: dict, capsys,
                                                                        tmp_path: Path) -> None:
    uid, series = head_study["uid"], head_study["series"]
    code, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", orthanc.dicomweb_url, "--study-uid", uid, "--store")
    assert code == 0
    # One row per head-CT series (not the chest series), with --study's fields, and what was stored.
    assert [row["series"] for row in rows] == [series_uid(series["first"]), series_uid(series["second"])]
    assert all(list(row) == [*ROW_FIELDS, "store"] for row in rows)
    assert all(row["status"] == "ok" and row["file"] == f"{orthanc.dicomweb_url}/studies/{uid}" for row in rows)
    # The same answer as --study on the same files read from disk.
    folder = tmp_path / "first"
    folder.mkdir()
    for n, data in enumerate(series["first"]):
        (folder / f"{n}.dcm").write_bytes(data)
    _, local = run_cli(capsys, "--task", "head_ct", "--study", str(folder))
    assert {k: v for k, v in local[0].items() if k != "file"} == {k: v for k, v in rows[0].items()
                                                                  if k not in ("file", "store")}

    stored = stored_outputs(orthanc, uid)
    assert len(stored["SR"]) == 2 and len(stored["DOC"]) == 2
    card = bundled_model("head_ct").card
    for row, files in zip(rows, (series["first"], series["second"])):
        store = row["store"]
        assert store["status"] == "stored" and store["study"] == uid and not store["missing"]
        assert len(store["captures"]) == len(row["key_slices"]) == 3
        sources = read(files)
        keys = key_instances(files, row)
        (sr,) = [ds for ds in stored["SR"] if ds.SOPInstanceUID == store["sr"]]
        (pdf,) = [ds for ds in stored["DOC"] if ds.SOPInstanceUID == store["pdf"]]
        captures = {str(ds.SOPInstanceUID): ds for ds in stored["OT"]}
        assert sr.SOPClassUID == ComprehensiveSRStorage and pdf.SOPClassUID == EncapsulatedPDFStorage
        # References: the source study and patient, every analysed instance as evidence, the key slices in the content.
        assert sr.StudyInstanceUID == uid and sr.PatientID == PATIENT["PatientID"]
        evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                    for s in item.ReferencedSeriesSequence for ref in s.ReferencedSOPSequence}
        assert evidence == {ds.SOPInstanceUID for ds in sources}
        content = {e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert {ds.SOPInstanceUID for ds in keys} <= content
        # The model's identity.
        assert sr.ManufacturerModelName == card.name and sr.SoftwareVersions[0] == card.version
        texts = " ".join(str(e.value) for e in sr.iterall() if e.keyword in ("TextValue", "CodeMeaning"))
        assert card.sha256 in texts and "Key slices" in " ".join(str(e.value) for e in sr.iterall())
        # One capture per key slice, in key slice order, each referencing its source slice.
        for capture_uid, key in zip(store["captures"], keys):
            capture = captures[capture_uid]
            assert capture.SOPClassUID == SecondaryCaptureImageStorage and capture.StudyInstanceUID == uid
            assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
            assert capture.pixel_array.shape == (*key.pixel_array.shape, 3)
        assert pdf.EncapsulatedDocument[:5] == b"%PDF-"
        for uid_ in (store["sr"], store["pdf"], *store["captures"]):
            assert_valid(archived_file(orthanc, uid_))


def test_command_line_errors_are_rows_with_a_reason(orthanc, head_study: dict, capsys) -> None:
    uid = head_study["uid"]
    unreachable = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", unreachable, "--study-uid", uid, "--store")
    assert code == 0 and len(rows) == 1
    assert rows[0]["status"] == "error" and "cannot be reached" in rows[0]["reason"]
    assert rows[0]["store"]["status"] == "skipped"
    code, rows = run_cli(capsys, "--task", "brain_mri", "--dicomweb", orthanc.dicomweb_url, "--study-uid", uid)
    assert code == 0 and [row["status"] for row in rows] == ["rejected"]
    assert "no series the brain_mri model is for" in rows[0]["reason"] and "CT HEAD (8 images)" in rows[0]["reason"]
    code, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", orthanc.dicomweb_url, "--study-uid", "1.2.3.4")
    assert code == 0 and rows[0]["status"] == "error" and "no series for study" in rows[0]["reason"]


@pytest.mark.parametrize("argv, words", [
    (["--task", "head_ct", "--store", "--study", "x"], "--store needs --dicomweb"),
    (["--task", "head_ct", "--dicomweb", "http://pacs/dicom-web"], "--dicomweb and --study-uid go together"),
    (["--task", "head_ct", "--dicomweb", "http://pacs/dicom-web", "--study-uid", "1.2.x"], "must be a DICOM UID"),
    (["--task", "head_ct", "--dicomweb", "ftp://pacs", "--study-uid", "1.2.3"], "must be an http(s) URL"),
    (["--task", "head_ct", "--study", "x", "--dicomweb", "http://pacs/dicom-web", "--study-uid", "1.2"], "give one of"),
])
def test_a_wrong_command_line_exits_2_with_the_reason(argv: list[str], words: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and words in capsys.readouterr().err


def test_credentials_come_from_the_environment_and_a_401_is_a_row(tmp_path: Path, capsys, monkeypatch) -> None:
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    with orthanc_server(tmp_path, auth=("reader", "right")) as server:
        files = synthetic_series(n=4)
        for data in files:
            server.upload(data)
        uid = str(read(files[:1])[0].StudyInstanceUID)
        _, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", server.dicomweb_url, "--study-uid", uid)
        assert rows[0]["status"] == "error" and "HTTP 401" in rows[0]["reason"]
        monkeypatch.setenv("SECONDLOOK_DICOMWEB_USER", "reader")
        monkeypatch.setenv("SECONDLOOK_DICOMWEB_PASSWORD", "wrong")
        _, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", server.dicomweb_url, "--study-uid", uid)
        assert "user and password were refused" in rows[0]["reason"] and "wrong" not in json.dumps(rows)
        monkeypatch.setenv("SECONDLOOK_DICOMWEB_PASSWORD", "right")
        _, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", server.dicomweb_url, "--study-uid", uid)
        assert [row["status"] for row in rows] == ["ok"] and rows[0]["slices"] == 4


def test_a_transfer_that_stops_half_way_stores_nothing_for_that_series(orthanc, capsys, monkeypatch) -> None:
    from pydicom.uid import generate_uid

    uid = generate_uid()
    first, second = dated(synthetic_series(n=4, series_number=2), uid), dated(synthetic_series(n=5, series_number=3), uid)
    for data in first + second:
        orthanc.upload(data)
    broken = series_uid(second)
    real = DICOMwebClient.retrieve_series

    def stops(self, study_instance_uid, series_instance_uid, *args, **kwargs):
        for number, ds in enumerate(real(self, study_instance_uid, series_instance_uid, *args, **kwargs)):
            if series_instance_uid == broken and number == 2:
                import requests

                raise requests.ConnectionError("connection reset by peer")
            yield ds

    monkeypatch.setattr(DICOMwebClient, "retrieve_series", stops)
    before = orthanc.instance_count()
    _, rows = run_cli(capsys, "--task", "head_ct", "--dicomweb", orthanc.dicomweb_url, "--study-uid", uid, "--store")
    assert [row["status"] for row in rows] == ["ok", "error"]
    assert "stopped after 2 images and nothing was kept" in rows[1]["reason"] and rows[1]["series"] == broken
    assert rows[0]["store"]["status"] == "stored" and rows[1]["store"]["status"] == "skipped"
    # The first series' outputs (SR, 3 captures, PDF) and nothing of the second.
    assert orthanc.instance_count() == before + 5
    assert len(stored_outputs(orthanc, uid)["SR"]) == 1


# Orthanc drops Encapsulated PDFs, yet its STOW-RS answer lists them as stored (see tests/test_dicomweb.py).
REFUSE_PDF = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= "DOC"
end
"""


def test_an_archive_that_refuses_an_output_gives_a_partial_store(tmp_path: Path, capsys) -> None:
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    with orthanc_server(tmp_path, lua=REFUSE_PDF) as server:
        files = synthetic_series(n=4)
        for data in files:
            server.upload(data)
        uid = str(read(files[:1])[0].StudyInstanceUID)
        _, (row,) = run_cli(capsys, "--task", "head_ct", "--dicomweb", server.dicomweb_url, "--study-uid", uid, "--store")
        store = row["store"]
        assert row["status"] == "ok" and store["status"] == "partial"
        assert store["sr"] and len(store["captures"]) == 3 and store["pdf"] is None and len(store["missing"]) == 1
        assert "missing: the PDF report" in store["reason"]
        assert server.instance_count() == 4 + 4


# ---------------------------------------------------------------- the app: Archive page


def _archive_page() -> None:
    from ui.archive_page import render_archive_page

    render_archive_page()


def archive_page(monkeypatch, url: str, **env: str) -> AppTest:
    monkeypatch.setenv("SECONDLOOK_DICOMWEB_URL", url)
    for name, value in env.items():
        monkeypatch.setenv(f"SECONDLOOK_DICOMWEB_{name}", value)
    at = AppTest.from_function(_archive_page, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def search(at: AppTest, day: date) -> AppTest:
    at.selectbox(key="archive_model").set_value("head_ct").run()
    at.date_input(key="archive_from").set_value(day)
    at.date_input(key="archive_to").set_value(day)
    at.button(key="archive_search").click().run()
    assert not at.exception, at.exception
    return at


def shown_everywhere(at: AppTest) -> str:
    return page_texts(at) + "\n".join(str(frame.value.to_dict()) for frame in at.dataframe) + \
        "\n".join(str(s.options) for s in at.selectbox)


def test_open_from_archive_then_send_results_to_archive(orthanc, app_study: dict, monkeypatch) -> None:
    uid = app_study["uid"]
    at = search(archive_page(monkeypatch, orthanc.dicomweb_url), APP_DATE)
    (table,) = at.dataframe
    assert table.value["date"].tolist() == ["2025-04-04"] and table.value["images"].tolist() == [11]
    assert "patient" not in table.value.columns and PATIENT["PatientName"] not in shown_everywhere(at)
    assert at.selectbox(key="archive_study").options == ["1: 2025-04-04, CT, 11 images"]
    at.button(key="archive_open").click().run()
    assert not at.exception, at.exception
    texts = page_texts(at)
    assert "Study call: " in texts and PATIENT["PatientName"] not in shown_everywhere(at)
    # The study view reads the first head-CT series by default and offers the DICOM downloads.
    labels = [b.proto.label for b in at.get("download_button")]
    assert "DICOM structured report (SR)" in labels and any("key slices' overlays (SC, ZIP)" in x for x in labels)
    before = len(stored_outputs(orthanc, uid)["SR"])
    send = next(b for b in at.button if b.label == "Send results to archive")
    at.button(key=send.key).click().run()
    assert not at.exception, at.exception
    assert "Stored in the archive, in this study: the structured report, 3 overlay capture(s) and the PDF report" \
        in unescaped(at.success)
    assert not any(b.label == "Send results to archive" for b in at.button)  # never sent twice
    stored = stored_outputs(orthanc, uid)
    assert len(stored["SR"]) == before + 1
    sr = max(stored["SR"], key=lambda ds: (str(ds.ContentDate), str(ds.ContentTime), str(ds.InstanceCreationTime)))
    assert sr.StudyInstanceUID == uid and sr.PatientName == PATIENT["PatientName"]
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for s in item.ReferencedSeriesSequence for ref in s.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID for ds in read(app_study["head"])}
    # Names only where the archive is configured to show them, and then only in the table.
    at = search(archive_page(monkeypatch, orthanc.dicomweb_url, SHOW_NAMES="1"), APP_DATE)
    assert at.dataframe[0].value["patient"].tolist() == [PATIENT["PatientName"]]
    assert PATIENT["PatientName"] not in page_texts(at)


def test_archive_page_errors_are_plain_messages(orthanc, app_study: dict, monkeypatch) -> None:
    at = search(archive_page(monkeypatch, f"http://127.0.0.1:{free_port()}/dicom-web", ATTEMPTS="1"), APP_DATE)
    assert "The search failed: the archive cannot be reached" in unescaped(at.error)
    at = search(archive_page(monkeypatch, orthanc.dicomweb_url), APP_DATE)
    at.selectbox(key="archive_model").set_value("brain_mri").run()
    at.button(key="archive_open").click().run()
    assert not at.exception
    assert "no series the brain_mri model is for" in unescaped(at.error)
    at = archive_page(monkeypatch, "ftp://pacs")
    assert "The archive settings are wrong" in unescaped(at.error)


def _sections() -> None:
    import streamlit as st

    from ui.navigation import navigation

    st.session_state["sections"] = {name: [page.title for page in pages] for name, pages in navigation().items()}


def test_the_archive_page_is_in_the_navigation_only_when_configured(monkeypatch) -> None:
    monkeypatch.delenv("SECONDLOOK_DICOMWEB_URL", raising=False)
    at = AppTest.from_function(_sections)
    at.run()
    assert at.session_state["sections"]["More"] == ["Model cards", "Batch"]
    monkeypatch.setenv("SECONDLOOK_DICOMWEB_URL", "http://pacs:8042/dicom-web")
    at.run()
    assert at.session_state["sections"]["More"] == ["Archive", "Model cards", "Batch"]


# ---------------------------------------------------------------- the downloads of the task and study pages


def _page_with_downloads(name: str) -> None:
    """A task page; where asked, every DICOM download is made as a click would make it."""
    import streamlit as st
    from streamlit import runtime

    from ui.task_page import render_task_page

    render_task_page(name)
    if st.session_state.get("make_downloads"):
        entries = runtime.get_instance().media_file_mgr._deferred_callables.values()
        st.session_state["downloads"] = {entry["filename"]: entry["callable"]() for entry in list(entries)
                                         if (entry["filename"] or "").endswith((".dcm", ".zip"))}


def downloads(at: AppTest) -> dict[str, bytes]:
    at.session_state["make_downloads"] = True
    at.run()
    assert not at.exception, at.exception
    made = at.session_state["downloads"]
    at.session_state["make_downloads"] = False
    return made


def by_kind(made: dict[str, bytes]) -> dict[str, bytes]:
    return {name.rsplit("-", 1)[1].split(".")[0]: data for name, data in made.items()}


def test_task_page_downloads_identifier_free_then_pacs_ready(monkeypatch) -> None:
    files = synthetic_series(8)
    source = read(files[4:5])[0]
    at = AppTest.from_function(_page_with_downloads, args=("Head CT",), default_timeout=180)
    at.run()
    at.file_uploader[0].set_value(("a.dcm", files[4], "application/dicom")).run()
    assert not at.exception, at.exception
    made = by_kind(downloads(at))
    assert set(made) == {"sr", "sc", "pdf"}
    datasets = {kind: dcmread(io.BytesIO(data)) for kind, data in made.items()}
    assert [datasets[k].SOPClassUID for k in ("sr", "sc", "pdf")] == [
        ComprehensiveSRStorage, SecondaryCaptureImageStorage, EncapsulatedPDFStorage]
    assert len({ds.StudyInstanceUID for ds in datasets.values()}) == 1  # one study for the three
    for data in made.values():
        for value in (PATIENT["PatientID"], PATIENT["PatientName"], str(source.StudyInstanceUID),
                      str(source.SOPInstanceUID)):
            assert value.encode() not in data
    assert datasets["sc"].pixel_array.shape == (96, 96, 3)
    for ds in datasets.values():
        assert_valid(ds)
    # PACS-ready: the warning, the source's identity and references.
    at.checkbox(key=next(c.key for c in at.checkbox if c.key.startswith("dicom_pacs_"))).check().run()
    assert "carry the patient's name" in "\n".join(w.value for w in at.warning)
    made = by_kind(downloads(at))
    sr, sc = dcmread(io.BytesIO(made["sr"])), dcmread(io.BytesIO(made["sc"]))
    assert sr.PatientID == PATIENT["PatientID"] and sr.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert_valid(sr)


def test_no_pacs_ready_option_for_a_png_upload() -> None:
    at = AppTest.from_function(_page_with_downloads, args=("Head CT",), default_timeout=180)
    at.run()
    at.file_uploader[0].set_value(("a.png", encode(synthetic_slice(160, seed=1)), "image/png")).run()
    if any("Not classified" in w.value for w in at.warning):
        at.checkbox(key=next(c.key for c in at.checkbox if c.key.startswith("override_"))).check().run()
        assert "No DICOM output for a scan the model was not trained for." in page_texts(at)
        return
    assert not any(c.key.startswith("dicom_pacs_") for c in at.checkbox)
    assert "PACS-ready output is made from DICOM uploads only" in page_texts(at)
    sr = dcmread(io.BytesIO(by_kind(downloads(at))["sr"]))
    assert sr.PatientIdentityRemoved == "YES"


def test_study_view_downloads_the_study_call_and_key_slices(tmp_path: Path) -> None:
    files = synthetic_series(8)
    sources = read(files)
    at = AppTest.from_function(_page_with_downloads, args=("Head CT",), default_timeout=180)
    at.run()
    at.file_uploader[0].set_value(("study.zip", zip_files(files), "application/zip")).run()
    assert not at.exception, at.exception
    assert "Send results to archive" not in [b.label for b in at.button]  # an upload, not an archived study
    at.checkbox(key=next(c.key for c in at.checkbox if c.key.startswith("dicom_pacs_"))).check().run()
    made = by_kind(downloads(at))
    sr = dcmread(io.BytesIO(made["sr"]))
    with zipfile.ZipFile(io.BytesIO(made["sc"])) as archive:
        captures = [dcmread(io.BytesIO(archive.read(name))) for name in archive.namelist()]
    analysis = list(at.session_state["study_analyses"].values())[-1]
    assert len(captures) == len(analysis.key_slices) == 3
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for s in item.ReferencedSeriesSequence for ref in s.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID for ds in sources} and sr.StudyInstanceUID == sources[0].StudyInstanceUID
    positions = analysis.series.geometry.positions
    by_z = {round(float(ds.ImagePositionPatient[2]), 3): ds.SOPInstanceUID for ds in sources}
    assert [c.SourceImageSequence[0].ReferencedSOPInstanceUID for c in captures] == [
        by_z[round(float(positions[i]), 3)] for i in analysis.key_slices]
    assert dcmread(io.BytesIO(made["pdf"])).EncapsulatedDocument[:5] == b"%PDF-"
    for ds in (sr, captures[0]):
        assert_valid(ds)


# ---------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api():
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import ApiSettings

    app = create_app(ApiSettings(models=("head_ct",), token=None))
    with TestClient(app) as client:
        assert app.state.registry.wait(120), "models did not load"
        yield client


def test_api_study_formats_read_back_with_pydicom(api) -> None:
    files = synthetic_series(8)
    sources = read(files)
    body = {"file": ("study.zip", zip_files(files), "application/zip")}
    rows = api.post("/v1/studies/head_ct", files=body).json()["series"]
    answer = api.post("/v1/studies/head_ct?format=dicom-sr", files=body)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    sr = dcmread(io.BytesIO(answer.content))
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.PatientIdentityRemoved == "YES"
    assert PATIENT["PatientID"].encode() not in answer.content and str(sources[0].StudyInstanceUID).encode() \
        not in answer.content
    key_text = next(str(e.value) for e in sr.iterall() if e.keyword == "TextValue" and "analysed slices" in str(e.value))
    assert key_text.startswith(", ".join(str(i + 1) for i in rows[0]["key_slices"]))
    assert_valid(sr)
    answer = api.post("/v1/studies/head_ct?format=dicom-sc", files=body)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        captures = [dcmread(io.BytesIO(archive.read(name))) for name in sorted(archive.namelist())]
    assert len(captures) == len(rows[0]["key_slices"]) and all(c.SOPClassUID == SecondaryCaptureImageStorage
                                                               for c in captures)
    ready = dcmread(io.BytesIO(api.post("/v1/studies/head_ct?format=dicom-sr&pacs_ready=true", files=body).content))
    assert ready.StudyInstanceUID == sources[0].StudyInstanceUID and ready.PatientID == PATIENT["PatientID"]


def test_api_study_format_errors(api) -> None:
    answer = api.post("/v1/studies/head_ct?format=dicom-xx", files={"file": ("s.zip", b"PK")})
    assert answer.status_code == 400 and "dicom-sr" in answer.json()["reason"]
    answer = api.post("/v1/studies/head_ct?format=dicom-sr", files={"file": ("s.zip", b"PK\x03\x04 broken")})
    assert answer.status_code == 400 and answer.json()["error"] == "bad_file"
    import nibabel as nib

    from tests.dicom_study import head_ct_slice

    hu = np.stack([head_ct_slice(z, z in (3, 4, 5)).astype(np.int16) - 1024 for z in range(8)], axis=-1)
    nifti = {"file": ("v.nii", nib.Nifti1Image(hu, np.diag([1.6, 1.6, 5.0, 1.0])).to_bytes(), "application/octet-stream")}
    answer = api.post("/v1/studies/head_ct?format=dicom-sr&pacs_ready=true", files=nifti)
    assert answer.status_code == 400 and "pacs_ready needs a DICOM study" in answer.json()["reason"]
    sr = dcmread(io.BytesIO(api.post("/v1/studies/head_ct?format=dicom-sr", files=nifti).content))
    assert sr.SOPClassUID == ComprehensiveSRStorage  # identifier-free, without key slice references


def test_api_single_image_dicom_sr_validates(api) -> None:
    files = synthetic_series(8)
    for query in ("?format=dicom-sr", "?format=dicom-sc", "?format=dicom-sr&pacs_ready=true"):
        answer = api.post(f"/v1/predict/head_ct{query}", files={"file": ("a.dcm", files[4], "application/dicom")})
        assert answer.status_code == 200
        ds = dcmread(io.BytesIO(answer.content))
        assert ds.SOPClassUID in (ComprehensiveSRStorage, SecondaryCaptureImageStorage)
        assert_valid(ds)
