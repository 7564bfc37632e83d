"""Settings of gradient descent on the UFM family (one frozen dataclass, :class:`GD`)."""
from __future__ import annotations

from dataclasses import dataclass

from nclab.settings import PAPER, Settings, SettingsError, at_least, check_device, fraction, positive, setting


@dataclass(frozen=True)
class GD(Settings):
    """How :func:`nclab.ufm.solve` runs: plain GD (heavy ball with momentum > 0) on B problems.

    The batch holds ``restarts`` problems with seeds ``seed, seed + 1, ...`` unless
    :func:`~nclab.ufm.solve` is given per-problem seeds, λ rows or initialisation scales.
    """

    _where = "solver"

    steps: int = setting(10_000, help="GD iterations", check=at_least(0))
    lr: float = setting(PAPER["ufm_lr"], help="step size η", check=positive)
    momentum: float = setting(0.0, help="heavy-ball momentum μ in [0, 1); 0 is plain GD (the paper's)",
                              check=fraction)
    seed: int = setting(0, help="seed of the first problem's initialisation", check=at_least(0))
    restarts: int = setting(1, help="independent initialisations solved at once (seeds seed, seed+1, ...)",
                            check=at_least(1))
    init_std: float = setting(PAPER["ufm_init_std"], help="std of the i.i.d. Gaussian initialisation",
                              check=at_least(0))
    dtype: str = setting("float64", help="float64 for the theory checks, float32 for speed",
                         choices=("float64", "float32"))
    device: str = setting("cpu", help="cpu, cuda or cuda:N", check=check_device)
    backend: str = setting("auto", help="auto (numpy for small CPU problems, else torch), numpy or torch",
                           choices=("auto", "numpy", "torch"))
    log_every: int = setting(100, help="record the objective and NC metrics every this many iterations",
                             check=at_least(1))
    tol: float | None = setting(None, help="stop once every problem's relative gap to f* is below this",
                                check=positive)
    threads: int | None = setting(None, help="CPU threads stepping a numpy batch (default: every core)",
                                  check=at_least(1))
    metrics: bool = setting(True, help="compute NC metrics of every feature level at each log")

    def _check_together(self) -> None:
        if self.device.startswith("cuda") and self.backend == "numpy":
            raise SettingsError("solver.backend: numpy runs on the CPU only; use backend = 'torch' (or 'auto') "
                                "with a CUDA device")
