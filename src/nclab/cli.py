"""The ``nclab`` command: a thin argparse layer over the library.

Every subcommand lives in a ``register(subparsers)`` function next to the code it calls;
this module only collects them, and turns the library's ValueError/TypeError into a
one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Every option that takes a value shows its default, unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and default is not None
                and default is not argparse.SUPPRESS and "default" not in text):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            text += f" (default {shown.replace('%', '%%')})"
        return text


class UsageError(SystemExit):
    """A command line argparse refused; the one-line message is already on stderr."""


class Parser(argparse.ArgumentParser):
    """nclab's argument parsers: defaults in the help, one-line errors that name the fix.

    The project rule for every error a user can cause, command lines included: one line on
    stderr, exit status 2, naming the argument and the fix; a misspelt choice (a command,
    ``--preset``, the sweep kind, ...) gets the closest valid one as a suggestion.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(action, f"invalid choice {value!r}{hint} (choose from {', '.join(names)})")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a subcommand's unknown option is reported by that subcommand,
        with the closest option it has."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            while True:  # down to the subcommand that was chosen
                subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
                chosen = subs and getattr(namespace, subs[0].dest, None)
                if not chosen or chosen not in subs[0].choices:
                    break
                parser = subs[0].choices[chosen]
            options = [o for a in parser._actions for o in a.option_strings]
            close = difflib.get_close_matches(extras[0], options, n=1) if extras[0].startswith("-") else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace

    def error(self, message):
        text = " ".join(str(message).split())
        print(f"{self.prog}: error: {text}; see '{self.prog} --help'", file=sys.stderr)
        raise UsageError(2)


def _register_measure(sub):
    p = sub.add_parser(
        "measure",
        help="collapse metrics of a saved feature file (.npz or .pt)",
        description="Print every collapse metric of FILE, which holds features (N, d), "
        "labels (N,), and optionally weights (K, d) and bias (K,).",
    )
    p.add_argument("file", nargs="?", help=".npz or .pt file with features and labels")
    p.add_argument("--example", action="store_true",
                   help="measure a built-in example (noisy simplex-ETF collapse, K=10) instead of FILE")
    p.add_argument("--preset", choices=["papyan2020", "zhu2021"],
                   help="another paper's conventions instead of nclab's own (default: none)")
    p.add_argument("--json", action="store_true", help="print the metrics as a JSON dict")
    p.add_argument("--cdnv-exponent", type=float, default=2.0, metavar="Q",
                   help="distance exponent q of the generalised CDNV, reported as cdnv_q<Q> when not 2")
    p.add_argument("--riesz-s", type=float, default=1.0, metavar="S", help="s of the Riesz energy hu_riesz")
    p.add_argument("--classes", type=int, nargs="+", metavar="LABEL",
                   help="measure only these classes (relabelled in the given order)")
    p.add_argument("--top-classes", type=int, metavar="M", help="measure only the M most frequent classes")
    p.add_argument("--nc4-rows", type=int, metavar="N",
                   help="count NC4 on a seeded sample of N rows (reported as nc4_rows); default: all rows")
    p.add_argument("--tile-memory", type=float, default=1.0, metavar="GIB",
                   help="GiB of working memory for the K x K quantities (they are computed in tiles)")
    p.add_argument("--per-class", metavar="CSV",
                   help="also write each class's count, variance, NC1 share, CDNV row mean, mean norm (and "
                   "with weights: weight norm, duality, NC4 error) to this new CSV file")
    p.set_defaults(func=_cmd_measure)

    e = sub.add_parser("make-example", help="write an example feature file (.npz) to measure",
                       description="Write OUT.npz with features, labels and classifier weights of a noisy "
                       "collapsed configuration (class means on a simplex ETF or an orthogonal frame), "
                       "for trying nclab measure.")
    e.add_argument("out", help="output .npz path")
    e.add_argument("--K", type=int, default=10, help="number of classes")
    e.add_argument("--d", type=int, default=64, help="feature dimension (at least K)")
    e.add_argument("--n", type=int, default=100, help="samples per class")
    e.add_argument("--geometry", choices=["etf", "of"], default="etf",
                   help="class means on a simplex ETF (etf) or an orthogonal frame (of)")
    e.add_argument("--noise", type=float, default=0.05, help="within-class noise std")
    e.add_argument("--seed", type=int, default=0, help="random seed")
    e.set_defaults(func=_cmd_make_example)


def _example(K=10, d=64, n=100, geometry="etf", noise=0.05, seed=0):
    from nclab.frames import collapsed_configuration

    H, y, W = collapsed_configuration(K, d, n, geometry=geometry, noise=noise, seed=seed)
    return {"features": H.numpy(), "labels": y.numpy(), "weights": W.numpy()}


def _cmd_make_example(args):
    import numpy as np

    from nclab.io import atomic_path

    if not args.out.endswith(".npz"):
        raise ValueError("out: the example is written as .npz; give a path ending in .npz")
    data = _example(args.K, args.d, args.n, args.geometry, args.noise, args.seed)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **data)
    print(f"wrote {args.out}: K={args.K}, d={args.d}, n={args.n} per class, "
          f"{args.geometry} geometry, noise {args.noise}")


