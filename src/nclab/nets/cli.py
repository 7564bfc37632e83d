"""``nclab train``: train a network and measure collapse layer by layer.

Settings come from ``--config FILE`` (TOML: TrainConfig keys, or ``[runs.NAME]`` tables
as written by the network experiments), overridden by any flag given. Under
``torchrun --nproc-per-node P -m nclab train ...`` the run is data-parallel.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from nclab.nets.train import TrainConfig

_HELP = {
    "dataset": "digits (offline default), mnist or cifar10",
    "data": "folder with MNIST/raw/ or cifar-10-batches-py/ (torchvision's layout; saved as an absolute path)",
    "per_class": "train on a balanced subsample of n images per class",
    "model": "resnet18 or mlp",
    "stem": "resnet18 stem: small (3x3, stride 1) or imagenet (7x7 stride 2 + max-pool); not with --model mlp",
    "width": "channel multiplier (1 = 64..512 channels)",
    "bias": "classifier bias",
    "loss": "mse (1/(2N)||F-Y||^2, the UFM scaling), mse_torch (torch.nn.MSELoss) or ce",
    "epochs": "number of epochs",
    "batch_size": "global batch size (split across torchrun processes)",
    "lr": "SGD learning rate (default: 0.05 for ce/mse_torch, 0.01 = 0.05*2/K for mse: the same training)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay wd, penalty wd/2 ||theta||^2 (default: 5e-4 for ce/mse_torch, "
                    "2.5e-3 = 5e-4*K/2 for mse)",
    "lr_step": "divide the lr by 1/lr_gamma every lr_step epochs",
    "lr_gamma": "lr factor per step",
    "eval_every": "measure collapse every this many epochs (and after the last)",
    "measure_per_class": "images per class measured from the train and test sets (default: about 10%% of "
                         "the training set)",
    "measure_batch_size": "batch size of the metric pass",
    "seed": "random seed",
    "device": "cpu, cuda or cuda:N",
    "bf16": "bf16 autocast on CUDA",
    "channels_last": "channels_last memory format on CUDA",
    "threads": "CPU threads (torch.set_num_threads); 1 is fastest for small models on a busy machine",
}


def register(sub) -> None:
    """Add the ``train`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("train", help="train a network (ResNet18/MLP) and measure collapse per layer",
                       description=__doc__.splitlines()[0] + " Writes config.toml, metrics.csv, "
                       "summary.json, figure.png/.pdf and checkpoint.pt to --out.")
    p.add_argument("--out", required=True, help="output folder (an existing run needs --resume)")
    p.add_argument("--config", help="TOML file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default is None else f" (default {f.default})"
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=_HELP[f.name] + default)
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type).removesuffix(" | None")]
        p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                       help=_HELP[f.name] + default)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> None:
    from nclab.nets.experiment import runs_from_config, train_runs
    from nclab.nets.train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    experiment, runs = runs_from_config(args.config) if args.config else ("", {"": TrainConfig()})
    runs = {k: TrainConfig.from_dict(c.to_dict() | overrides) for k, c in runs.items()}  # data made absolute
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
    from nclab.nets.train import nc3_frame

    fin, cfg = summary["final"], summary["config"]
    frame = nc3_frame(cfg["loss"], cfg.get("bias", False))
    print(f"{summary['data_source']}; epoch {summary['final_epoch']}; metric pass / epoch = "
          f"{summary['metric_pass_over_epoch']:.3f}; NC3 ({frame.upper()}) = nc3_{frame}")
    for split, levels in fin.items():
        net = levels.get("network", {})
        if "accuracy" not in net:
            continue
        print(f"  {split} (measured subsample, eval mode): accuracy {net['accuracy']:.4f}, "
              f"objective {net.get('objective', float('nan')):.4g}")
        for level, m in levels.items():
            if level != "network":
                key = f"nc3_{frame}"
                extra = f"  {key} {m[key]:.3e}  nc4 {m['nc4']:.3f}" if key in m else ""
                print(f"    {level:<12} nc1 {m['nc1']:.3e}  nc2_etf {m['nc2_etf']:.3e}{extra}")
