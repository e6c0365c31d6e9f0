"""`ferryctl completion bash|zsh`: print a shell completion script, generated from the parser.

shtab writes the script from ferryctl's argparse definitions, so completion never drifts from the
commands and options. Install: `ferryctl completion bash > /etc/bash_completion.d/ferryctl`, or
for zsh `ferryctl completion zsh > "${fpath[1]}/_ferryctl"` (docs/ferryctl.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import shtab

from agent.ctl import render

SHELLS = ("bash", "zsh")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a bash or zsh completion script")
    p.add_argument("shell", choices=SHELLS)


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    return str(shtab.complete(parser, shell=shell))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Offline, like `certs`: print the script (with --json, `{"shell", "script"}`)."""
    text = script(parser, args.shell)
    if args.json:
        render.print_json({"shell": args.shell, "script": text})
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
