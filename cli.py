"""`python cli.py ...` runs the same command line as the installed `phiflash` script."""

import sys

if __name__ == "__main__":
    try:
        from phiflash_mlx.cli import main        # imports MLX: Ctrl-C during it exits quietly too
    except (KeyboardInterrupt, ImportError) as exc:
        cause = exc
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__      # MLX's extension wraps it in ImportError
        if cause is None:
            raise
        print("", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
