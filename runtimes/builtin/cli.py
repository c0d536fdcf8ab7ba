"""The ``berth-runtime`` command (runc-compatible). Being built."""

import sys


def main() -> None:
    sys.exit("berth-runtime: not built yet")
