"""The `defectscope` command line.

Each command group lives in its own module and registers its subcommands here; heavy imports (torch,
Ray) happen inside the commands so that `defectscope --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from deployments.cli import banks, evaluation, inspection, service
from pipeline.errors import DefectscopeError

COMMAND_MODULES = (inspection, banks, service, evaluation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope",
        description="Visual inspection for factory lines (the AnomalyGPT method).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; user errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except DefectscopeError as error:
        print(f"defectscope: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectscope: interrupted", file=sys.stderr)
        return 130


class _ThirdPartyChatter(logging.Filter):
    """Drops open_clip's root-logger lines; defectscope says the same things once, in its words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "open_clip" in record.pathname)


def configure_logging(verbosity: int) -> None:
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("defectscope: %(levelname)s: %(message)s"))
    handler.addFilter(_ThirdPartyChatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("transformers", "huggingface_hub", "ray", "filelock", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
