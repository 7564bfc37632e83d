"""`nclab plot RUN_DIR`: redraw a run's figures from its saved tables, without recomputing.

RUN_DIR is a folder from ``nclab run`` (metrics.csv, summary.json, config.toml), ``nclab sweep``
(sweep.csv, summary.json) or ``nclab reproduce`` (one subfolder per experiment). Figures are
written through the run folder (:class:`nclab.rundir.RunDir`, mode "resume") as the part that
owns them (:meth:`nclab.rundir.RunDir.redraw`).
"""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plot", help="redraw a run's figures from its saved tables",
                       description="Redraw the figures (and caption.md) of a run folder from its saved tables "
                       "(metrics.csv/restarts.csv, summary.json, sweep.csv, config.toml) without recomputing: a "
                       "folder of nclab run, nclab sweep or nclab reproduce (every experiment in it).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder")
    p.add_argument("--size", choices=("full", "column", "both"), default="both",
                   help="figure width: full (6.9 in), column (3.3 in) or both (default both)")
    p.add_argument("--format", choices=("pdf", "png", "svg"), action="append", dest="formats",
                   help="file format (repeatable; default pdf and png)")
    p.set_defaults(func=_cmd_plot)


class PlotError(ValueError):
    pass


def _kind(folder) -> str | None:
    """"sweep", "ufm" (a UFM experiment's summary: levels and verdict_line), "network" (any other
    folder with metrics.csv and summary.json, e.g. nclab train or fig5) or None (nothing to draw)."""
    import json

    try:
        summary = json.loads(folder.path("summary.json").read_text())
    except (OSError, ValueError):
        return None
    if folder.path("sweep.csv").is_file():
        return "sweep"
    if not folder.path("metrics.csv").is_file():
        return None
    if isinstance(summary, dict) and "levels" in summary and "verdict_line" in summary \
            and folder.path("config.toml").is_file():
        return "ufm"
    return "network"


def redraw(run_dir, *, sizes=("full", "column"), formats=("pdf", "png"), say=print) -> list[Path]:
    """Redraw every figure of ``run_dir``; returns the paths written. Raises PlotError."""
    from nclab.rundir import META, RunDir

    root = Path(run_dir)
    if not root.is_dir():
        raise PlotError(f"RUN_DIR: {root}: no such folder")
    if not (root / META).is_dir():
        raise PlotError(f"RUN_DIR: {root}: not an nclab run folder (no {META}/)")
    written: list[Path] = []
    kw = dict(sizes=tuple(sizes), formats=tuple(formats))
    found = False
    with RunDir(root, mode="resume", option="RUN_DIR") as rd:  # reads and checks the manifest
        parts = list(rd.manifest["parts"])
        if not parts:
            raise PlotError(f"RUN_DIR: {root}: the run folder records no finished part to draw")
        for name in parts:
            folder = rd.folder(name) if (root / name).is_dir() else rd.folder()
            kind = _kind(folder)
            with rd.redraw(name):
                if kind == "sweep":
                    from nclab.experiments import sweep
                    written += sweep.draw_sweep(folder, **kw)
                elif kind == "ufm":
                    from nclab.experiments import runner
                    written += runner.draw_ufm(folder, **kw)
                elif kind == "network":
                    from nclab.nets.plots import redraw as nets_redraw
                    written += nets_redraw(folder.path(), folder, **kw)
                else:
                    say(f"{name}: skipped (no saved tables in {folder.path()})")
                    continue
            found = True
    if not found:
        raise PlotError(f"RUN_DIR: {root}: no saved tables to draw from (metrics.csv or sweep.csv with "
                        "summary.json)")
    return written


def _cmd_plot(args) -> None:
    """Errors (PlotError, RunDirError: ValueErrors) become nclab's one-line message, exit 2."""
    sizes = ("full", "column") if args.size == "both" else (args.size,)
    formats = tuple(dict.fromkeys(args.formats or ("pdf", "png")))
    paths = redraw(args.run_dir, sizes=sizes, formats=formats)
    print(f"redrew {len(paths)} files in {args.run_dir}")
