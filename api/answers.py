"""What the API answers for one upload: the `core.predict` row, the heatmap, the DICOM outputs (of a scan or a study).

Everything here runs in a worker thread (the model computations inside `core.threads` slots);
every decision comes from `core.pipeline` (`analyse`, `result_row`) and every DICOM byte from
`core.dicom_out`: this module only packs them for HTTP.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from core.dicom_out import Overlay, OutputError, build_outputs, summary_from_prediction, to_bytes
from core.explain import COLORMAPS, DEFAULT_METHOD, METHODS, overlay
from core.imaging import ScanError, is_dicom, parse_dicom
from core.models import Classifier
from core.pipeline import Analysis, Refusal, analyse, result_row
from core.preprocess import display_rgb

from api.errors import ApiError
from api.uploads import Upload

logger = logging.getLogger(__name__)

# The API's names of the CAM methods, made from core.explain's: "Grad-CAM++" -> "gradcam++".
METHOD_NAMES: dict[str, str] = {method.lower().replace("-", ""): method for method in METHODS}
FORMATS: tuple[str, ...] = ("json", "dicom-sr", "dicom-sc")

# A refused file's ScanError kind -> (status, error code).
REFUSALS: dict[str, tuple[int, str]] = {
    "unreadable": (400, "bad_file"),
    "too_large": (413, "too_large"),
    "unsupported_format": (415, "unsupported_type"),
}


def method_of(name: str | None) -> str | None:
    """The CAM method a query parameter names ("gradcam", "Grad-CAM++", ...), or None when absent.

    A "+" in a query string decodes to a space ("gradcam++" sent unescaped arrives as
    "gradcam  "); method names have no spaces, so spaces are read back as "+".

    Raises:
        ApiError: 400 for an unknown method, listing the valid names.
    """
    if name is None or not name.strip():
        return None
    wanted = name.replace(" ", "+").lower().replace("-", "")
    if wanted in METHOD_NAMES:
        return METHOD_NAMES[wanted]
    raise ApiError(400, "bad_request", f"Unknown heatmap method; one of {', '.join(METHOD_NAMES)} "
                                       f"(write + as %2B in a URL).")


@dataclass(frozen=True)
class Options:
    """What the request asks for beyond the prediction.

    Attributes:
        method: CAM method for the heatmap (None: no heatmap unless the format needs one).
        target: Output to explain (None: the call).
        format: "json", "dicom-sr" or "dicom-sc".
        colormap: Overlay colormap (`core.explain.COLORMAPS`).
        opacity: Overlay opacity in [0, 1].
        pacs_ready: DICOM outputs with the source's identifiers and references (DICOM uploads only).
    """

    method: str | None = None
    target: str | None = None
    format: str = "json"
    colormap: str = "jet"
    opacity: float = 0.4
    pacs_ready: bool = False

    def check(self, classifier: Classifier) -> None:
        """Refuse parameters this model cannot take, before the upload is read.

        Raises:
            ApiError: 400 naming the valid choices.
        """
        spec = classifier.spec
        if self.target is not None and self.target not in spec.outputs:
            raise ApiError(400, "bad_request", f"Unknown target for {spec.key}; one of {', '.join(spec.outputs)}.")
        if self.format not in FORMATS:
            raise ApiError(400, "bad_request", f"Unknown format; one of {', '.join(FORMATS)}.")
        if self.colormap not in COLORMAPS:
            raise ApiError(400, "bad_request", f"Unknown colormap; one of {', '.join(COLORMAPS)}.")
        if not 0.0 <= self.opacity <= 1.0:
            raise ApiError(400, "bad_request", "opacity must lie between 0 and 1.")
        if self.pacs_ready and self.format == "json":
            raise ApiError(400, "bad_request", "pacs_ready applies to format=dicom-sr or dicom-sc only.")


def model_identity(classifier: Classifier) -> dict:
    """The model that answered: key, card name, version and weights sha256."""
    card = classifier.card
    return {"key": classifier.spec.key, "name": card.name, "version": card.version, "sha256": card.sha256}


def refusal_error(row: dict, outcome: Analysis | Refusal, classifier: Classifier) -> ApiError:
    """The error for a row that is not ok: 400 / 413 / 415 for a file, 422 for the guard, 500 for a failure here."""
    body = {**row, "model": model_identity(classifier)}
    if isinstance(outcome, Refusal):
        body["digest"] = outcome.digest
        if outcome.status == "error":
            return ApiError(500, "internal_error", outcome.reason, body)
        status, error = REFUSALS.get(outcome.kind, (400, "bad_file"))
        return ApiError(status, error, outcome.reason, body)
    body["digest"] = outcome.digest
    return ApiError(422, "out_of_range", row["reason"], body)


def png_base64(image: np.ndarray) -> str:
    """A uint8 (H, W) or RGB (H, W, 3) array as a base64 PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def blended(analysis: Analysis, target: str, method: str, colormap: str, opacity: float) -> np.ndarray:
    """The heatmap over the scan as shown (the task page's overlay); outside the model's crop the image as it is."""
    heatmap = analysis.heatmap(target, method)
    rgb = display_rgb(analysis.scan)
    image = overlay(rgb, heatmap.placed, opacity, colormap)
    image[heatmap.outside] = rgb[heatmap.outside]
    return image


