"""Model loading shared across sessions: one `Classifier` (with its lock) per registry key."""

from __future__ import annotations

import streamlit as st

from core.models import Classifier, load_model
from core.tasks import get_task


@st.cache_resource(show_spinner="Loading the model...", max_entries=8)
def get_classifier(key: str) -> Classifier:
    """The bundled model for a registry key, loaded once per server process.

    Raises:
        WeightsError: If the weights or card are missing or do not match the registry.
    """
    return load_model(get_task(key))
