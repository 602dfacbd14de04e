"""A synthetic head-CT study (pydicom) and a real analysis of it by the bundled model, for the DICOM tests."""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from benchmarks.samples import make_dicom
from core.dicom_out import Overlay, ResultSummary, summary_from_prediction, to_bytes

PATIENT = {"PatientName": "Secret^Patient", "PatientID": "ID-12345", "PatientBirthDate": "19600101",
           "PatientSex": "F", "AccessionNumber": "ACC-777", "StudyID": "S-42", "ReferringPhysicianName": "Doc^Tor",
           "StudyDate": "20240102", "StudyTime": "101010", "StudyDescription": "CT head without contrast",
           "InstitutionName": "General Hospital"}


def head_ct_slice(z: int, bleed: bool, size: int = 96) -> np.ndarray:
    """Stored values (HU + 1024, int16) of an axial head-CT-like slice; a 70 HU crescent where `bleed`."""
    yy, xx = np.mgrid[0:size, 0:size] * (160 / size)
    r = np.hypot(yy - 80, xx - 80)
    radius = 70 - abs(z - 4) * 2  # the skull narrows away from the middle slice
    hu = np.full((size, size), -1000.0)
    hu[r < radius] = 1000.0
    hu[r < radius - 8] = 35.0
    if bleed:
        hu[(r > radius - 16) & (r < radius - 8) & (xx < 70)] = 70.0
    return (hu + 1024).astype(np.int16)


def synthetic_series(n: int = 8, modality: str = "CT", body_part: str = "HEAD", study_uid: str | None = None,
                     series_number: int = 2, bleed: tuple[int, ...] = (3, 4, 5)) -> list[bytes]:
    """A series of n axial slices as DICOM files (patient and study identifiers filled in)."""
    study_uid = study_uid or generate_uid()
    series_uid, frame = generate_uid(), generate_uid()
    files = []
    for z in range(n):
        extra = dict(PATIENT, StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SeriesNumber=series_number,
                     InstanceNumber=z + 1, ImagePositionPatient=[0.0, 0.0, 5.0 * z],
                     ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1.6, 1.6], SliceThickness=5.0,
                     FrameOfReferenceUID=frame, BodyPartExamined=body_part, SeriesDescription="Axial 5mm",
                     SpecificCharacterSet="ISO_IR 100")
        files.append(make_dicom(head_ct_slice(z, z in bleed), modality=modality, window=(40, 80), extra=extra))
    return files


def read(files: list[bytes]) -> list[Dataset]:
    return [dcmread(io.BytesIO(data)) for data in files]


@functools.lru_cache(maxsize=None)
def bundled_model(key: str):
    """A bundled model, loaded once per test session."""
    from core.models import load_model
    from core.tasks import get_task

    return load_model(get_task(key))


def analyse(classifier, datasets: list[Dataset], *, with_pdf: bool = True) -> ResultSummary:
    """Run the bundled model on every slice and make the writers' input from its real output.

    The slice with the highest probability of the positive class is the key slice, and its
    prediction stands for the study's here: the study call itself belongs to the study pipeline,
    and the writers take whatever `Prediction` they are given.
    """
    import torch

    from core.explain import compute_cam, overlay
    from core.imaging import read_scan
    from core.decision import predict
    from core.guard import check_tags
    from core.pipeline import upload_digest
    from core.preprocess import EvalPreset, display_rgb
    from core.report import ReportContent, render_pdf

    spec, card = classifier.spec, classifier.card
    scans = [read_scan(to_bytes(ds)) for ds in datasets]
    tensors = [EvalPreset(spec)(scan).tensor for scan in scans]
    predictions = predict(classifier, torch.cat(tensors), [check_tags(scan, spec) for scan in scans])
    target = spec.label_index(spec.positive) if spec.positive in spec.labels else 0
    key = int(np.argmax([p.probabilities[target] for p in predictions]))
    rgb = display_rgb(scans[key])
    blended = overlay(rgb, compute_cam(classifier, tensors[key], target))
    digest = upload_digest(to_bytes(datasets[key]))
    pdf = render_pdf(ReportContent(rgb, blended, predictions[key], card, digest, spec.labels[target], "Grad-CAM")) \
        if with_pdf else None
    return summary_from_prediction(predictions[key], card, sources=datasets, key_slices=[key],
                                   overlays=[Overlay(blended, key, f"Grad-CAM for '{spec.labels[target]}'")],
                                   pdf=pdf, upload_hash=digest)


def dciodvfy(data: bytes) -> tuple[list[str], list[str]] | None:
    """(errors, warnings) of dicom3tools' dciodvfy on a DICOM file, or None where it is not installed."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "object.dcm"
        path.write_bytes(data)
        result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]
