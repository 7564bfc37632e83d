"""The named experiments of ``nclab reproduce``: name → settings, runner, report section.

UFM experiments come from the TOML configs shipped in ``configs/``; the network ones
(Fig. 5, Fig. 10) are listed here and import the network code only when they run.
Each experiment declares which ``reproduce`` options apply to it, so an option that
applies to none of the chosen experiments is an error rather than silently ignored.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from nclab.experiments import config as C

#: ``nclab reproduce --quick`` runs 1/QUICK_FACTOR of each UFM experiment's iterations
QUICK_FACTOR = 20
#: reproduce options that apply to each kind of experiment
OPTIONS = {"ufm": ("iterations",), "network": ("data", "full")}
NETWORK = {"fig5": "ResNet18 on MNIST, MSE and cross-entropy (paper Fig. 5)",
           "fig10": "ResNet18 on CIFAR-10, MSE (paper Fig. 10)"}


@dataclass(frozen=True)
class Options:
    """The ``reproduce`` options that shape an experiment's settings."""

    quick: bool = False
    iterations: int | None = None
    device: str = "cpu"
    data: str | None = None
    full: bool = False  # network experiments at the paper's scale (else the CPU default)


@dataclass(frozen=True)
class Experiment:
    """One named experiment: ``kind`` is "ufm" or "network"."""

    name: str
    kind: str
    title: str

    def settings(self, opts: Options):
        """The experiment's settings under ``opts``: a UFMRun, or {run: TrainSettings}."""
        if self.kind == "ufm":
            return _ufm_settings(self.name, opts)
        from nclab.nets.experiment import experiment_configs

        return experiment_configs(self.name, data=opts.data, device=opts.device, quick=opts.quick, full=opts.full)

    def notice(self, settings, opts: Options) -> str | None:
        """A line to print before the experiment starts: the expected GPU time of ``--full`` runs."""
        if self.kind != "network" or not opts.full:
            return None
        from nclab.nets.experiment import gpu_estimate

        return gpu_estimate(self.name, settings)

    @staticmethod
    def settings_record(settings) -> dict:
        """Plain data of the settings, recorded in the run folder to check ``--resume``."""
        if isinstance(settings, C.UFMRun):
            return settings.to_dict()
        from nclab.nets.training import settings_record

        return {run: settings_record(s) for run, s in settings.items()}

    def run(self, settings, folder, *, quiet: bool, resume: bool) -> dict:
        """Run into ``folder`` (a :class:`nclab.rundir.Folder`); returns the summary."""
        if self.kind == "ufm":
            from nclab.experiments.runner import run_experiment

            return run_experiment(settings, folder, quiet=quiet)
        from nclab.nets.experiment import run_network_experiment

        return run_network_experiment(self.name, folder, runs=settings, quiet=quiet, resume=resume)

    def load_summary(self, folder) -> dict | None:
        """The summary of a finished run in ``folder``, or None when missing or unreadable."""
        from nclab.experiments.runner import load_summary

        return load_summary(folder, required="levels" if self.kind == "ufm" else "runs")

    def section(self, summary: dict, rel_dir: str, *, smoke: bool) -> str:
        """The report's markdown section."""
        if self.kind == "ufm":
            from nclab.experiments.report import ufm_section

            text = ufm_section(summary, rel_dir)
        else:
            from nclab.nets.experiment import report_markdown

            text = report_markdown(summary, rel_dir)
        if smoke:
            head, _, rest = text.partition("\n")
            text = f"{head}\n\n**Smoke run (--quick): too short to reach the optimum; not a reproduction.**\n{rest}"
        return text


def _ufm_settings(name: str, opts: Options) -> C.UFMRun:
    run = C.builtin(name)
    steps = opts.iterations or (max(run.solver.steps // QUICK_FACTOR, 100) if opts.quick else None)
    solver = run.solver.replace(device=opts.device)
    if steps:
        solver = solver.replace(steps=steps, log_every=max(min(solver.log_every, steps // 50), 1))
    return run.replace(solver=solver)


def experiments() -> dict[str, Experiment]:
    """Every named experiment, UFM ones first (the default of ``reproduce``), in report order."""
    out = {name: Experiment(name, "ufm", C.builtin(name).display_title) for name in C.builtin_names()}
    out |= {name: Experiment(name, "network", title) for name, title in NETWORK.items()}
    return out


def select(names: list[str], opts: Options, given: dict[str, bool]) -> list[Experiment]:
    """The experiments ``names`` (all UFM ones when empty), checked against the options.

    ``given``: option name -> whether the user set it. An unknown name gets a close-match
    suggestion; an option that applies to none of the chosen experiments is an error, and
    so is choosing nothing (no names, and no built-in UFM configs found).
    """
    known = experiments()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"NAME: unknown experiment {name!r}{hint} (choose from {', '.join(known)})")
    chosen = [known[n] for n in dict.fromkeys(names)] or [e for e in known.values() if e.kind == "ufm"]
    if not chosen:
        raise ValueError(f"NAME: no experiment chosen: no built-in UFM config was found in {C.CONFIG_DIR} "
                         f"(a damaged installation? reinstall nclab), or name one of {', '.join(known) or 'none'}")
    kinds = {e.kind for e in chosen}
    for kind, options in OPTIONS.items():
        for option in options:
            if given.get(option) and kind not in kinds:
                applies = ", ".join(e.name for e in known.values() if e.kind == kind)
                raise ValueError(f"--{option}: applies only to {applies}, not to "
                                 f"{', '.join(e.name for e in chosen)}; drop --{option} or name one of those")
    return chosen
