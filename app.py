"""SecondLook home page: what it is, the tasks, and the notice. Run: streamlit run app.py"""

import streamlit as st

from core.tasks import PAGES, tasks_for_page
from ui.widgets import BATCH_PAGE, CARDS_PAGE, PAGE_FILES, disclaimer

st.set_page_config(page_title="SecondLook", layout="wide")
st.title("SecondLook")
st.markdown(
    "A second opinion on a single medical image, in the browser. Pick a task, upload a scan "
    "(PNG, JPEG, WebP, TIFF, BMP or DICOM) and see the model's calibrated probabilities with an "
    "adjustable Grad-CAM heatmap of the regions that drove them. Every model comes with a card: "
    "what it was trained on, how it was tested on images it never saw, and its known limits."
)
disclaimer()
st.header("Tasks")
for page in PAGES:
    with st.container(border=True):
        st.page_link(PAGE_FILES[page], label=page, icon="🩻")
        for spec in tasks_for_page(page):
            st.markdown(f"- **{spec.title}**: {spec.trained_on}.")
st.header("More")
st.page_link(CARDS_PAGE, label="Model cards: what each model was trained on, its held-out figures with 95% intervals, "
             "ROC, confusion and reliability plots, and how faithful its heatmaps are", icon="📋")
st.page_link(BATCH_PAGE, label="Batch: many files or ZIP archives through one model, with a table and a CSV", icon="🗂️")
st.caption("Nothing you upload is written to disk or kept after your session. Images are analysed in memory only.")
