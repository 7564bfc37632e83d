"""The command reference, ``docs/cli.md``, generated from the argparse definitions.

    python -m nclab.clidoc > docs/cli.md

A test checks that ``docs/cli.md`` equals :func:`reference`, so the page never drifts
from the commands.
"""
from __future__ import annotations

import argparse
import os

#: help is wrapped at this width, whatever the terminal
WIDTH = "100"


def reference() -> str:
    """Markdown: every command's ``--help`` as argparse renders it."""
    from nclab.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        commands = _subcommands(parser)
        out = ["# Command reference", "",
               "Every `nclab` command's `--help`, generated from the argparse definitions by "
               "`python -m nclab.clidoc > docs/cli.md` (a test checks that this page is current). "
               "Run folders (`--out`, `--resume`, `--force`) are described in [run-folders.md](run-folders.md).",
               "", "## nclab", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in commands.items():
            out += [f"## nclab {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
        return "\n".join(out)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


if __name__ == "__main__":
    print(reference())
