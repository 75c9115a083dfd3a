"""`python -m nanoseek ...` (and so `torchrun -m nanoseek ...`): the same as the `nanoseek` command."""

import sys

from nanoseek.cli import main

if __name__ == "__main__":
    sys.exit(main())
