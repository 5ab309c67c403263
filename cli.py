"""`python cli.py ...` runs the same command line as the installed `phiflash` script."""

import sys

if __name__ == "__main__":
    try:
        from phiflash_mlx.cli import main        # imports MLX: Ctrl-C during it exits quietly too
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
