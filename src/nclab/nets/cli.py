"""``nclab train``: train a network and measure collapse layer by layer.

Settings come from ``--config FILE`` (TOML: TrainSettings keys, or ``[runs.NAME]`` tables
as written by the network experiments), overridden by any flag given. Under
``torchrun --nproc-per-node P -m nclab train ...`` the run is data-parallel.
"""
from __future__ import annotations

import argparse
import os
import typing

from nclab.nets.settings import TrainSettings

_KINDS = {int: int, float: float, str: str}


def _flag_type(name: str):
    """(kind, is_bool) of a settings field from its annotation (``X | None`` -> X)."""
    hint = typing.get_type_hints(TrainSettings)[name]
    options = [o for o in typing.get_args(hint) or (hint,) if o is not type(None)]
    return options[0], options[0] is bool


def register(sub) -> None:
    """Add the ``train`` subcommand to an argparse subparsers object (one flag per TrainSettings field)."""
    p = sub.add_parser("train", help="train a network (ResNet18/MLP) and measure collapse per layer",
                       description="Train a network and measure collapse layer by layer. Settings come from "
                       "--config FILE (TOML), overridden by any flag given; under torchrun --nproc-per-node P "
                       "-m nclab train ... the run is data-parallel. Writes config.toml, metrics.csv, "
                       "summary.json, figure.png/.pdf and checkpoint.pt to --out.")
    p.add_argument("--out", required=True, help="output folder (an existing run needs --resume)")
    p.add_argument("--config", help="TOML file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name in TrainSettings.field_names():
        flag = "--" + name.replace("_", "-")
        text = TrainSettings.help(name).replace("%", "%%")
        kind, is_bool = _flag_type(name)
        if is_bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=name, type=_KINDS[kind], default=None, metavar=name.upper(), help=text)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> None:
    from nclab.nets.experiment import runs_from_config, train_runs
    from nclab.nets.training import train

    overrides = {name: getattr(args, name) for name in TrainSettings.field_names() if getattr(args, name) is not None}
    experiment, runs = runs_from_config(args.config) if args.config else ("", {"": TrainSettings()})
    runs = {k: TrainSettings.from_dict(c.to_dict() | overrides) for k, c in runs.items()}
    if list(runs) == [""]:
        summary = train(runs[""], args.out, resume=args.resume, force=args.force, quiet=args.quiet)
        _print_final(summary)
    else:
        summary = train_runs(runs, args.out, experiment=experiment or "custom", quiet=args.quiet,
                             resume=args.resume, force=args.force)
        for run, s in summary["runs"].items():
            print(f"[{run}]")
            _print_final(s)


def _print_final(summary: dict) -> None:
    """Final metrics per split and level; NC3 against the run's frame (OF or ETF). Rank 0 only."""
    if "final" not in summary or "train" not in summary["final"] or os.environ.get("RANK", "0") != "0":
        return
    from nclab.nets.settings import nc3_frame

    fin, cfg = summary["final"], summary["config"]
    frame = nc3_frame(cfg["loss"], cfg.get("bias", False))
    print(f"{summary['data_source']}; epoch {summary['final_epoch']}; metric pass / epoch = "
          f"{summary['metric_pass_over_epoch']:.3f}; NC3 ({frame.upper()}) = nc3_{frame}")
    for split, levels in fin.items():
        net = levels.get("network", {})
        if "accuracy" not in net:
            continue
        name = "held-out" if split == "test" else "train (measured subsample)"
        print(f"  {name}, eval mode: accuracy {net['accuracy']:.4f}, "
              f"objective {net.get('objective', float('nan')):.4g}")
        for level, m in levels.items():
            if level != "network":
                key = f"nc3_{frame}"
                ncc = f"  ncc_accuracy {m['ncc_accuracy']:.4f}" if "ncc_accuracy" in m else ""
                extra = f"  {key} {m[key]:.3e}  nc4 {m['nc4']:.3f}" if key in m else ""
                print(f"    {level:<12} nc1 {m['nc1']:.3e}  nc2_etf {m['nc2_etf']:.3e}{ncc}{extra}")
