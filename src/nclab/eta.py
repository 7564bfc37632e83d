"""A notice before a long run: the expected wall time, measured from its first steps."""
from __future__ import annotations

import sys

#: runs expected to take longer than this many seconds say so
LONG_RUN_S = 600.0


def expected_seconds(done: float, total: float, elapsed: float) -> float:
    """Wall time of the whole run if the rest goes at the pace of the first ``done`` of ``total`` units."""
    return elapsed / max(done, 1e-12) * total


def notice_if_long(label: str, done: float, total: float, elapsed: float, unit: str) -> bool:
    """One line on stderr when the run will take more than :data:`LONG_RUN_S`; True if printed.

    ``done`` of ``total`` ``unit`` (e.g. "iterations", "epochs") took ``elapsed`` seconds.
    """
    expected = expected_seconds(done, total, elapsed)
    if expected <= LONG_RUN_S:
        return False
    print(f"nclab: {label} will take about {_duration(expected)} at these settings (measured over the first "
          f"{done:g} of {total:g} {unit}); lower the {unit} or stop with Ctrl-C and resume later with --resume",
          file=sys.stderr, flush=True)
    return True


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
