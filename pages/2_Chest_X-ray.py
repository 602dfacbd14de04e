"""Chest X-ray page: pediatric pneumonia and adult COVID-19 models."""

from ui.task_page import render_task_page

render_task_page("Chest X-ray")
