"""First imports of bnviz from several threads at once (a fresh Streamlit server whose
first visitors open the dashboard and a lab page together).

Python's per-module import locks can deadlock when one thread initialises the package
while another imports a submodule that waits for the package; Python then breaks the
deadlock by handing one thread a half-initialised module (``AttributeError: partially
initialized module 'bnviz.manual_bn' ...``). Each case runs in a fresh interpreter: one
thread imports ``bnviz`` and is held inside the package's ``__init__`` while another
imports a submodule. (Before the fix the ``bnviz.training`` case failed every time.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RACE = """
import sys, threading, time
import torch  # noqa: F401 -- imported before the race, as a server has it
paused = threading.Event()
class PauseInsideThePackage:  # holds the first thread inside bnviz/__init__ for a moment
    def find_spec(self, name, path=None, target=None):
        if name == "bnviz.inspection" and threading.current_thread().name == "whole":
            paused.set()
            time.sleep(0.5)
        return None
sys.meta_path.insert(0, PauseInsideThePackage())
errors = []
def whole():
    try:
        import bnviz  # noqa: F401
    except Exception as exc:
        errors.append(repr(exc))
def part():
    paused.wait()
    try:
        __import__(sys.argv[1])
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=whole, name="whole"), threading.Thread(target=part)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("errors:", errors)
sys.exit(1 if errors else 0)
"""

CASES = ["bnviz.training", "bnviz.dashboard", "bnviz.pitfalls", "bnviz.cli"]


@pytest.mark.slow
def test_concurrent_first_imports_never_see_a_half_initialised_module():
    procs = [(mod, subprocess.Popen([sys.executable, "-c", RACE, mod], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for mod in CASES]
    failures = []
    for mod, proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{mod}: {out.strip().splitlines()[-1:]}")
    assert not failures, failures


# One session opens a table (the first use of pandas in this process) while another draws its
# charts. Plotly does not import pandas: it looks it up in ``sys.modules`` (to convert pandas
# objects) while building and serialising *every* figure, and during an import that entry is
# a half-initialised module: ``AttributeError: partially initialized module 'pandas' has no
# attribute 'Series'``, the chart's page crashes. Here the table's import is held in the
# middle (at ``pandas.core.frame``) while the other thread builds and serialises a chart.
# ``sys.argv[1]``: the module a page imports before drawing (bnviz.figures or bnviz.dashboard).
PANDAS_RACE = """
import sys, threading, time
__import__(sys.argv[1])
peeked = ("numpy", "pandas", "PIL.Image")  # what plotly reads from sys.modules
assert all(m in sys.modules for m in peeked), [m for m in peeked if m not in sys.modules]
from bnviz import figures
import numpy as np
import plotly.io as pio
z = np.linspace(-1, 1, 3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
pio.to_json(figures.input_figure(z, np.arange(8), np.arange(8)))  # the page drawn before
inside = threading.Event()
class HoldPandasHalfway:
    def find_spec(self, name, path=None, target=None):
        if name == "pandas.core.frame" and threading.current_thread().name == "table":
            inside.set()
            time.sleep(1.0)
        return None
sys.meta_path.insert(0, HoldPandasHalfway())
table = threading.Thread(target=lambda: __import__("pandas"), name="table")
table.start()
while table.is_alive() and not inside.is_set():
    time.sleep(0.01)
fig = figures.input_figure(z, np.arange(8), np.arange(8))
assert len(pio.to_json(fig, validate=False)) > 1000
table.join()
print("pandas import held halfway:", inside.is_set())
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", ["bnviz.figures", "bnviz.dashboard"])
def test_a_chart_drawn_while_another_session_imports_pandas_works(module):
    """Importing the figures (or the dashboard, which uses them) imports pandas and PIL.Image
    whole, so no chart ever meets a half-imported one (CI saw the crash when pandas was
    imported after the first page, for the first table)."""
    proc = subprocess.run([sys.executable, "-c", PANDAS_RACE, module], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pandas import held halfway: False" in proc.stdout


def test_headless_use_imports_no_dashboard_code():
    """``import bnviz`` (the API, the CLI) pays for no chart or page code: the import-order
    guard above lives with the figures, not in the package."""
    code = ("import sys, bnviz; print(sorted(m for m in ('plotly', 'streamlit', "
            "'bnviz.figures', 'bnviz.dashboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
