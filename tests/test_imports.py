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
