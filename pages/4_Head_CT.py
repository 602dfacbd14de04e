"""Head CT page: intracranial hemorrhage and its subtypes."""

from ui.task_page import render_task_page

render_task_page("Head CT")
