"""`tridlm` -- one command line, one sub-command per module in `tridlm.commands`.

Each module there defines `add_parser(subparsers)` (which sets `func` on its parser) so that a
sub-command's options live beside the code that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .extras import missing_extra_hint

COMMANDS = ("demo", "generate", "chat", "train", "convert", "serve", "bench", "eval", "infill", "revise", "env")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tridlm", description="Tri-mode language models: AR, block diffusion and "
                                     "self-speculative decoding from one set of weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tridlm.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tridlm.commands.{name}":
                continue  # that sub-command is not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:  # an optional extra this command needs is not installed
        hint = missing_extra_hint(args.command, e.name)
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"tridlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
