"""The install step's disk check (scripts/check_disk.py, run by `make` before pip).

A CI run once died half-way through pip with "No space left on device"; the check refuses
a first install that cannot fit, in one line that names the disk, the need and the fix.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check_disk():
    spec = importlib.util.spec_from_file_location("check_disk", ROOT / "scripts" / "check_disk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_a_first_install_that_cannot_fit(tmp_path, monkeypatch, capsys):
    check = _check_disk()
    monkeypatch.setattr(check.tempfile, "gettempdir", lambda: str(tmp_path))
    free = check.shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(check, "VENV_NEED", free)  # with the downloads: more than is free
    assert check.main(["check_disk.py", str(tmp_path / "new" / ".venv")]) == 1
    line = capsys.readouterr().err
    assert "needs about" in line and str(tmp_path) in line and "TMPDIR" in line


def test_passes_when_there_is_room_or_torch_is_installed(tmp_path, monkeypatch):
    check = _check_disk()
    monkeypatch.setattr(check.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(check, "VENV_NEED", 1)
    monkeypatch.setattr(check, "DOWNLOAD_NEED", 1)
    assert check.main(["check_disk.py", str(tmp_path / ".venv")]) == 0
    monkeypatch.setattr(check, "VENV_NEED", 10**18)  # would never fit ...
    torch_init = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages" / "torch"
    torch_init.mkdir(parents=True)
    (torch_init / "__init__.py").touch()
    assert check.main(["check_disk.py", str(tmp_path / ".venv")]) == 0  # ... but nothing to do
