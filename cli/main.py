"""The `lorita` command: one entry point for the local job and the service."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorita", description="LoRITa model compression.")
    sub = parser.add_subparsers(dest="command", required=True)
    from cli import local_commands

    local_commands.register(sub)
    import importlib

    try:
        service_commands = importlib.import_module("cli.service_commands")
    except ModuleNotFoundError:  # a core-only install has no service commands
        pass
    else:
        service_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
