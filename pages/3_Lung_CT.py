"""Lung CT page: COVID-19 and lung-cancer models."""

from ui.task_page import render_task_page

render_task_page("Lung CT")
