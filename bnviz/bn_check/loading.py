"""``pkg.module:Name`` and ``path/to/file.py:Name``: the object a command line names.

This imports and runs the named code, so it is for specs typed by whoever runs the command
(``bnviz check-bn``), never for text from a browser: nothing in the dashboard calls it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from ..errors import BnvizError
from .candidate import short_error

SPEC_FIX = "write MODULE:NAME, e.g. mypkg.layers:MyBN or path/to/my_bn.py:MyBN."


def _import_file(path: Path):
    if not path.is_file():
        raise BnvizError(f"No file {str(path)!r}.",
                         "give an existing Python file, e.g. path/to/my_bn.py:MyBN.")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    name = f"bnviz_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BnvizError(f"{str(path)!r} is not a Python file.", SPEC_FIX)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise BnvizError(f"Running {str(path)!r} failed: {short_error(exc)}.",
                         "fix the error in that file.") from exc
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise BnvizError(f"No module named {name!r} (searched the current directory and "
                             "sys.path).", SPEC_FIX) from exc
        raise BnvizError(f"Importing {name!r} failed: {short_error(exc)}.",
                         "install what it needs, or fix the import.") from exc
    except Exception as exc:
        raise BnvizError(f"Importing {name!r} failed: {short_error(exc)}.",
                         "fix the error in that module.") from exc


def load_object(spec: str):
    """The object ``spec`` names: ``MODULE:NAME`` (a module importable from ``sys.path``)
    or ``FILE.py:NAME``; ``NAME`` may be dotted (``Outer.Inner``)."""
    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where or not attr:
        raise BnvizError(f"{spec!r} does not name an object.", SPEC_FIX)
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(Path(where)) if is_file else _import_module(where)
    obj = module
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items()
                             if inspect.isclass(v) and issubclass(v, nn.Module)
                             and v.__module__ == module.__name__)
            hint = (f"name one of the modules it defines: {', '.join(defined)}." if defined
                    else SPEC_FIX)
            raise BnvizError(f"{where!r} has no attribute {attr!r}.", hint)
        obj = getattr(obj, part)
    return obj


def load_implementation(spec: str):
    """A BatchNorm implementation: a class, a factory (callable) or an nn.Module instance."""
    obj = load_object(spec)
    if not (inspect.isclass(obj) or isinstance(obj, nn.Module) or callable(obj)):
        raise BnvizError(f"{spec!r} is {type(obj).__name__} {obj!r:.40}, not a class.",
                         "name your BatchNorm class (or a function that builds one, or an "
                         "instance).")
    return obj
