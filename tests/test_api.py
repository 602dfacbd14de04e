"""The HTTP API in-process (FastAPI's TestClient): every endpoint, every error code, the token, the hostile corpus.

Real models answer (head_ct reads the synthetic head-CT slices as in range; brain_mri refuses
synthetic PNGs through its wrong-input guard), and every answer is checked against the pipeline
called directly (`core.pipeline.result_row(name, analyse(...))`).
"""

from __future__ import annotations

import base64
import io
import logging
import subprocess
import sys
import tempfile
from dataclasses import asdict

import cv2
import numpy as np
import pytest
from fastapi import FastAPI, UploadFile
from fastapi.testclient import TestClient
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from api.answers import METHOD_NAMES
from api.errors import finite
from api.app import create_app
from api.registry import ModelRegistry
from api.settings import ApiSettings
from core.explain import METHODS
from core.imaging import ScanError, read_scan
from core.pipeline import Refusal, analyse, prepare, result_row
from core.tasks import TASKS
from tests.conftest import REPO, encode, head_ct_dicom, synthetic_slice
from tests.corpus import CORPUS
from tests.dicom_study import PATIENT, bundled_model, synthetic_series

MODELS = ("head_ct", "brain_mri")
ROW_FIELDS = ("file", "status", "reason", "prediction", "call", "probabilities", "uncertain", "guard")


def start(settings: ApiSettings) -> tuple[TestClient, object]:
    app = create_app(settings)
    client = TestClient(app)
    client.__enter__()
    assert app.state.registry.wait(120), "models did not load"
    return client, app


@pytest.fixture(scope="module")
def served() -> tuple[TestClient, object]:
    client, app = start(ApiSettings(models=MODELS, token=None))
    yield client, app
    client.__exit__(None, None, None)


@pytest.fixture
def client(served) -> TestClient:
    return served[0]


@pytest.fixture(scope="module")
def series() -> list[bytes]:
    return synthetic_series(8)


def post(client: TestClient, key: str, name: str, data: bytes, query: str = "", **kwargs):
    return client.post(f"/v1/predict/{key}{query}", files={"file": (name, data, "application/octet-stream")}, **kwargs)


def same_row(body: dict, expected: dict) -> None:
    """The API's row fields equal the pipeline's row (probabilities to float tolerance)."""
    for field in ROW_FIELDS:
        if field == "probabilities" and expected[field] is not None:
            assert body[field] == pytest.approx(expected[field], abs=1e-6)
        elif field == "guard" and expected[field] is not None:
            assert body[field] == pytest.approx(expected[field], abs=1e-6)
        else:
            assert body[field] == expected[field], field
    for field in ("findings", "present", "unreliable"):
        if field in expected:
            assert body[field] == (pytest.approx(expected[field], abs=1e-6) if field == "findings" else expected[field])


# ---------------------------------------------------------------- health, readiness, models


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": {k: "ready" for k in MODELS}}


def test_not_ready_while_loading_and_503_for_its_models() -> None:
    app = create_app(ApiSettings(models=("brain_mri",)))
    client = TestClient(app)  # no `with`: the app never starts, so its models never load
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["models"] == {"brain_mri": "loading"}
    answer = post(client, "brain_mri", "a.png", encode(synthetic_slice(64)))
    assert answer.status_code == 503 and answer.json()["error"] == "not_ready" and answer.headers["retry-after"]
    assert client.get("/healthz").status_code == 200


def test_a_model_that_fails_to_load_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.models import WeightsError

    def broken(spec):
        raise WeightsError(f"weights file not found: /somewhere/{spec.key}.safetensors")

    monkeypatch.setattr("api.registry.load_model", broken)
    registry = ModelRegistry(("brain_mri",)).load()
    client = TestClient(create_app(ApiSettings(models=("brain_mri",)), registry))
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["models"] == {"brain_mri": "failed"}
    assert "/somewhere" not in ready.text  # server paths stay in the server's log
    answer = post(client, "brain_mri", "a.png", encode(synthetic_slice(64)))
    assert answer.status_code == 503 and "failed to load" in answer.json()["reason"]


