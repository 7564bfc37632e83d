"""CPU thread settings for small tensor work."""
from __future__ import annotations

import contextlib

import torch

#: below this many elements a torch op gains nothing from several threads
SMALL_WORK = 1 << 20


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with ``n`` intra-op CPU threads (None: leave torch's setting), then restore it.

    Small tensors gain little from several threads, and when other processes share the
    cores, OpenMP threads that spin-wait for each other can slow a run down 20x or more
    (measured here: a quick digits run took 6.6 s with 1 thread and 150 s with 2 on a
    busy 2-core machine; UFM metrics every 100 iterations cut a run from 20k to 3.5k it/s).
    """
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
