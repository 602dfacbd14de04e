"""SecondLook. Run: streamlit run app.py

The entry point: page set-up shared by every page, the models loaded in the background as the
server's first session starts (so the first upload is not the slow one), and the navigation.
"""

import streamlit as st

from ui.cache import keep_uploads_in_memory, warm_up
from ui.navigation import navigation

st.set_page_config(page_title="SecondLook", page_icon=":material/radiology:", layout="wide")
keep_uploads_in_memory()
warm_up()
st.navigation(navigation()).run()
