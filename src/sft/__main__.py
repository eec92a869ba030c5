"""``python -m sft`` (and ``torchrun -m sft train CONFIG``): the same CLI as the ``sft`` command."""

from __future__ import annotations

import sys

from sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
