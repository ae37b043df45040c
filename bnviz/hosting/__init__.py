"""Serving the dashboard: on the operator's own model (:mod:`bnviz.hosting.serve`, ``bnviz
serve`` and ``bnviz.serve``), and for a class, several Streamlit replicas behind nginx
(:mod:`bnviz.hosting.replicas`, ``bnviz serve-class``).

Importing this package imports no Streamlit: the replicas and ``bnviz serve`` are ``streamlit
run`` processes, and only ``bnviz.serve()`` starts Streamlit's server in this process.
"""

from __future__ import annotations
