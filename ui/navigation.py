"""The app's pages: Home, one task page per page the registry names, Model cards and Batch, and
Archive where a DICOMweb archive is configured (SECONDLOOK_DICOMWEB_URL).

The task pages are derived from `core.tasks.PAGES` (never listed by hand): adding a model to a new
page of the registry adds the page here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import streamlit as st

from core.dicomweb import archive_settings
from core.tasks import PAGES

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "pages" / "home.py"
CARDS = ROOT / "pages" / "model_cards.py"
BATCH = ROOT / "pages" / "batch.py"
ICONS = {"Brain MRI": ":material/neurology:", "Chest X-ray": ":material/pulmonology:", "Lung CT": ":material/pulmonology:",
         "Head CT": ":material/neurology:"}  # Material Symbols ship with Streamlit: no emoji font needed


def url_path(page: str) -> str:
    """The page's address: "Chest X-ray" -> "chest-x-ray"."""
    return re.sub(r"[^a-z0-9]+", "-", page.lower()).strip("-")


def _task_renderer(page: str) -> Callable[[], None]:
    def render() -> None:
        from ui.task_page import render_task_page

        render_task_page(page)

    render.__name__ = f"page_{url_path(page).replace('-', '_')}"  # Streamlit tells callable pages apart by name
    return render


def task_pages() -> dict[str, st.Page]:
    """One `st.Page` per registry page, by page title (made per script run: a page object belongs to the run that
    made it)."""
    return {page: st.Page(_task_renderer(page), title=page, url_path=url_path(page), icon=ICONS.get(page, ":material/radiology:"))
            for page in PAGES}


def other_pages() -> dict[str, st.Page]:
    """Home, Model cards and Batch."""
    return {"Home": st.Page(HOME, title="Home", icon=":material/home:", default=True),
            "Model cards": st.Page(CARDS, title="Model cards", icon=":material/description:", url_path="model-cards"),
            "Batch": st.Page(BATCH, title="Batch", icon=":material/table_view:", url_path="batch")}


def _render_archive() -> None:
    from ui.archive_page import render_archive_page

    render_archive_page()


def archive_page() -> st.Page | None:
    """The Archive page where SECONDLOOK_DICOMWEB_URL is set (also when a setting is malformed: the page says
    which), else None."""
    try:
        configured = archive_settings() is not None
    except ValueError:
        configured = True
    if not configured:
        return None
    return st.Page(_render_archive, title="Archive", url_path="archive", icon=":material/cloud_download:")


def navigation() -> dict[str, list[st.Page]]:
    """The sidebar's sections."""
    others = other_pages()
    archive = archive_page()
    return {"": [others["Home"]], "Tasks": list(task_pages().values()),
            "More": ([archive] if archive is not None else []) + [others["Model cards"], others["Batch"]]}
