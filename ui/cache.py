"""Process-wide state: models shared across sessions (one `Classifier`, with its runner, per registry
key), their loading in the background when the server starts serving, and the server's handling of
uploads."""

from __future__ import annotations

import logging

import streamlit as st

from core import threads
from core.imaging import MAX_UPLOAD_BYTES
from core.models import Classifier, WeightsError, load_model
from core.tasks import TASKS, get_task

logger = logging.getLogger(__name__)


@st.cache_resource(show_spinner="Loading the model...", max_entries=len(TASKS) + 2)
def get_classifier(key: str) -> Classifier:
    """The bundled model for a registry key, loaded once per server process.

    Raises:
        WeightsError: If the weights or card are missing or do not match the registry.
    """
    threads.configure("serve")
    return load_model(get_task(key))


def warm_up() -> None:
    """Load every bundled model once per process, on the server's first page view, before anything else.

    So the first upload is not the slow one: by the time a reader has chosen a file, every model is
    loaded (about 1 s for all six on 2 cores, `python -m benchmarks`). Loading happens in the page's
    own thread: a process that exits while torch loads in a background thread aborts.
    """
    for key in TASKS:
        try:
            get_classifier(key)
        except (WeightsError, ValueError) as exc:  # the page of that model says why when it is opened
            logger.error("model %s could not be loaded: %s", key, exc)


def keep_uploads_in_memory() -> None:
    """Make the server hold every upload in memory, never in a temporary file.

    Streamlit's server parses an upload with Starlette's multipart parser, which spools any
    file over `MultiPartParser.spool_max_size` (1 MB) to a temporary file on disk before the
    app sees it: most DICOM series and many X-ray exports are larger. Raising that class-level
    limit to the upload limit keeps the bytes in RAM. The app's entry script calls it on every
    run, before any page (and so any uploader) exists.
    """
    try:
        from starlette.formparsers import MultiPartParser
    except ImportError:  # an older Streamlit without Starlette: its Tornado server buffers in memory
        return
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, MAX_UPLOAD_BYTES + 2**20)
