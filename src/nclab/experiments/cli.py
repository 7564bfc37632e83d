"""`nclab reproduce`, `nclab run`, `nclab sweep`: experiments from settings into run folders."""
from __future__ import annotations

import time
from pathlib import Path

from nclab.experiments import registry

RUNS = Path("runs")


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="rerun the paper's experiments: figures, tables, report",
                       description="Rerun the paper's UFM experiments (all of them when no NAME is given) or "
                       f"the network ones ({', '.join(registry.NETWORK)}, by name), and write report.md to --out.")
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: every UFM one)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/reproduce-<date-time>)")
    p.add_argument("--iterations", type=int,
                   help="GD iterations for every UFM experiment (default: each experiment's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: 1/{registry.QUICK_FACTOR} of the iterations, tiny networks")
    p.add_argument("--data", help="folder with MNIST / CIFAR-10 for fig5 / fig10 (torchvision's layout; default: "
                   "the MNIST sample built in, 400 train / 100 held-out images per class)")
    p.add_argument("--full", action="store_true",
                   help="fig5 / fig10 at the paper's scale (full-width ResNet18, 200 epochs; the whole --data set, "
                   "else the MNIST sample), made for a GPU; prints its expected GPU time first (default: a "
                   "CPU-sized run, about 5 minutes for fig5 on 2 cores)")
    _add_folder_options(p)
    p.set_defaults(func=_cmd_reproduce)

    r = sub.add_parser("run", help="run any UFM of the family from a TOML config",
                       description="Solve the UFM described by CONFIG.toml (see nclab.experiments.config) "
                       "and write config.toml, metrics.csv, summary.json and figure.{png,pdf} to --out.")
    r.add_argument("config", help="a TOML config, e.g. the config.toml of an earlier run")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a value of the config (repeatable), e.g. --set solver.steps=5000 "
                   "--set model.lams=[0.01,0.01] (default: none)")
    r.add_argument("--out", type=Path, help="output folder (default: runs/<name>-<date-time>)")
    _add_folder_options(r)
    r.set_defaults(func=_cmd_run)

    from nclab.experiments.sweep import SWEEPS, SweepSettings

    s = sub.add_parser("sweep", help="phase diagrams: final objective and NC metrics against c",
                       description="Phase diagrams of the plain (c = K√(nλ_Hλ_W)) or extended linear UFM "
                       "(c₃): the whole λ grid solved in one batched run per initialisation scale, against "
                       "the exact optimum.")
    s.add_argument("kind", choices=SWEEPS, metavar="KIND", help=_sweep_help(SweepSettings, "kind"))
    s.add_argument("--out", type=Path, help="output folder (default: runs/sweep-<kind>-<date-time>)")
    for name in ("K", "n", "d", "points", "steps", "lr", "seed", "device"):
        kind = {"device": str, "lr": float}.get(name, int)
        s.add_argument(f"--{name}", type=kind, metavar=name.upper(), help=_sweep_help(SweepSettings, name))
    s.add_argument("--init-std", dest="init_stds", type=float, nargs="+", metavar="STD",
                   help=_sweep_help(SweepSettings, "init_stds"))
    _add_folder_options(s)
    s.set_defaults(func=_cmd_sweep)

    from nclab.experiments.plot_cmd import register as register_plot

    register_plot(sub)


def _sweep_help(settings_class, name: str) -> str:
    """A sweep setting's help for argparse: its default as typed on the command line, % escaped."""
    text = settings_class.help(name)
    default = settings_class.__dataclass_fields__[name].default
    if isinstance(default, tuple):
        text = text.replace(f"(default {default})", f"(default {' '.join(map(str, default))})")
    return text.replace("%", "%%")


