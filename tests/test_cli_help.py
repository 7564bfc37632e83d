"""Every option of every command has help, shows its default, and no raw reST reaches the help."""
import argparse
import re

import pytest

from nclab.cli import HelpFormatter, build_parser, main


def walk(parser, path=("nclab",)):
    """(command path, parser) for the top-level parser and every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


PARSERS = list(walk(build_parser()))
ACTIONS = [(" ".join(path), a) for path, p in PARSERS for a in p._actions
           if not isinstance(a, argparse._HelpAction)]
IDS = [f"{cmd} {'/'.join(a.option_strings) or a.dest}" for cmd, a in ACTIONS]


def shown_help(action) -> str:
    """The help text as --help prints it (defaults added, %(default)s expanded)."""
    formatter = HelpFormatter("nclab")
    return formatter._expand_help(action) if action.help else ""


def test_every_command_is_walked():
    assert {path[-1] for path, _ in PARSERS} >= {"reproduce", "run", "sweep", "measure", "make-example",
                                                   "theory", "train"}


@pytest.mark.parametrize("cmd, action", ACTIONS, ids=IDS)
def test_every_argument_has_help(cmd, action):
    assert action.help and action.help.strip(), f"{cmd}: {action.dest} has no help"
    if isinstance(action, argparse._SubParsersAction):
        for choice in action._choices_actions:
            assert choice.help and choice.help.strip(), f"{cmd}: command {choice.dest} has no help"


@pytest.mark.parametrize("cmd, action", ACTIONS, ids=IDS)
def test_every_default_is_shown(cmd, action):
    """An option with a default other than None shows it; flags (store_true: off unless
    given) and --version are exempt."""
    if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return
    text = shown_help(action)
    default = action.default
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    assert "default" in text and shown in text, f"{cmd} {action.option_strings}: {text!r}"


@pytest.mark.parametrize("path, parser", PARSERS, ids=[" ".join(p) for p, _ in PARSERS])
def test_help_has_no_raw_markup(path, parser, capsys):
    text = parser.format_help()
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:", ":attr:", "(default None)", "(default ()"):
        assert markup not in text, f"{' '.join(path)} --help shows {markup!r}"
    assert not re.search(r"\{[a-z_]+\}", parser.description or ""), parser.description


@pytest.mark.parametrize("args, words", [
    (["thoery"], ["argument COMMAND", "did you mean 'theory'?"]),
    (["sweep", "plian"], ["argument KIND", "did you mean 'plain'?"]),
    (["measure", "--example", "--preset", "zhu"], ["--preset", "did you mean 'zhu2021'?"]),
    (["make-example", "x.npz", "--geometry", "eft"], ["--geometry", "did you mean 'etf'?"]),
    (["theory", "--K", "4", "--lam", "1", "1"], ["--n", "nclab theory --help"]),
    (["theory", "--K", "four", "--n", "5", "--lam", "1", "1"], ["--K", "invalid int value"]),
    (["sweep", "plain", "--pionts", "3"], ["--pionts", "did you mean '--points'?", "nclab sweep --help"]),
    (["theory", "--K", "4", "--n", "5", "--lam", "1", "1", "--bias", "extra"], ["nclab theory: error: unrecognized arguments: extra"]),
])
def test_usage_errors_are_one_line_with_a_suggestion(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    for word in words:
        assert word in err, err


def test_usage_error_outside_main_still_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["sweep", "plian"])
    assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_run_set_key_outside_every_section_is_suggested(tmp_path, capsys):
    from nclab.experiments import config as C

    assert main(["run", str(C.CONFIG_DIR / "ufm.toml"), "--set", "solvr.steps=3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'solver.steps'?" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_reproduce_with_nothing_to_run_is_an_error(tmp_path, monkeypatch, capsys):
    """No NAME and no built-in UFM config found (a damaged installation): one line, exit 2."""
    from nclab.experiments import config as C, registry

    monkeypatch.setattr(C, "CONFIG_DIR", tmp_path / "no-configs")
    with pytest.raises(ValueError, match=r"^NAME: no experiment chosen"):
        registry.select([], registry.Options(), {})
    assert main(["reproduce", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no experiment chosen" in err and "fig5" in err, err
    assert not (tmp_path / "o").exists()


def test_command_reference_page_is_current():
    """docs/cli.md is generated from the parser: regenerate with `python -m nclab.clidoc > docs/cli.md`."""
    from pathlib import Path

    from nclab.clidoc import reference

    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert page.read_text() == reference() + "\n", "docs/cli.md is stale: python -m nclab.clidoc > docs/cli.md"
