"""Synthetic scans made on the fly, for the benchmarks and the tests (never real patient data)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def synthetic_slice(size: int = 128, seed: int = 0, kind: int = 0) -> np.ndarray:
    """A grayscale uint8 'scan': a bright ellipse body with a blob whose place depends on kind."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = (((xx - 0.5) / 0.4) ** 2 + ((yy - 0.5) / 0.45) ** 2) < 1
    image = 0.15 + 0.45 * body + 0.05 * rng.standard_normal((size, size))
    cx, cy = [(0.35, 0.35), (0.65, 0.4), (0.5, 0.7)][kind % 3]
    cx += rng.uniform(-0.05, 0.05)
    cy += rng.uniform(-0.05, 0.05)
    image += 0.35 * ((((xx - cx) ** 2 + (yy - cy) ** 2) < 0.012))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **params) -> bytes:
    """Encode an array with Pillow."""
    from PIL import Image

    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def new_instance(sop_class: str) -> Dataset:
    """An empty DICOM instance of `sop_class` with a new UID, its file meta set for explicit VR little endian.

    Args:
        sop_class: The SOP Class UID (CT Image Storage, Enhanced CT Image Storage, ...).

    Returns:
        A dataset whose file meta and SOP Common module name the same class and instance.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def make_dicom(
    array: np.ndarray,
    modality: str = "CT",
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    padding: int | None = None,
    window: tuple[float, float] | None = None,
    preamble: bool = True,
    with_pixels: bool = True,
    extra: dict | None = None,
) -> bytes:
    """Write a small uncompressed DICOM file to bytes (explicit VR little endian)."""
    from pydicom.uid import CTImageStorage

    ds = new_instance(CTImageStorage)
    ds.Modality = modality
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "ID-12345"
    if with_pixels:
        frames = array.shape[0] if array.ndim == 3 and photometric != "RGB" else 1
        if photometric == "RGB":
            ds.SamplesPerPixel = 3
            ds.PlanarConfiguration = 0
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            ds.Rows, ds.Columns = array.shape[:2]
        else:
            ds.SamplesPerPixel = 1
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if array.dtype == np.int16 else 0
            ds.Rows, ds.Columns = array.shape[-2:]
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PhotometricInterpretation = photometric
        if slope is not None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
        if padding is not None:
            ds.PixelPaddingValue = padding
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = np.ascontiguousarray(array).tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def ct_dicom(size: int = 512, seed: int = 0) -> bytes:
    """A CT slice DICOM, int16 stored values with RescaleIntercept -1024 (HU -1024 to about 1000)."""
    return make_dicom(synthetic_slice(size, seed=seed).astype(np.int16) * 8)