def heatmap_fields(analysis: Analysis, options: Options) -> dict:
    """The heatmap part of the JSON answer: overlay PNG, the model-resolution map as an 8-bit PNG, faithfulness."""
    target = options.target or analysis.prediction.label
    method = options.method or DEFAULT_METHOD
    heatmap = analysis.heatmap(target, method)
    faithfulness = analysis.faithfulness(target, method)
    size = heatmap.model_map.shape[0]
    return {
        "method": method,
        "target": target,
        "empty": heatmap.empty,
        "overlay_png": png_base64(blended(analysis, target, method, options.colormap, options.opacity)),
        "map_png": png_base64(np.round(np.clip(heatmap.model_map, 0.0, 1.0) * 255).astype(np.uint8)),
        "map_size": size,
        "region": [int(v) for v in analysis.input.region],
        "faithfulness": {**{k: float(v) for k, v in asdict(faithfulness).items()},
                         "reading": faithfulness.reading(target)},
    }


def dicom_answer(analysis: Analysis, upload: Upload, options: Options) -> tuple[bytes, str]:
    """(DICOM Part 10 bytes, file name) of the SR or the overlay's secondary capture (`core.dicom_out`).

    Identifier-free unless `pacs_ready` (then the source DICOM's identifiers and references are copied).

    Raises:
        ApiError: 400 for pacs_ready without a DICOM upload; 500 if an output fails its checks.
    """
    sources = ()
    if is_dicom(upload.data, upload.filename):
        try:
            sources = (parse_dicom(upload.data, stop_before_pixels=True),)
        except ScanError:
            sources = ()
    if options.pacs_ready and not sources:
        raise ApiError(400, "bad_request", "pacs_ready needs a DICOM upload (its identifiers are what it copies).")
    overlays = []
    if options.format == "dicom-sc":
        target = options.target or analysis.prediction.label
        method = options.method or DEFAULT_METHOD
        image = blended(analysis, target, method, options.colormap, options.opacity)
        overlays.append(Overlay(image, 0 if sources else None, f"{method} for '{target}'"))
    try:
        summary = summary_from_prediction(analysis.prediction, analysis.classifier.card, sources=sources,
                                          overlays=overlays, upload_hash=analysis.digest)
        outputs = build_outputs(summary, pacs_ready=options.pacs_ready)
    except (OutputError, ValueError) as exc:
        logger.error("upload %s: DICOM output failed: %s", analysis.digest, type(exc).__name__)
        raise ApiError(500, "internal_error", f"internal error: the DICOM output failed its checks "
                                              f"({type(exc).__name__})") from None
    dataset = outputs.sr if options.format == "dicom-sr" else outputs.captures[0]
    kind = "sr" if options.format == "dicom-sr" else "sc"
    return to_bytes(dataset), f"secondlook-{analysis.key}-{kind}-{analysis.digest}.dcm"


