"""Process-wide state: models shared across sessions (one `Classifier`, with its lock, per
registry key), and the server's handling of uploads."""

from __future__ import annotations

import streamlit as st

from core.imaging import MAX_UPLOAD_BYTES
from core.models import Classifier, load_model
from core.tasks import get_task


@st.cache_resource(show_spinner="Loading the model...", max_entries=8)
def get_classifier(key: str) -> Classifier:
    """The bundled model for a registry key, loaded once per server process.

    Raises:
        WeightsError: If the weights or card are missing or do not match the registry.
    """
    return load_model(get_task(key))


def keep_uploads_in_memory() -> None:
    """Make the server hold every upload in memory, never in a temporary file.

    Streamlit's server parses an upload with Starlette's multipart parser, which spools any
    file over `MultiPartParser.spool_max_size` (1 MB) to a temporary file on disk before the
    app sees it: most DICOM series and many X-ray exports are larger. Raising that class-level
    limit to the upload limit keeps the bytes in RAM. Called by every page before its
    uploader exists, so it is in force before the first upload of any session.
    """
    try:
        from starlette.formparsers import MultiPartParser
    except ImportError:  # an older Streamlit without Starlette: its Tornado server buffers in memory
        return
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, MAX_UPLOAD_BYTES + 2**20)