def test_models_lists_labels_findings_thresholds_identity_and_figures(client: TestClient) -> None:
    models = {m["key"]: m for m in client.get("/v1/models").json()["models"]}
    assert list(models) == list(MODELS)
    for key in MODELS:
        card, spec = bundled_model(key).card, TASKS[key]
        entry = models[key]
        assert entry["labels"] == list(spec.labels) and entry["status"] == "ready"
        assert (entry["version"], entry["sha256"], entry["name"]) == (card.version, card.sha256, card.name)
        assert entry["threshold"] == card.threshold and entry["positive"] == card.positive
        assert entry["metrics"] == finite(asdict(card)["metrics"])
        assert entry["metrics"], "held-out figures are part of every card"
    head = models["head_ct"]
    assert [f["key"] for f in head["findings"]] == list(TASKS["head_ct"].findings)
    card_findings = asdict(bundled_model("head_ct").card)["findings"]
    assert all(0 < f["threshold"] < 1 and f["threshold"] == card_findings[f["key"]]["threshold"] for f in head["findings"])


def test_model_card_is_the_whole_card(client: TestClient) -> None:
    card = client.get("/v1/models/head_ct/card")
    assert card.status_code == 200
    assert card.json() == finite(asdict(bundled_model("head_ct").card))
    missing = client.get("/v1/models/cxr_covid/card")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_model"
    assert "head_ct, brain_mri" in missing.json()["reason"]


# ---------------------------------------------------------------- predict


def test_predict_gives_the_pipelines_row(client: TestClient, series: list[bytes]) -> None:
    classifier = bundled_model("head_ct")
    for i, data in enumerate(series[:4] + [head_ct_dicom()]):
        name = f"slice{i}.dcm"
        answer = post(client, "head_ct", name, data)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        same_row(body, result_row(name, analyse(classifier, data, name)))
        assert body["status"] == "ok" and body["findings"] and body["model"]["sha256"] == classifier.card.sha256
        assert len(body["digest"]) == 16


def test_raw_body_upload_gives_the_same_answer(client: TestClient, series: list[bytes]) -> None:
    multipart = post(client, "head_ct", "a.dcm", series[2]).json()
    raw = client.post("/v1/predict/head_ct?filename=a.dcm", content=series[2],
                      headers={"Content-Type": "application/dicom"}).json()
    assert raw["probabilities"] == pytest.approx(multipart["probabilities"], abs=1e-6)
    assert raw["file"] == "a.dcm" and raw["call"] == multipart["call"]


