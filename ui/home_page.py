"""The home page: what SecondLook is, the tasks, and the notice."""

from __future__ import annotations

import streamlit as st

from core.tasks import PAGES, tasks_for_page
from ui.navigation import other_pages, task_pages
from ui.widgets import disclaimer


def render_home_page() -> None:
    """The whole home screen."""
    st.title("SecondLook")
    st.markdown(
        "A second opinion on a medical image, in the browser. Pick a task, upload a scan "
        "(PNG, JPEG, WebP, TIFF, BMP or DICOM) and see the model's calibrated call beside an "
        "adjustable Grad-CAM heatmap of the regions that drove it. Every model comes with a card: "
        "what it was trained on, how it was tested on images it never saw, and its known limits."
    )
    disclaimer()
    st.header("Tasks")
    pages = task_pages()
    for page in PAGES:
        with st.container(border=True):
            st.page_link(pages[page], label=page)
            for spec in tasks_for_page(page):
                st.markdown(f"- **{spec.title}**: {spec.trained_on}.")
    st.header("More")
    others = other_pages()
    st.page_link(others["Model cards"], label="Model cards: what each model was trained on, its held-out figures with "
                 "95% intervals, ROC, confusion and reliability plots, and how faithful its heatmaps are")
    st.page_link(others["Batch"], label="Batch: many files or ZIP archives through one model, with a table and a CSV")
    st.caption("Nothing you upload is written to disk or kept after your session. Images are analysed in memory only.")
