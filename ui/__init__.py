"""Streamlit-side helpers of the dashboard's pages (``app.py`` and ``pages/``).

They live next to the pages, not in :mod:`bnviz`: importing anything from the package
imports PyTorch, and these run before that.
"""