def study_dicom_answer(classifier: Classifier, upload: Upload, options: Options) -> Answer:
    """The SR (one DICOM file) or the key slice captures (a ZIP of DICOM files) of a study's default series.

    The series the model reads by default (`core.study.analyse_series`), its study call and key
    slices, through `core.pacs.study_summary` (the app's and the command line's outputs).

    Raises:
        ApiError: 400 for an upload that is not a study or pacs_ready without DICOM; 422 where the
            series cannot be analysed or the guard refuses it (with its row); 500 for a failure here.
    """
    from core.pacs import captures_zip, study_summary
    from core.series import StudyError
    from core.study import StudyAnalysis, analyse_series, read_upload, study_row, upload_digest

    files = [(upload.filename or "", upload.data)]
    try:
        study = read_upload(files, classifier.spec)
    except (StudyError, ScanError) as exc:
        raise ApiError(400, "bad_file", str(exc)) from None
    outcome = analyse_series(classifier, study, digest=upload_digest(files))
    name = upload.filename or ""
    body = {"model": model_identity(classifier), "digest": outcome.digest}
    if isinstance(outcome, Refusal):
        row = study_row(name, outcome, study=study, detail=True)
        if outcome.status == "error":
            raise ApiError(500, "internal_error", outcome.reason, {**row, **body})
        raise ApiError(422, "out_of_range", outcome.reason, {**row, **body})
    if not isinstance(outcome, StudyAnalysis):
        raise RuntimeError("an analysis that is neither a study analysis nor a refusal")
    if outcome.prediction.flag:
        row = study_row(name, outcome, detail=True)
        raise ApiError(422, "out_of_range", row["reason"], {**row, **body})
    try:
        summary = study_summary(outcome, method=options.method, target=options.target,
                                with_pdf=False)
        if options.pacs_ready and not summary.sources:
            raise ApiError(400, "bad_request", "pacs_ready needs a DICOM study (its identifiers are what it copies).")
        outputs = build_outputs(summary, pacs_ready=options.pacs_ready)
    except (OutputError, ValueError) as exc:
        logger.error("study %s: DICOM output failed: %s", outcome.digest, type(exc).__name__)
        raise ApiError(500, "internal_error", f"internal error: the DICOM output failed its checks "
                                              f"({type(exc).__name__})") from None
    stem = f"secondlook-{classifier.spec.key}-study"
    if options.format == "dicom-sr":
        return Answer(dicom=to_bytes(outputs.sr), filename=f"{stem}-sr-{outcome.digest}.dcm")
    return Answer(dicom=captures_zip(outputs, f"{stem}-sc-{outcome.digest}"), filename=f"{stem}-sc-{outcome.digest}.zip",
                  media_type="application/zip")


@dataclass(frozen=True)
class Answer:
    """A 200 answer: a JSON body, or DICOM bytes with their file name."""

    body: dict | None = None
    dicom: bytes | None = None
    filename: str | None = None
    media_type: str = "application/dicom"


def answer(classifier: Classifier, upload: Upload, options: Options) -> Answer:
    """Analyse one upload and pack the answer.

    Raises:
        ApiError: The refused file (400 / 413 / 415 / 422 with its row), or a failure here (500).
    """
    name = upload.filename or ""
    outcome = analyse(classifier, upload.data, name)
    row = result_row(name, outcome)
    if row["status"] != "ok":
        raise refusal_error(row, outcome, classifier)
    if not isinstance(outcome, Analysis):  # an ok row always comes from an analysis
        raise RuntimeError("an ok row without an analysis")
    if options.format != "json":
        data, filename = dicom_answer(outcome, upload, options)
        return Answer(dicom=data, filename=filename)
    body = {**row, "model": model_identity(classifier), "digest": outcome.digest}
    if options.method is not None:
        body["heatmap"] = heatmap_fields(outcome, options)
    return Answer(body=body)
