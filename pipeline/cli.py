"""What the command lines share: argparse whose errors are one line, like the commands' own."""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), not the usage block and the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
