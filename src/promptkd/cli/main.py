"""The `promptkd` command: a thin layer over the Python API, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from promptkd._version import __version__

# subcommand -> module under promptkd.cli; each has HELP, add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "train": "train",
    "pretrain": "pretrain",
    "distill": "distill",
    "predict": "predict",
    "export": "export",
    "protocol": "protocol",
    "tta": "tta",
    "tta-stats": "tta_stats",
    "zeroshot": "zeroshot",
    "linear-probe": "linear_probe",
    "retrieval": "retrieval",
    "report": "report",
    "models": "models",
    "convert": "convert",
    "convert-weights": "convert_weights",
    "inspect": "inspect",
    "world-report": "world_report",
    "world-render": "world_render",
    "teacher-cache": "teacher_cache",
    "features": "features",
    "attribute-search": "attribute_search",
}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``error: argument --views: must be ...``) like every other refusal, not the
    whole usage block; subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s arguments are added (all of them when None), so `promptkd --help` and
    argument errors do not import torch (each command imports what it needs when it runs)."""
    parser = _Parser(
        prog="promptkd",
        description="Prompt learning, prompt distillation (PromptKD) and test-time prompt tuning for CLIP models.",
    )
    parser.add_argument("--version", action="version", version=f"promptkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"promptkd.cli.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        if command is None or command == name:
            module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    from promptkd.errors import PromptKDError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser(command) if command else build_parser("")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and argument errors (exit 2, one line on stderr)
        return stop.code if isinstance(stop.code, int) else 2
    # open_clip logs its model-building steps at INFO on the root logger: keep those for --verbose only.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("promptkd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "run", None):
        parser.print_help()
        return 1
    try:
        return int(args.run(args) or 0)
    except PromptKDError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
