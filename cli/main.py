"""The `lorita` command: one entry point for the local job and the service."""

from __future__ import annotations

import argparse
import sys

OPTIONAL_COMMANDS = ("cli.analysis_commands", "cli.service_commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorita", description="LoRITa model compression.")
    sub = parser.add_subparsers(dest="command", required=True)
    from cli import local_commands

    local_commands.register(sub)
    import importlib

    for name in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:  # a core-only install has no service commands
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `lorita plan ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
