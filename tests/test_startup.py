"""Start-up: each command imports only what it uses.

``nclab --help``, every ``nclab CMD --help`` and ``nclab theory`` load neither torch nor
matplotlib; ``nclab measure FILE`` loads no matplotlib and no network code (only what
parsing needs: nclab.nets.cli, which registers ``train``, and nclab.nets.settings, whose
TrainSettings build its flags). Each case runs in a
fresh interpreter, calls nclab.cli.main and prints the sorted module names.
"""
import subprocess
import sys

import numpy as np
import pytest

COMMANDS = ("reproduce", "run", "sweep", "measure", "make-example", "theory", "train")

SCRIPT = """
import sys
from nclab.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print("exit", code)
print("\\n".join(sorted(sys.modules)))
"""


def modules(*args, cwd=None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, cwd=cwd,
                         timeout=120)
    lines = out.stdout.splitlines()
    exits = [l for l in lines if l.startswith("exit ")]
    assert exits == ["exit 0"], out.stdout[-2000:] + out.stderr[-2000:]
    return set(lines[lines.index(exits[0]) + 1:])


def heavy(mods: set[str], *roots: str) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in roots)


#: the network package's modules that parsing the command line needs
PARSING = {"nclab.nets.cli", "nclab.nets.settings"}


def network_code(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.startswith("nclab.nets.") and m not in PARSING)


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS),
                                  ["theory", "--K", "4", "--n", "50", "--lam", "0.005", "0.005", "0.005"],
                                  ["theory", "--K", "4", "--n", "5", "20", "60", "115", "--lam", "0.005", "0.005"]],
                         ids=lambda a: " ".join(a))
def test_help_and_theory_load_neither_torch_nor_matplotlib(args):
    mods = modules(*args)
    assert not heavy(mods, "torch", "matplotlib"), heavy(mods, "torch", "matplotlib")[:5]


def test_measure_file_loads_no_plotting_and_no_network_code(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", features=rng.normal(size=(30, 5)), labels=np.arange(30) % 3)
    mods = modules("measure", str(tmp_path / "f.npz"), cwd=tmp_path)
    assert "nclab.metrics" in mods and "torch" in mods  # it did measure
    assert not heavy(mods, "matplotlib") and not network_code(mods), network_code(mods)


def test_import_nclab_is_lazy_and_complete():
    out = subprocess.run([sys.executable, "-c", (
        "import sys, nclab\n"
        "assert 'torch' not in sys.modules, 'import nclab loaded torch'\n"
        "from nclab import ufm\n"
        "ufm.GD, ufm.UFM\n"
        "assert 'torch' not in sys.modules, 'the UFM settings loaded torch'\n"
        "for name in nclab.__all__: getattr(nclab, name)\n"
        "for name in ufm.__all__: getattr(ufm, name)\n"
        "import nclab.ufm.solve\n"
        "assert callable(ufm.solve) and ufm.solve.__module__ == 'nclab.ufm.solve', ufm.solve\n"
        "print(sorted(set(dir(nclab)) & set(nclab.__all__)) == sorted(nclab.__all__))\n")],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
