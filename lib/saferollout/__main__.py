"""`python -m saferollout ...`: exactly the `saferollout` command (an entry point: it may import `cli`)."""
import sys

from saferollout.cli import main

if __name__ == "__main__":
    sys.exit(main())
