"""Brain MRI page."""

from ui.task_page import render_task_page

render_task_page("Brain MRI")
