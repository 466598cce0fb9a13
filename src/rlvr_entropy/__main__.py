"""``python -m rlvr_entropy ...`` = the ``rlvr-entropy`` command."""
import sys

from rlvr_entropy.cli import main

if __name__ == "__main__":
    sys.exit(main())
