"""What a student sees when a page fails unexpectedly: one short sentence, never a traceback.

A traceback names server paths and library internals, and an exception's own text can
quote them too. So the page shows only "Something went wrong while ...; the server log has
the details (reference abc123)", and the server log gets the whole traceback under the
same reference (logger ``bnviz``), so that whoever runs the server can find it.
(``client.showErrorDetails = "none"`` in ``.streamlit/config.toml`` is the second line of
defence: whatever escapes this still reaches the browser without details.)

:func:`report_uncaught` hands Streamlit the handler it calls for an exception that nothing
caught (the ``on_script_error`` handler ``st.App`` takes), so a page's module-level code is
covered without wrapping it. Streamlit makes a new context for every run, a fragment's own
rerun included, so it is called at the top of every page and first in every fragment.
``st.rerun()`` and ``st.stop()`` raise control-flow exceptions that are not
``Exception``\\s; Streamlit never passes them here.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

logger = logging.getLogger("bnviz")
#: Where the reference of an exception already reported is kept (it is logged once).
_REFERENCE = "_bnviz_reference"


def short_message(what: str, reference: str) -> str:
    return (f"Something went wrong while {what}; the server log has the details "
            f"(reference {reference}). Change a setting or reload the page to go on.")


def log_unexpected(exc: BaseException, what: str) -> str:
    """Log ``exc`` with its traceback under a new reference (once per exception object);
    returns the reference."""
    reference = getattr(exc, _REFERENCE, None)
    if reference is None:
        reference = secrets.token_hex(3)
        logger.error("Unexpected error while %s (reference %s)", what, reference,
                     exc_info=(type(exc), exc, exc.__traceback__))
        try:
            setattr(exc, _REFERENCE, reference)
        except AttributeError:  # an exception type without attributes: logged each time
            pass
    return reference


def show_unexpected(exc: BaseException, what: str) -> None:
    """An exception that is a bug, not the user's input: logged, and one short message."""
    st.error(short_message(what, log_unexpected(exc, what)))


def report_uncaught(what: str) -> None:
    """From here to the end of this run, an exception that nothing catches is shown as
    :func:`show_unexpected` shows it (a fragment's own rerun is a run of its own).

    Outside a Streamlit run (a bare ``python app.py``) this does nothing."""
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is not None and hasattr(ctx, "on_script_error"):
        ctx.on_script_error = _handler(what)


def _handler(what: str) -> Callable[[Exception], bool]:
    def handle(exc: Exception) -> bool:
        show_unexpected(exc, what)
        return True  # Streamlit shows nothing more (its own log line stays)

    return handle
