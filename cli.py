"""`python cli.py ...` runs the same command line as the installed `phiflash` script."""

import sys

from phiflash_mlx.cli import main

if __name__ == "__main__":
    sys.exit(main())
