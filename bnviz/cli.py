"""``bnviz`` command line: ``models``, ``inspect``, ``build-kernel``, ``pitfalls <name>``,
``train``, ``serve``, ``serve-class``, ``check-bn``.

User errors (unknown model or layer, bad mode, unreadable image, missing weights, no CUDA)
print one line ``bnviz: error: <problem> Fix: <fix>`` on stderr and exit with status 2,
never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import BnvizError
from .serialize import to_json

EXIT_USER_ERROR = 2
#: Modules that add subcommands through ``register_cli(subparsers)``.
PLUGINS = ("bnviz.pitfalls.cli", "bnviz.training", "bnviz.hosting.replicas",
           "bnviz.hosting.serve", "bnviz.bn_check.cli")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every user error has one format."""

    def error(self, message):  # noqa: D401 - argparse API
        raise BnvizError(f"{message}.", f"see '{self.prog} --help'.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnviz",
        description="A live microscope for PyTorch BatchNorm (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("models", help="list models, their BN layer counts and weights status")
    p.add_argument("--offline", action="store_true", help="do not probe the network")
    p.add_argument("--json", metavar="PATH", help="write JSON to PATH ('-' for stdout)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="run one forward and report every BatchNorm layer")
    p.add_argument("--model", default=None, help="model name (default: efficientnet_lite0)")
    p.add_argument(
        "--stimulus",
        default="image:chelsea",
        help="uniform | uniform:value=0.5 | noise:seed=1 | grating:orientation=45 | "
        "checkerboard | image:chelsea | PATH (default: image:chelsea)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--composition", default="copies", help="copies | different | jitter")
    p.add_argument("--size", type=int, default=None, help="image size (default: model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default=None,
                   help="mode for every BN layer, e.g. eval, train, 'train,momentum=none'")
    p.add_argument("--layer-mode", action="append", default=[], metavar="NAME=MODE",
                   help="per-layer mode, repeatable, e.g. --layer-mode _bn0=train,track=off")
    p.add_argument("--weights", default="pretrained", help="pretrained | random | PATH")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build-kernel",
                       help="compile the fast manual-BN check (csrc/probe.cpp) for this torch")
    p.add_argument("--verbose", action="store_true", help="print the compiler command")
    p.set_defaults(func=cmd_build_kernel)

    import importlib

    for plugin in PLUGINS:
        try:
            module = importlib.import_module(plugin)
        except ModuleNotFoundError as exc:  # a plug-in not installed in this build
            if exc.name != plugin:
                raise
            continue
        module.register_cli(sub)
    return parser


def _write_json(payload: dict | str, target: str) -> None:
    text = payload if isinstance(payload, str) else to_json(payload, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    except OSError as exc:
        raise BnvizError(f"Cannot write JSON to {target!r}: {exc.strerror}.",
                         "pass a writable path or '-' for stdout.") from exc


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain fixed-width text table (no extra dependency, readable in any terminal)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def cmd_models(args) -> int:
    from .models import architecture_bn_count, list_models, weights_status

    rows = []
    for name in list_models():
        bn = architecture_bn_count(name)
        rows.append({"model": name, "bn_layers": bn,
                     "weights": weights_status(name, check_network=not args.offline)})
    if args.json:
        _write_json({"models": rows}, args.json)
    else:
        print(format_table(rows))
    return 0


def _parse_layer_modes(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, mode = item.partition("=")
        if not sep or not name or not mode:
            raise BnvizError(f"Invalid --layer-mode {item!r}.",
                             "write NAME=MODE, e.g. --layer-mode _bn0=eval,track=none.")
        out[name.strip()] = mode.strip()
    return out


def cmd_inspect(args) -> int:
    from .inspection import inspect
    from .models import DEFAULT_MODEL, load_model
    from .modes import bn_layers, parse_mode
    from .stimuli import MAX_SIZE, MIN_SIZE, make_stimulus_from_spec
    from .validation import check_int

    if args.batch_size < 1:
        raise BnvizError(f"--batch-size must be >= 1, got {args.batch_size}.",
                         "pass a positive batch size.")
    # checked before any model is loaded (or downloaded); an empty or zero value is an
    # error, never a silent default
    if args.size is not None:
        check_int("--size", args.size, MIN_SIZE, MAX_SIZE,
                  f"pass an image size in pixels from {MIN_SIZE} to {MAX_SIZE}, or leave "
                  "--size out for the model's own.")
    top_k = check_int("--top-k", args.top_k, 1, 1000,
                      "pass how many predictions to list per image, e.g. --top-k 5.")
    weights = None if args.weights in ("random", "none") else args.weights
    model = load_model(DEFAULT_MODEL if args.model is None else args.model, weights=weights)
    size = model.preprocess.input_size if args.size is None else args.size
    x = make_stimulus_from_spec(args.stimulus, size=size, batch_size=args.batch_size,
                                composition=args.composition, seed=args.seed)
    modes: str | dict | None = None
    layer_modes = _parse_layer_modes(args.layer_mode)
    if args.mode is not None:
        parse_mode(args.mode)
        if layer_modes:
            modes = {n: args.mode for n, _ in bn_layers(model.module)}
            modes.update(layer_modes)
        else:
            modes = args.mode
    elif layer_modes:
        modes = layer_modes
    report = inspect(model, x, modes=modes, device=args.device, keep_tensors=False,
                     top_k=top_k)
    if args.json:
        _write_json(report.to_json(), args.json)
        return 0
    print(f"model: {report.model}  weights: {report.weights}  device: {report.device}")
    print(f"input: {args.stimulus} {list(report.input_shape)}  preprocessing: "
          f"{report.preprocessing}")
    for key, value in report.notes.items():
        if key != "other_modules":
            print(f"note: {key} = {value}")
    if report.predictions:
        top = ", ".join(f"{p.label} ({p.probability:.2f})" for p in report.predictions[0])
        print(f"top-{len(report.predictions[0])} (image 0): {top}")
    if not report.layers:
        print(f"{report.model} has no BatchNorm layers: nothing to inspect.")
        return 0
    frame = report.to_frame()
    cols = ["name", "type", "channels", "mode", "stats_used", "updates_running", "mean_shift",
            "log_var_ratio", "max_abs_diff", "max_rel_diff", "activation"]
    print(format_table(frame[cols].to_dict("records")))
    worst = max(layer.max_rel_diff for layer in report.layers)
    print(f"manual vs native BN: max relative difference {worst:.2e} over "
          f"{len(report.layers)} layers ({report.manual_check} check)")
    return 0


def cmd_build_kernel(args) -> int:
    from .probe_kernel import KernelBuildError, build, library_path, status, verify

    existing = library_path()
    problem = verify(existing) if existing.exists() else None
    if problem is not None:  # never loaded: a truncated library kills the process (SIGBUS)
        print(f"bnviz: rebuilding the compiled probe {existing}: {problem}", file=sys.stderr)
    try:
        path = build(verbose=args.verbose)
    except KernelBuildError as exc:
        raise BnvizError(f"The compiled probe was not built: {exc}",
                         "install a C++ compiler (g++) and run 'bnviz build-kernel' again; "
                         "until then inspect uses the eager check (same numbers, slower).") from exc
    usable, why = status()
    if not usable:
        raise BnvizError(f"The compiled probe at {path} does not load: {why}.",
                         "delete it and run 'bnviz build-kernel' again.")
    print(f"bnviz: compiled probe ready: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except BnvizError as exc:
        print(f"bnviz: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("bnviz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
