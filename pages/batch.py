"""Batch: many scans (or ZIP archives) through one model; a table and a CSV."""

from ui.batch_page import render_batch_page

render_batch_page()
