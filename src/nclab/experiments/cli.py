"""`nclab reproduce`, `nclab run`, `nclab sweep`: experiments from configs."""
from __future__ import annotations

import time
from pathlib import Path

from nclab.experiments import config as C
from nclab.experiments import report, runner, sweep
from nclab.nets.experiment import NETWORK_EXPERIMENTS  # network figures: run only when named

QUICK_FACTOR = 20


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="rerun the paper's experiments: figures, tables, report",
                       description="Rerun the paper's UFM experiments (all of them when no NAME is "
                       f"given: {', '.join(C.builtin_names())}) or the network ones "
                       f"({', '.join(NETWORK_EXPERIMENTS)}, by name), and write DIR/report.md.")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--out", type=Path, help="output folder (default: runs/reproduce-<date-time>)")
    p.add_argument("--iterations", type=int, help="GD iterations for every UFM experiment")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true",
                   help=f"a fast smoke run: 1/{QUICK_FACTOR} of the iterations, tiny networks")
    p.add_argument("--data", help="folder with MNIST / CIFAR-10 for fig5 / fig10 (default: digits)")
    p.add_argument("--resume", action="store_true", help="continue in --out, skipping finished experiments")
    p.add_argument("--force", action="store_true", help="overwrite results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_reproduce)

    r = sub.add_parser("run", help="run any UFM of the family from a TOML config",
                       description="Solve the UFM described by CONFIG.toml (see nclab.experiments.config) "
                       "and write config.toml, metrics.csv, summary.json and figure.{png,pdf} to --out.")
    r.add_argument("config", help="a TOML config, e.g. the config.toml of an earlier run")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set solver.steps=5000 --set model.lams=[0.01,0.01]")
    r.add_argument("--out", type=Path, help="output folder (default: runs/<name>-<date-time>)")
    r.add_argument("--force", action="store_true", help="overwrite results already in --out")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("sweep", help="phase diagrams: final objective and NC metrics against c",
                       description=sweep.__doc__)
    s.add_argument("kind", choices=sweep.SWEEPS)
    s.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default: runs)")
    s.add_argument("--K", type=int, default=4)
    s.add_argument("--n", type=int, default=50)
    s.add_argument("--d", type=int, default=20)
    s.add_argument("--points", type=int, default=25, help="grid points in c")
    s.add_argument("--steps", type=int, help="GD iterations (default 20000 plain, 30000 extended)")
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--init-std", type=float, nargs="+", default=[0.01, 0.1, 0.5],
                   help="initialisation scales (extended sweep)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_sweep)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _cmd_reproduce(args) -> None:
    names = args.names or C.builtin_names()
    known = C.builtin_names() + list(NETWORK_EXPERIMENTS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"NAME: unknown experiment(s) {unknown}; choose from {known}")
    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations: must be positive, got {args.iterations}")
    out = args.out or Path("runs") / f"reproduce-{_stamp()}"
    if not args.resume:
        runner.prepare_output(out, args.force)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    sections, start = [], time.perf_counter()
    try:
        for name in names:
            sections.append(_reproduce_one(name, out, args))
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # nothing was written: leave no empty folder behind
        raise
    header = (f"# nclab reproduction report\n\nTirer & Bruna, *Extended Unconstrained Features Model for "
              f"Exploring Deep Neural Collapse* (ICML 2022). Experiments: {', '.join(names)}. Theory: "
              "THEORY.md §3 (f* is the exact global optimum; '—' where no closed form exists).\n")
    path = report.write_report(out, sections, header)
    if not args.quiet:
        print(f"wrote {path} ({len(names)} experiments, {time.perf_counter() - start:.0f} s)")


def _reproduce_one(name: str, out: Path, args) -> str:
    if name in NETWORK_EXPERIMENTS:
        from nclab.nets.experiment import report_markdown, run_network_experiment

        summary = run_network_experiment(name, out / name, data=args.data, device=args.device,
                                         quiet=args.quiet, quick=args.quick, resume=args.resume,
                                         force=args.force)
        return report_markdown(summary, name)
    cfg = C.builtin(name)
    steps = args.iterations or (max(cfg["solver"]["steps"] // QUICK_FACTOR, 100) if args.quick else None)
    overrides = [f"solver.device={args.device!r}".replace("'", '"')]
    if steps:
        overrides.append(f"solver.steps={steps}")
        overrides.append(f"solver.log_every={max(min(cfg['solver']['log_every'], steps // 50), 1)}")
    cfg = C.apply_overrides(cfg, overrides)
    summary = runner.load_summary(out / name) if args.resume else None
    if summary is not None and (out / name / "config.toml").read_text() == C.dumps(cfg):
        if not args.quiet:
            print(f"{name}: finished earlier, skipped (--resume)")
    else:
        if not args.quiet:
            print(f"{name}: {cfg['title']}", flush=True)
        summary = runner.run_experiment(cfg, out / name, quiet=args.quiet)
    return report.ufm_section(summary, name)


def _cmd_run(args) -> None:
    cfg = C.apply_overrides(C.load(args.config), args.set)
    out = args.out or Path("runs") / f"{cfg['name']}-{_stamp()}"
    runner.prepare_output(out, args.force)
    summary = runner.run_experiment(cfg, out, quiet=args.quiet)
    if not args.quiet:
        gap = summary["gap"]
        print(f"wrote {out}: objective {summary['objective']:.10g}"
              + (f", f* {summary['objective_optimal']:.10g}, gap {gap:.3e}" if gap is not None else ""))


def _cmd_sweep(args) -> None:
    path = sweep.run_sweep(args.kind, args.out, K=args.K, n=args.n, d=args.d, points=args.points,
                           steps=args.steps, lr=args.lr, init_stds=tuple(args.init_std),
                           device=args.device, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {path} and {path.with_suffix('.png')}")
