"""Every page runs through ``app.py``, which names the pages in the page list.

With a ``pages/`` folder, Streamlit starts a server in its older multipage mode, in which a
page opened by its own address runs alone and the page list names the main page after its
file ("app"). The first run of ``app.py`` (its ``st.navigation``) switches the whole server
to the page list it gives. A page opened before any session has run ``app.py`` (a link to
the Pitfall lab right after the server started) makes that switch itself and runs again,
through ``app.py``.
"""

from __future__ import annotations

import streamlit as st


def run_through_the_app() -> None:
    """First in each page of ``pages/`` (after ``st.set_page_config``): a no-op once the
    server has switched, or where the page is the script Streamlit was started with."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # another Streamlit: the page runs as it is
        return
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        st.rerun()
