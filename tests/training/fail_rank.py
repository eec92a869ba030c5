"""A torchrun script for ``test_launch.py``: rank 1 prints an error and exits with 3; rank 0 waits to
be stopped (as the healthy ranks of a failed ``sft train`` do)."""

import os
import sys
import time

if __name__ == "__main__":
    if os.environ["RANK"] == "1":
        print("error: rank 1 found a problem", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(60)