def _add_folder_options(p) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the nclab run in --out: finished parts are skipped, settings must match")
    p.add_argument("--force", action="store_true",
                   help="replace nclab's earlier results in --out (only files nclab wrote are removed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _mode(args) -> str:
    if args.resume and args.force:
        raise ValueError("--resume, --force: choose one (continue the run, or replace it)")
    return "resume" if args.resume else "force" if args.force else "new"


def default_out(prefix: str) -> Path:
    """runs/<prefix>-<date-time>, with -2, -3, ... when that name is taken."""
    base = RUNS / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _cmd_reproduce(args) -> None:
    from nclab.rundir import RunDir

    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations: must be a positive integer, got {args.iterations}")
    opts = registry.Options(quick=args.quick, iterations=args.iterations, device=args.device, data=args.data,
                            full=args.full)
    chosen = registry.select(args.names, opts, {"iterations": args.iterations is not None, "data": bool(args.data),
                                                "full": args.full})
    settings = {e.name: e.settings(opts) for e in chosen}  # every setting checked before anything runs
    for e in chosen:
        notice = e.notice(settings[e.name], opts)
        if notice:
            _say(args, notice)
    start, sections = time.perf_counter(), []
    with RunDir(args.out or default_out("reproduce"), mode=_mode(args)) as rd:
        for e in chosen:
            summary = _run_experiment(rd, e, settings[e.name], args)
            sections.append(e.section(summary, e.name, smoke=args.quick))
        names = ", ".join(e.name for e in chosen)
        header = (f"# nclab reproduction report\n\nTirer & Bruna, *Extended Unconstrained Features Model for "
                  f"Exploring Deep Neural Collapse* (ICML 2022). Experiments: {names}. f* is the exact global "
                  "optimum of the theory ('—' where no closed form exists)."
                  + ("\n\n**Smoke run (--quick): every experiment ran a fraction of its iterations.**"
                     if args.quick else "") + "\n")
        path = rd.write_text("report.md", header + "\n" + "\n".join(sections))
    _say(args, f"wrote {path} ({len(chosen)} experiments, {time.perf_counter() - start:.0f} s)")


def _run_part(rd, name: str, record: dict, run, reuse, args) -> dict:
    """Part ``name`` of the run folder: reuse its summary when it is complete with the same
    settings (``--resume``; ``reuse()`` returns None when its outputs are missing or
    damaged, and then it runs again), else ``run()`` it and mark it complete."""
    if not rd.begin_part(name, record):
        summary = reuse()
        if summary is not None:
            _say(args, f"{name}: finished earlier with the same settings, skipped (--resume)")
            return summary
        _say(args, f"{name}: its outputs are missing or unreadable; running it again")
        rd.begin_part(name, record, again=True)
    summary = run()
    rd.complete_part(name)
    return summary


def _run_experiment(rd, e, settings, args) -> dict:
    folder = rd.folder(e.name)

    def run():
        _say(args, f"{e.name}: {e.title}")
        return e.run(settings, folder, quiet=args.quiet, resume=args.resume)

    return _run_part(rd, e.name, e.settings_record(settings), run, lambda: e.load_summary(folder), args)


def _cmd_run(args) -> None:
    from nclab.experiments import config as C
    from nclab.experiments.runner import load_summary, run_experiment
    from nclab.rundir import RunDir

    run = C.apply_overrides(C.load(args.config), args.set or [])
    with RunDir(args.out or default_out(run.name), mode=_mode(args)) as rd:
        folder = rd.folder()
        summary = _run_part(rd, run.name, run.to_dict(), lambda: run_experiment(run, folder, quiet=args.quiet),
                            lambda: load_summary(folder), args)
    gap = summary["gap"]
    _say(args, f"wrote {rd.root}: objective {summary['objective']:.10g}"
         + (f", f* {summary['objective_optimal']:.10g}, gap {gap:.3e}" if gap is not None else ""))


def _cmd_sweep(args) -> None:
    from nclab.experiments.runner import load_summary
    from nclab.experiments.sweep import SweepSettings, run_sweep
    from nclab.rundir import RunDir

    given = {k: getattr(args, k) for k in SweepSettings.field_names() if getattr(args, k, None) is not None}
    settings = SweepSettings.from_dict(given | {"kind": args.kind})
    with RunDir(args.out or default_out(f"sweep-{args.kind}"), mode=_mode(args)) as rd:
        folder = rd.folder()
        _run_part(rd, "sweep", settings.to_dict(), lambda: run_sweep(settings, folder, quiet=args.quiet),
                  lambda: load_summary(folder, required="kind", outputs=("sweep.csv", "figure.png")), args)
    _say(args, f"wrote {rd.root}/sweep.csv and {rd.root}/figure.png")
