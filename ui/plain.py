"""Text from outside the app (file names, DICOM tag values, refusal reasons, error messages) on a page.

Streamlit renders the body of `st.markdown`, `st.caption`, the headers and every alert
(`st.error`, `st.warning`, `st.info`, `st.success`) as Markdown: a file named
`**bold** [link](javascript:alert(1)).png` would come out bold with a live link, `:red[...]` in
colour, `:smile:` as an emoji, `$x$` as maths. Untrusted text is shown with `st.text`, `st.code`
or `st.dataframe`; where it has to sit inside a Markdown element (an alert), it goes through
`escape_markdown` first, and these helpers do that for the alerts.

A failure whose cause the reader cannot act on (a model that does not load, a store that
cannot be written) is told in plain words by `failure`; the exception, with its library text
and server paths, goes to the log only.
"""

from __future__ import annotations

import logging
import re

import streamlit as st

logger = logging.getLogger(__name__)

# CommonMark lets any ASCII punctuation be escaped with a backslash. These are the ones that mean
# something in CommonMark, GitHub's extensions (tables, strikethrough, autolinked URLs and e-mails)
# or Streamlit's (`:color[...]` directives, `$maths$`); escaping them leaves no emphasis, link, image,
# HTML, entity, table, heading or list marker. Quotes, commas and the like stay readable.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=^@])")
# Emoji and icon short codes (`:smile:`, `:material/home:`) are matched in the text after the
# escapes are undone; a zero-width space after the colon keeps them from matching.
_SHORT_CODE = re.compile(r":(?=[\w/+-])")
ZERO_WIDTH_SPACE = "\u200b"


def escape_markdown(text: object) -> str:
    """`text` as Markdown that renders as exactly these characters, on one line.

    Markdown's special characters are backslash-escaped, line breaks become spaces (a new line
    could start a heading, a list or a code block), and a zero-width space follows each colon
    that could open an emoji or icon short code.
    """
    flat = re.sub(r"[\r\n\v\f\u2028\u2029]+", " ", str(text))
    return _SPECIAL.sub(r"\\\1", _SHORT_CODE.sub(":" + ZERO_WIDTH_SPACE, flat))


def error(message: object, icon: str | None = None) -> None:
    """`st.error` with the message shown as it is written (see `escape_markdown`)."""
    st.error(escape_markdown(message), icon=icon)


def warning(message: object, icon: str | None = None) -> None:
    """`st.warning` with the message shown as it is written."""
    st.warning(escape_markdown(message), icon=icon)


def info(message: object, icon: str | None = None) -> None:
    """`st.info` with the message shown as it is written."""
    st.info(escape_markdown(message), icon=icon)


def success(message: object, icon: str | None = None) -> None:
    """`st.success` with the message shown as it is written."""
    st.success(escape_markdown(message), icon=icon)


def failure(message: str, exc: BaseException, what: str) -> None:
    """Tell the reader `message` (plain words, no library text, no server paths); log `what` with the exception.

    Args:
        message: What the reader sees, written here, never built from the exception.
        exc: The cause, logged with its type and text (server paths are the operator's to see;
            callers never pass an exception whose text carries upload data).
        what: A short description for the log, e.g. "model brain_mri could not be loaded".
    """
    logger.error("%s: %s: %s", what, type(exc).__name__, exc)
    error(message)


def model_unavailable(title: str, key: str, exc: BaseException) -> None:
    """The message for a model that does not load on this server (the cause goes to the log)."""
    failure(f"The model '{title}' cannot be loaded on this server, so it cannot analyse images now. The server's "
            "log says why, for its administrator.", exc, f"model {key} could not be loaded")
