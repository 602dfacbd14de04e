"""The FastAPI app: `create_app()` builds it; uvicorn (`python -m api`) and Ray Serve (`api.serve`) run it.

Endpoints (OpenAPI docs at /docs):

- `GET /v1/models`: every served model with labels, findings, thresholds, version, sha256 and its
  card's held-out figures; `GET /v1/models/{key}/card`: the whole card.
- `POST /v1/predict/{key}`: one scan (multipart field `file`, or the raw bytes) -> the
  `python -m core.predict` row; `?heatmap=gradcam&target=CLASS` adds the heatmap;
  `?format=dicom-sr|dicom-sc` answers with a DICOM file instead.
- `POST /v1/studies/{key}`: a study (ZIP of DICOM files, NIfTI), once `core.study` exists: one row per series;
  `?format=dicom-sr` answers with the structured report of the default series (study call, key
  slices), `?format=dicom-sc` with a ZIP of its key slices' overlay captures.
- `GET /healthz` (the process answers), `GET /readyz` (every model loaded), `GET /metrics`.

Uploads are read into memory only (`api.uploads`), analysed in a worker thread by
`core.pipeline`, and dropped with the answer; logs carry the upload's short hash, never its
name, pixels or tags.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import importlib
import importlib.util
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import threads
from core.explain import COLORMAPS
from core.tasks import get_task

from api.answers import FORMATS, METHOD_NAMES, Answer, Options, answer, method_of, model_identity, study_dicom_answer
from api.errors import ApiError, SafeJSONResponse
from api.metrics import Instrumented, Metrics
from api.registry import ModelRegistry
from api.settings import ApiSettings
from api.uploads import read_upload

logger = logging.getLogger(__name__)

VERSION = "1"
STUDY_MODULE = "core.study"

# The request body of the upload endpoints, for the OpenAPI docs (the body is read by api.uploads, not by FastAPI,
# which would spool files over 1 MB to disk).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}},
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERROR_RESPONSES = {code: {"description": text, "model": None} for code, text in {
    400: "bad file or parameter", 401: "no valid bearer token", 404: "unknown model", 413: "too large",
    415: "unsupported type", 422: "scan refused by the wrong-input guard", 429: "over the concurrency limit",
    503: "model not loaded yet"}.items()}


class Capacity:
    """Uploads in progress in this process (running, or waiting for a core); over the limit: 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    async def admit(self) -> AsyncIterator[None]:
        if self.active >= self.limit:
            raise ApiError(429, "over_capacity", f"The server is working on {self.active} uploads, its limit; "
                                                 "retry in a moment.", headers={"Retry-After": "1"})
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class Analysts:
    """The threads that analyse uploads: as many as the thread policy runs computations at once.

    Uploads beyond that wait here, as bytes, not in threads of their own: every thread that has
    run a model keeps its own malloc arena (and OpenMP team). Measured with 16 clients asking for
    heatmaps: on Starlette's thread pool (up to 40 threads) the server held 2.6 GB after one
    round and 3.4 GB after the next, still growing; on 2 threads, 1.3 GB both times.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, function: Callable, *args: object) -> object:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=threads.policy().concurrency, thread_name_prefix="analysis")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def process_name() -> str:
    """This process's name in the replica header: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _token_check(settings: ApiSettings) -> Callable[[Request], None]:
    expected = hashlib.sha256(settings.token.get_secret_value().encode()).digest() if settings.token else None

    def require_token(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Hashing first makes the comparison's time independent of the token's length too.
        given_hash = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_hash, expected):
            raise ApiError(401, "unauthorized", "A valid bearer token is required (Authorization: Bearer <token>).",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_token


def model_entry(registry: ModelRegistry, key: str) -> dict:
    """One model for /v1/models: registry facts, and the card's identity, thresholds and held-out figures once loaded."""
    spec = get_task(key)
    status = registry.status()[key]
    entry = {"key": key, "title": spec.title, "page": spec.page, "status": status, "labels": list(spec.labels),
             "findings": [{"key": f, "title": t} for f, t in zip(spec.findings, spec.finding_titles)],
             "modalities": list(spec.modalities)}
    classifier = registry.loaded_model(key)
    if classifier is None:
        return entry
    card = classifier.card
    card_findings = asdict(card).get("findings") or {}
    for finding in entry["findings"]:
        finding["threshold"] = (card_findings.get(finding["key"]) or {}).get("threshold")
    entry.update(model_identity(classifier), positive=card.positive, threshold=card.threshold,
                 metrics=jsonable_encoder(card.metrics))
    return entry


def study_module() -> object | None:
    """`core.study` where this version has it (the study pipeline), else None."""
    if importlib.util.find_spec(STUDY_MODULE) is None:
        return None
    return importlib.import_module(STUDY_MODULE)


def create_app(settings: ApiSettings | None = None, registry: ModelRegistry | None = None,
               replica: Callable[[], str] | None = None) -> FastAPI:
    """Build the API.

    Args:
        settings: Default: read from the environment (`api.settings`).
        registry: Models already loaded (a Ray Serve replica loads them in its constructor); default:
            the configured models, loaded in the background when the app starts.
        replica: Names whoever answers, for the `X-SecondLook-Replica` header (default: host and pid).

    Returns:
        The ASGI app.
    """
    settings = settings or ApiSettings()
    registry = registry or ModelRegistry(settings.models)
    metrics = Metrics()
    capacity = Capacity(settings.max_concurrent_requests)
    analysts = Analysts()
    require_token = _token_check(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.token is None:
            logger.warning("SECONDLOOK_API_TOKEN is not set: the API answers every client that can reach it")
        registry.start()
        yield
        analysts.shutdown()

    app = FastAPI(title="SecondLook API", version=VERSION, lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="A second opinion on medical images over HTTP: the same pipeline, models and decisions "
                              "as the SecondLook app. Research use only; not a medical device.")
    app.state.settings, app.state.registry, app.state.metrics, app.state.capacity = settings, registry, metrics, capacity

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        if exc.status >= 400 and exc.status != 500:
            metrics.rejections.labels(exc.error).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in exc.errors()[:5])
        return await api_error(_, ApiError(400, "bad_request", f"Bad parameters: {problems}."))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        known = {404: ("not_found", "No such path here; the endpoints are listed at /docs."),
                 405: ("method_not_allowed", "This path does not take that method; see /docs.")}
        error, reason = known.get(exc.status_code, ("http_error", str(exc.detail)))
        return await api_error(_, ApiError(exc.status_code, error, reason, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def failure(_: Request, exc: Exception) -> Response:
        logger.error("request failed: %s", type(exc).__name__)  # the type only: messages may quote a file's contents
        return ApiError(500, "internal_error", f"internal error: {type(exc).__name__}").response()

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @v1.get("/models", summary="Every served model")
    def list_models() -> dict:
        """Every model this server serves: labels, findings, thresholds, version, sha256, held-out figures."""
        return {"models": [model_entry(registry, key) for key in registry.keys]}

    @v1.get("/models/{key}/card", summary="A model's whole card")
    def model_card(key: str) -> dict:
        """The model card (JSON) of a served model, as bundled beside its weights."""
        return jsonable_encoder(asdict(registry.get(key).card))

    def dicom_or_json(result: Answer) -> Response:
        """A DICOM (or ZIP) attachment, or the JSON body."""
        if result.dicom is not None:
            return Response(result.dicom, media_type=result.media_type,
                            headers={"Content-Disposition": f'attachment; filename="{result.filename}"'})
        return SafeJSONResponse(result.body)

    @v1.post("/predict/{key}", summary="Predict one scan", openapi_extra=UPLOAD_BODY, responses=ERROR_RESPONSES,
             dependencies=[Depends(capacity.admit)])
    async def predict(
        key: str,
        request: Request,
        heatmap: str | None = Query(None, description=f"add a heatmap by this CAM method: {', '.join(METHOD_NAMES)} "
                                                      "(write + as %2B)"),
        target: str | None = Query(None, description="output to explain (a class or finding; default: the call)"),
        format: str = Query("json", description=f"one of {', '.join(FORMATS)}: the JSON row, or a DICOM "
                                                "structured report / secondary capture of the heatmap overlay"),
        colormap: str = Query("jet", description=f"overlay colormap: {', '.join(COLORMAPS)}"),
        opacity: float = Query(0.4, description="overlay opacity in [0, 1]"),
        pacs_ready: bool = Query(False, description="DICOM output with the source DICOM's patient and study "
                                                    "identifiers and references (default: identifier-free)"),
        filename: str | None = Query(None, description="the file's name for a raw-body upload (a .dcm hint)"),
    ) -> Response:
        """One scan -> the `python -m core.predict` row (file, status, reason, prediction, call, probabilities,
        uncertain, guard; findings, present, unreliable for multi-label models), with the model and the upload's
        short hash."""
        classifier = registry.get(key)
        options = Options(method=method_of(heatmap), target=target, format=format, colormap=colormap,
                          opacity=opacity, pacs_ready=pacs_ready)
        options.check(classifier)
        upload = await read_upload(request.headers, request.stream(), settings.max_request_bytes, filename)
        result = await analysts.run(answer, classifier, upload, options)
        return dicom_or_json(result)

    @v1.post("/studies/{key}", summary="Predict one study (once the study pipeline is there)",
             openapi_extra=UPLOAD_BODY, responses=ERROR_RESPONSES, dependencies=[Depends(capacity.admit)])
    async def predict_study(
        key: str,
        request: Request,
        filename: str | None = Query(None),
        format: str = Query("json", description=f"one of {', '.join(FORMATS)}: one row per series, or for the "
                                                "series the model reads by default its DICOM structured report "
                                                "(study call, key slices) / a ZIP of its key slices' overlay captures"),
        heatmap: str | None = Query(None, description="CAM method of the key slices' captures (default: the card's "
                                                      "most faithful)"),
        target: str | None = Query(None, description="output the captures explain (default: the call)"),
        pacs_ready: bool = Query(False, description="DICOM output with the study's patient and study identifiers "
                                                    "and references (default: identifier-free)"),
    ) -> Response:
        """A study (a ZIP of DICOM files, or NIfTI) -> one row per series, as `python -m core.predict --study`."""
        module = study_module()
        if module is None:
            raise ApiError(404, "not_available", "Studies are not served by this version yet; send one image at a "
                                                 "time to /v1/predict/{key}.")
        classifier = registry.get(key)
        options = Options(method=method_of(heatmap), target=target, format=format, pacs_ready=pacs_ready)
        options.check(classifier)
        upload = await read_upload(request.headers, request.stream(), settings.max_request_bytes, filename)
        if options.format != "json":
            return dicom_or_json(await analysts.run(study_dicom_answer, classifier, upload, options))
        rows = await analysts.run(module.study_rows, classifier, upload.data, upload.filename or "")
        return SafeJSONResponse({"model": model_identity(classifier), "series": rows})

    app.include_router(v1)

    @app.get("/healthz", summary="The process answers")
    def healthz() -> dict:
        """200 while the process runs (models may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Every model loaded", responses={503: {"description": "not every model is loaded"}})
    def readyz() -> Response:
        """200 once every configured model is loaded; 503 (with each model's state) before, or if one failed."""
        status = registry.status()
        ready = all(state == "ready" for state in status.values())
        return SafeJSONResponse({"status": "ready" if ready else "not_ready", "models": status},
                                status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(require_token)])
    def prometheus() -> Response:
        """Requests, latency per endpoint and model, rejections by reason (Prometheus text format)."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Instrumented, metrics=metrics, replica=replica or process_name)
    return app