def _cmd_measure(args):
    from nclab.io import load_features
    from nclab.metrics import measure

    if args.example and args.file:
        raise ValueError("FILE: give a feature file or --example, not both")
    if not args.example and not args.file:
        raise ValueError("FILE: give a feature file (.npz or .pt), or --example to measure a built-in one")
    if args.example:
        data, source = _example(), "built-in example (K=10, d=64, n=100, ETF, noise 0.05)"
    else:
        data, source = load_features(args.file), args.file
    if args.classes is not None and args.top_classes is not None:
        raise ValueError("--classes: give --classes or --top-classes, not both")
    if args.per_class is not None:
        _check_new_csv(args.per_class)
    options = dict(cdnv_exponent=args.cdnv_exponent, riesz_s=args.riesz_s,
                   tile_memory=_tile_bytes(args.tile_memory))
    classes = args.classes if args.classes is not None else args.top_classes
    with _flag_names(top=args.top_classes is not None):
        result = measure(data["features"], data["labels"], data.get("weights"), data.get("bias"),
                         preset=args.preset, classes=classes, nc4_rows=args.nc4_rows, **options)
        if args.per_class is not None:
            _write_per_class(args.per_class, data, options["tile_memory"], classes)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    N, d = data["features"].shape
    print(f"{source}: N={N}, d={d}, K={int(data['labels'].max()) + 1}"
          + (f", preset {args.preset}" if args.preset else "")
          + (f", classes {classes}" if classes is not None else "")
          + (f", NC4 on a sample of {args.nc4_rows} rows" if "nc4_rows" in result else ""))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"  {k:<{width}}  {v:.6e}")
    if args.per_class is not None:
        print(f"wrote {args.per_class}")


@contextlib.contextmanager
def _flag_names(top: bool):
    """Errors of nclab.measure's keyword arguments under the names of measure's flags."""
    flags = {"classes": "--top-classes" if top else "--classes", "nc4_rows": "--nc4-rows",
             "riesz_s": "--riesz-s", "cdnv_exponent": "--cdnv-exponent"}
    try:
        yield
    except ValueError as exc:
        name, sep, rest = str(exc).partition(": ")
        if sep and name in flags:
            raise ValueError(f"{flags[name]}: {rest}") from None
        raise


def _tile_bytes(gib: float) -> int:
    import math

    if not math.isfinite(gib) or not 2**-10 <= gib <= 2**20:
        raise ValueError(f"--tile-memory: expected GiB between 0.001 and 1048576, got {gib}")
    return int(gib * 2**30)


def _check_new_csv(path: str) -> None:
    from pathlib import Path

    if not path.endswith(".csv"):
        raise ValueError(f"--per-class: give a path ending in .csv, got {path}")
    if Path(path).exists():
        raise ValueError(f"--per-class: {path} already exists; nclab does not overwrite files it did not "
                         "write: choose a new name or remove it")
    if not Path(path).absolute().parent.is_dir():
        raise ValueError(f"--per-class: the folder of {path} does not exist; create it first")


def _write_per_class(path: str, data: dict, tile_memory: int, classes) -> None:
    from nclab.io import atomic_path, csv_text
    from nclab.metrics import per_class

    table = per_class(data["features"], data["labels"], data.get("weights"), data.get("bias"),
                      tile_memory=tile_memory, classes=classes)
    labels = list(range(len(table["count"])))
    if classes is not None:  # the subset's own labels, in its order
        import numpy as np
        import torch

        from nclab.metrics import class_subset

        counts = torch.bincount(torch.as_tensor(np.asarray(data["labels"])).long().flatten())
        labels = class_subset(counts, classes).tolist()
    columns = ["class", *table]
    rows = [{"class": label, **{c: float(v[k]) for c, v in table.items()}} for k, label in enumerate(labels)]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(csv_text(rows, columns))


def _register_theory(sub):
    p = sub.add_parser(
        "theory",
        help="exact global optimum of a UFM: c, thresholds, t*, f*, predicted geometry",
        description="The exact optimum of the bias-free (or unregularised-bias) MSE UFM of any "
        "depth (docs/theory.md §3). One λ per factor, H1 FIRST and the classifier last: "
        "--lam λ_H λ_W for the plain UFM, --lam λ_H1 λ_W1 λ_W2 for the extended UFM.",
    )
    p.add_argument("--K", type=int, required=True, help="number of classes")
    p.add_argument("--n", type=int, nargs="+", required=True, metavar="N",
                   help="samples per class: one n (balanced), or the K class sizes n_1 ... n_K; "
                   "imbalanced sizes show each class's shrinkage")
    p.add_argument("--lam", type=float, nargs="+", required=True, metavar="λ",
                   help="one λ per factor, H1 first (at least 2)")
    p.add_argument("--bias", action="store_true", help="with an unregularised classifier bias")
    p.set_defaults(func=_cmd_theory)


def _cmd_theory(args):
    from nclab.theory import format_report

    print(format_report(args.K, args.n[0] if len(args.n) == 1 else args.n, tuple(args.lam), bias=args.bias))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nclab", description="nclab: a laboratory for neural collapse. Exact unconstrained-features "
        "models and their theory, collapse metrics (NC1-NC4) for any features, and the experiments of "
        "Tirer & Bruna (ICML 2022).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="one of the commands below; 'nclab COMMAND --help' shows its options")
    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    """The ``register(subparsers)`` function of every part of nclab, in help order."""
    from nclab.experiments.cli import register as register_experiments
    from nclab.nets.cli import register as register_train

    return (register_experiments, _register_measure, _register_theory, register_train)


def _one_line(exc: BaseException) -> str:
    from nclab.io import one_line

    return one_line(str(exc), 1000) or type(exc).__name__


def _version():
    from nclab import __version__

    return f"nclab {__version__}"


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # the message is on stderr; --help and --version still exit
        return exc.code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"nclab {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: a full disk, a permission, a vanished file
        print(f"nclab {args.command}: error: {_one_line(exc)}; check the paths given and free space",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nclab {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
