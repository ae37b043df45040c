"""Moved to :mod:`ui.chart_preload` (the dashboard's Streamlit-side helpers); this name is
kept for the pages that still import it from here."""

from ui.chart_preload import preload_chart_code

__all__ = ["preload_chart_code"]