def colour_photo(side: int, seed: int) -> bytes:
    """A colour picture (the guard refuses colour: scans are grey), whatever the bundled weights."""
    grey = synthetic_slice(side, seed=seed)
    return encode(np.stack([grey, np.roll(grey, side // 5, axis=1), 255 - grey], axis=-1))


def test_guard_refusal_is_422_with_the_guards_reason(client: TestClient) -> None:
    data = colour_photo(200, seed=4)
    answer = post(client, "brain_mri", "photo.png", data)
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "out_of_range" and body["reason"].startswith("Not classified")
    assert body["guard"]["outcome"] == "out_of_range"
    same_row(body, result_row("photo.png", analyse(bundled_model("brain_mri"), data, "photo.png")))


def test_heatmap_adds_overlay_raw_map_and_faithfulness(client: TestClient, series: list[bytes]) -> None:
    data = series[4]
    answer = post(client, "head_ct", "a.dcm", data, "?heatmap=gradcam&target=hemorrhage")
    assert answer.status_code == 200, answer.text
    heatmap = answer.json()["heatmap"]
    assert heatmap["method"] == "Grad-CAM" and heatmap["target"] == "hemorrhage"
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(heatmap["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (*read_scan(data).shape, 3)
    raw = cv2.imdecode(np.frombuffer(base64.b64decode(heatmap["map_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    size = TASKS["head_ct"].input_size
    assert raw.shape == (size, size) and raw.dtype == np.uint8 and heatmap["map_size"] == size
    analysis = analyse(bundled_model("head_ct"), data, "a.dcm")
    expected = analysis.heatmap("hemorrhage", "Grad-CAM").model_map
    assert np.abs(raw / 255.0 - expected).max() <= 1 / 255 + 1e-3
    faithfulness = analysis.faithfulness("hemorrhage", "Grad-CAM")
    assert heatmap["faithfulness"]["score"] == pytest.approx(faithfulness.score, abs=1e-3)
    assert heatmap["faithfulness"]["reading"].startswith("Faithfulness (ROAD)")


def test_heatmap_method_names_and_finding_targets(client: TestClient, series: list[bytes]) -> None:
    assert set(METHOD_NAMES.values()) == set(METHODS)
    # "+" unescaped in a query string arrives as a space: still Grad-CAM++, not Grad-CAM
    plain = post(client, "head_ct", "a.dcm", series[3], "?heatmap=gradcam++&target=sdh").json()["heatmap"]
    escaped = post(client, "head_ct", "a.dcm", series[3], "?heatmap=gradcam%2B%2B&target=sdh").json()["heatmap"]
    assert plain["method"] == escaped["method"] == "Grad-CAM++" and plain["target"] == "sdh"
    default = post(client, "head_ct", "a.dcm", series[3], "?heatmap=Grad-CAM").json()
    assert default["heatmap"]["target"] == default["prediction"]


@pytest.mark.parametrize("query, words", [
    ("?heatmap=sobel", "gradcam, gradcam++"),
    ("?heatmap=gradcam&target=tumour", "normal, hemorrhage, ivh"),
    ("?format=png", "json, dicom-sr, dicom-sc"),
    ("?heatmap=gradcam&colormap=rainbow", "jet"),
    ("?heatmap=gradcam&opacity=2", "between 0 and 1"),
    ("?opacity=lots", "opacity"),
    ("?pacs_ready=true", "dicom-sr or dicom-sc"),
])
def test_bad_parameters_are_400_naming_the_choices(client: TestClient, series: list[bytes], query: str, words: str) -> None:
    answer = post(client, "head_ct", "a.dcm", series[0], query)
    assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
    assert words in answer.json()["reason"]


# ---------------------------------------------------------------- DICOM outputs


def test_dicom_sr_and_sc_are_identifier_free_by_default(client: TestClient, series: list[bytes]) -> None:
    source = dcmread(io.BytesIO(series[4]))
    for fmt, sop in (("dicom-sr", ComprehensiveSRStorage), ("dicom-sc", SecondaryCaptureImageStorage)):
        answer = post(client, "head_ct", "a.dcm", series[4], f"?format={fmt}")
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
        assert answer.headers["content-disposition"].startswith("attachment; filename=\"secondlook-head_ct-")
        ds = dcmread(io.BytesIO(answer.content))
        assert ds.SOPClassUID == sop
        assert not str(ds.get("PatientName", "")) and not ds.get("PatientID")
        text = answer.content
        for value in (PATIENT["PatientID"], PATIENT["AccessionNumber"], str(source.StudyInstanceUID),
                      str(source.SOPInstanceUID)):
            assert value.encode() not in text
    sc = dcmread(io.BytesIO(post(client, "head_ct", "a.dcm", series[4], "?format=dicom-sc").content))
    assert sc.pixel_array.shape == (*read_scan(series[4]).shape, 3)


def test_dicom_pacs_ready_copies_identity_and_references_the_source(client: TestClient, series: list[bytes]) -> None:
    source = dcmread(io.BytesIO(series[4]))
    answer = post(client, "head_ct", "a.dcm", series[4], "?format=dicom-sr&pacs_ready=true")
    ds = dcmread(io.BytesIO(answer.content))
    assert ds.PatientID == PATIENT["PatientID"] and ds.StudyInstanceUID == source.StudyInstanceUID
    assert str(source.SOPInstanceUID).encode() in answer.content
    png = post(client, "head_ct", "a.png", encode(synthetic_slice(96)), "?format=dicom-sr&pacs_ready=true")
    assert png.status_code in (400, 422)


def test_no_dicom_result_for_a_refused_scan(client: TestClient) -> None:
    answer = post(client, "brain_mri", "a.png", colour_photo(128, seed=2), "?format=dicom-sr")
    assert answer.status_code == 422 and answer.headers["content-type"].startswith("application/json")


# ---------------------------------------------------------------- errors


def test_bad_files_get_400_413_415(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    png = encode(synthetic_slice(128))
    cases = {
        "empty.png": (b"", 400, "bad_file"),
        "cut.png": (png[: len(png) // 2], 400, "bad_file"),
        "anim.gif": (b"GIF89a" + bytes(200), 415, "unsupported_type"),
        "notes.png": (b"Follow up in two weeks.\n" * 20, 415, "unsupported_type"),
        "huge.png": (CORPUS["declared_huge_but_small"][1](), 413, "too_large"),  # 80 MP declared
    }
    for name, (data, status, error) in cases.items():
        answer = post(client, "brain_mri", name, data)
        assert answer.status_code == status, (name, answer.text)
        body = answer.json()
        assert body["error"] == error and body["status"] == "rejected" and body["reason"][0].isupper()
        assert body["file"] == name
    monkeypatch.setattr("core.imaging.MAX_UPLOAD_BYTES", 1000)  # the core's own 200 MB limit, made small
    answer = post(client, "brain_mri", "big.png", png)
    assert answer.status_code == 413 and "not accepted" in answer.json()["reason"]


def test_request_over_the_size_setting_is_413_before_it_is_read() -> None:
    client, app = start(ApiSettings(models=("brain_mri",), max_request_bytes=50_000))
    try:
        big = encode(np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8))
        assert len(big) > 50_000
        answer = post(client, "brain_mri", "big.png", big)
        assert answer.status_code == 413 and answer.json()["error"] == "too_large"

        def chunks():  # no Content-Length: the cap holds while the body streams
            for start in range(0, len(big), 8192):
                yield big[start:start + 8192]

        streamed = client.post("/v1/predict/brain_mri", content=chunks(), headers={"Content-Type": "image/png"})
        assert streamed.status_code == 413
        assert app.state.capacity.active == 0
    finally:
        client.__exit__(None, None, None)


def test_bodies_that_carry_no_file(client: TestClient) -> None:
    wrong_type = client.post("/v1/predict/brain_mri", content=b'{"image": "x"}',
                             headers={"Content-Type": "application/json"})
    assert wrong_type.status_code == 415 and "multipart/form-data" in wrong_type.json()["reason"]
    no_file = client.post("/v1/predict/brain_mri", data={"note": "hello"}, files={"other": ("a.png", b"x")})
    assert no_file.status_code == 400 and "'file'" in no_file.json()["reason"]
    broken = client.post("/v1/predict/brain_mri", content=b"--xyz\r\nnonsense",
                         headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert broken.status_code == 400
    no_boundary = client.post("/v1/predict/brain_mri", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 400


def test_unknown_model_and_path_are_404(client: TestClient) -> None:
    for key in ("nope", "cxr_covid"):  # unknown, and known but not served here
        answer = post(client, key, "a.png", encode(synthetic_slice(64)))
        assert answer.status_code == 404 and answer.json()["error"] == "unknown_model"
        assert "head_ct, brain_mri" in answer.json()["reason"]
    missing = client.get("/v2/anything")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "reason": "No such path here; the endpoints are listed at /docs."}
    assert client.get("/v1/predict/head_ct").status_code == 405


def test_over_the_concurrency_limit_is_429(served, series: list[bytes]) -> None:
    client, app = served
    capacity = app.state.capacity
    capacity.active = capacity.limit  # as if that many uploads were in progress
    try:
        answer = post(client, "head_ct", "a.dcm", series[0])
        assert answer.status_code == 429 and answer.json()["error"] == "over_capacity" and answer.headers["retry-after"]
        assert client.get("/v1/models").status_code == 200  # only uploads count
    finally:
        capacity.active = 0
    assert post(client, "head_ct", "a.dcm", series[0]).status_code == 200
    assert capacity.active == 0


def test_token_is_required_when_set(series: list[bytes]) -> None:
    client, _ = start(ApiSettings(models=("head_ct",), token="s3cret-token"))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"},
                        {"Authorization": "Bearer s3cret-token-and-more"}):
            for method, path in (("post", "/v1/predict/head_ct"), ("get", "/v1/models"), ("get", "/metrics"),
                                 ("get", "/v1/models/head_ct/card"), ("post", "/v1/studies/head_ct")):
                kwargs = {"files": {"file": ("a.dcm", series[0])}} if method == "post" else {}
                answer = getattr(client, method)(path, headers=headers, **kwargs)
                assert answer.status_code == 401, (headers, path)
                assert answer.json()["error"] == "unauthorized" and answer.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/v1/predict/head_ct", headers=good, files={"file": ("a.dcm", series[0])}).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_cors_is_off_by_default_and_on_when_set(client: TestClient) -> None:
    preflight = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/models", headers=preflight).headers
    plain = client.get("/v1/models", headers={"Origin": "https://viewer.example"})
    assert "access-control-allow-origin" not in plain.headers
    allowed = TestClient(create_app(ApiSettings(models=("brain_mri",), cors_origins="https://viewer.example")))
    answer = allowed.options("/v1/models", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "https://viewer.example"


def test_studies_404_until_the_study_pipeline_exists(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("api.app.study_module", lambda: None)
    answer = client.post("/v1/studies/head_ct", files={"file": ("study.zip", b"PK\x05\x06" + bytes(18))})
    assert answer.status_code == 404 and answer.json()["error"] == "not_available"
    assert "/v1/predict/" in answer.json()["reason"]


def test_studies_call_the_study_pipeline_once_it_exists(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Study:  # stands for core.study: the API's wiring is what is tested here
        @staticmethod
        def study_rows(classifier, data: bytes, filename: str) -> list[dict]:
            calls.append((classifier.spec.key, data, filename))
            return [{"file": filename, "series": "1.2.3", "status": "ok", "slices": 8}]

    monkeypatch.setattr("api.app.study_module", lambda: Study)
    answer = client.post("/v1/studies/head_ct", files={"file": ("study.zip", b"zip-bytes")})
    assert answer.status_code == 200
    assert answer.json()["series"] == [{"file": "study.zip", "series": "1.2.3", "status": "ok", "slices": 8}]
    assert calls == [("head_ct", b"zip-bytes", "study.zip")]
    assert client.post("/v1/studies/nope", files={"file": ("s.zip", b"x")}).status_code == 404


# ---------------------------------------------------------------- hostile uploads, disk, logs, metrics


# The status some corpus cases must get: the kind of refusal, not only that there is one.
CORPUS_STATUS = {"zero_bytes": 400, "truncated_png": 400, "blank": 400, "decompression_bomb": 413,
                 "declared_huge_but_small": 413, "dicom_header_over_budget": 413, "dicom_rle_bomb": 400,
                 "pdf_as_png": 415, "zip_archive": 415, "animated_gif": 415, "dicom_no_pixels": 415,
                 "dicom_unknown_transfer_syntax": 415}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_corpus_never_gives_a_500(client: TestClient, case: str) -> None:
    filename, make, expected = CORPUS[case]
    answer = post(client, "brain_mri", filename, make())
    assert answer.status_code in (200, 400, 413, 415, 422), (case, answer.status_code, answer.text[:300])
    if case in CORPUS_STATUS:
        assert answer.status_code == CORPUS_STATUS[case], (case, answer.json()["reason"])
    body = answer.json()
    assert body["file"] == filename and body["status"] in ("ok", "rejected")
    if expected == "ok":
        assert answer.status_code in (200, 422), (case, body["reason"])
    elif expected == "refused":
        assert answer.status_code in (400, 413, 415) and body["reason"], (case, body)


@pytest.fixture
def no_disk(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any temporary file, or an in-memory spool rolling over to disk, fails the request and is recorded."""
    attempts: list[str] = []

    def refuse(name: str):
        def call(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"{name}: nothing may be written to disk")
        return call

    for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse(name))
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", refuse("SpooledTemporaryFile.rollover"))
    return attempts


def test_uploads_over_one_megabyte_stay_in_memory(client: TestClient, no_disk: list[str]) -> None:
    big = encode(np.random.default_rng(3).integers(0, 255, (1200, 1200), dtype=np.uint8))
    assert len(big) > 1.2 * 2**20  # over Starlette's 1 MB spool limit
    answer = post(client, "brain_mri", "big.png", big)
    assert answer.status_code in (200, 422) and answer.json()["reason"]
    raw = client.post("/v1/predict/brain_mri", content=big, headers={"Content-Type": "image/png"})
    assert raw.status_code == answer.status_code
    assert no_disk == []


def test_the_disk_probe_catches_starlettes_own_spooling(no_disk: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: FastAPI's usual UploadFile parsing of the same file would have spooled it to disk."""
    from starlette.formparsers import MultiPartParser
    # The Streamlit app raises this limit process-wide (ui.cache); the control needs Starlette's default.
    monkeypatch.setattr(MultiPartParser, "spool_max_size", 2**20)
    app = FastAPI()

    @app.post("/upload")
    async def upload(file: UploadFile) -> dict:
        return {"size": len(await file.read())}

    big = encode(np.random.default_rng(3).integers(0, 255, (1200, 1200), dtype=np.uint8))
    answer = TestClient(app).post("/upload", files={"file": ("big.png", big)})
    assert answer.status_code == 400  # FastAPI reports the refused spool as a body it could not parse
    assert "SpooledTemporaryFile.rollover" in no_disk


def test_logs_carry_hashes_not_names_or_tags(client: TestClient, series: list[bytes],
                                             caplog: pytest.LogCaptureFixture) -> None:
    name = "Secret^Patient_ID-12345.dcm"
    with caplog.at_level(logging.DEBUG):
        body = post(client, "head_ct", name, series[5], "?heatmap=gradcam").json()
        post(client, "brain_mri", name, b"GIF89a" + bytes(100))
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert body["digest"] in text
    for secret in ("Secret", "12345", PATIENT["AccessionNumber"], PATIENT["InstitutionName"], "General Hospital"):
        assert secret not in text


def test_metrics_count_requests_latency_and_rejections(client: TestClient, series: list[bytes]) -> None:
    post(client, "head_ct", "a.dcm", series[1])
    post(client, "brain_mri", "a.gif", b"GIF89a" + bytes(100))
    text = client.get("/metrics").text
    assert 'secondlook_api_requests_total{endpoint="/v1/predict/{key}",model="head_ct",status="200"}' in text
    assert 'secondlook_api_request_seconds_bucket{endpoint="/v1/predict/{key}",le="0.5",model="head_ct"}' in text
    assert 'secondlook_api_rejections_total{reason="unsupported_type"}' in text
    count = [line for line in text.splitlines()
             if line.startswith('secondlook_api_request_seconds_count{endpoint="/v1/predict/{key}",model="head_ct"}')]
    assert count and float(count[0].split()[-1]) >= 1
    assert 'model="nope"' not in client.get("/metrics").text  # labels never come from the client's text


def test_replica_header_and_openapi_docs(client: TestClient) -> None:
    assert client.get("/healthz").headers["x-secondlook-replica"]
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict/{key}"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    paths = {"/v1/models", "/v1/models/{key}/card", "/v1/studies/{key}", "/healthz", "/readyz", "/metrics"}
    assert paths <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------- settings, command line, the core's error kinds


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECONDLOOK_API_MODELS", "head_ct, brain_mri")
    monkeypatch.setenv("SECONDLOOK_API_TOKEN", "abc")
    monkeypatch.setenv("SECONDLOOK_API_MAX_CONCURRENT_REQUESTS", "3")
    settings = ApiSettings()
    assert settings.models == ("head_ct", "brain_mri") and settings.token.get_secret_value() == "abc"
    assert settings.max_concurrent_requests == 3 and settings.cors_origins == ()
    assert "abc" not in repr(settings)
    monkeypatch.setenv("SECONDLOOK_API_TOKEN", "  ")
    assert ApiSettings().token is None
    monkeypatch.setenv("SECONDLOOK_API_MODELS", "head_ct,lungs")
    with pytest.raises(ValidationError, match="unknown models.*brain_mri"):
        ApiSettings()


def test_command_line_refuses_bad_settings_with_the_reason() -> None:
    result = subprocess.run([sys.executable, "-m", "api", "--port", "1"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**__import__("os").environ, "SECONDLOOK_API_MODELS": "lungs"})
    assert result.returncode == 2 and "unknown models" in result.stderr and "Traceback" not in result.stderr


def test_scan_errors_say_their_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = {"zero_bytes": "unreadable", "text_as_png": "unsupported_format", "pdf_as_png": "unsupported_format"}
    for case, kind in kinds.items():
        filename, make, _ = CORPUS[case]
        with pytest.raises(ScanError) as caught:
            read_scan(make(), filename)
        assert caught.value.kind == kind, case
    with pytest.raises(ValueError, match="unknown ScanError kind"):
        ScanError("x", kind="weird")
    import pickle

    again = pickle.loads(pickle.dumps(ScanError("The file is too big.", kind="too_large")))
    assert again.kind == "too_large" and str(again) == "The file is too big."
    monkeypatch.setattr("core.imaging.MAX_UPLOAD_BYTES", 10)
    refused = prepare(encode(synthetic_slice(64)), "a.png", bundled_model("brain_mri"))
    assert isinstance(refused, Refusal) and refused.kind == "too_large" and refused.status == "rejected"
