"""Home: what SecondLook is, the tasks (one page per page of the registry), and the notice."""

from ui.home_page import render_home_page

render_home_page()
