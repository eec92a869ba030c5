"""A torchrun script for ``test_launch.py``: rank 0 prints the OpenMP threads it was given."""

import os

if __name__ == "__main__" and os.environ["RANK"] == "0":
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
