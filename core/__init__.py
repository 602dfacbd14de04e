"""SecondLook core: models, preprocessing, explanations, training and evaluation.

Pure Python and torch; nothing in this package imports Streamlit.
"""
