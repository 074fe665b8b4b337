"""What every client program (musicgen-client, musicgen-osc, musicgen-web) shares: the arguments that name the
server and its token, and the log format."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .connection import DEFAULT_TARGET


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--server (default $MUSICGEN_SERVER or the loopback default) and --token (default $MUSICGEN_TOKEN)."""
    parser.add_argument("--server", default=os.environ.get("MUSICGEN_SERVER", DEFAULT_TARGET),
                        help=f"HOST:PORT of the MusicGen server (default $MUSICGEN_SERVER or {DEFAULT_TARGET})")
    parser.add_argument("--token", default=os.environ.get("MUSICGEN_TOKEN"),
                        help="bearer token (default $MUSICGEN_TOKEN)")


def configure_logging(level: str) -> None:
    """key=value lines on stderr, as the server writes them."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
