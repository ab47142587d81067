"""`python -m saferollout.traffic ...`: exactly `saferollout traffic ...` (how `start_background` runs it).

An entry point like the `saferollout` command itself, so it may import `saferollout.cli`; the library may not.
"""
from __future__ import annotations

import sys
from typing import Sequence

from saferollout.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["traffic", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
