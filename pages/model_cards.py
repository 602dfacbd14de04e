"""Model cards: what each bundled model was trained on, how it scored, and how far to trust its heatmaps."""

from ui.cards_page import render_cards_page

render_cards_page()
