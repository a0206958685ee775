"""Entry point: register the commands and turn user errors into one line and an exit code."""

from __future__ import annotations

import sys

# Importing a command module registers its commands on ``app``.
from autopar.cli import (  # noqa: F401
    emit_cmd,
    estimate_cmd,
    experts_cmd,  # noqa: F401
    inspect_cmd,
    plan_cmd,
    profile_cmd,
    validate_cmd,
)
from autopar.cli.app import app
from autopar.errors import AutoparError


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # non-standalone typer returns exit codes; Ctrl-C gives 130
            if code == 130:
                print("error: interrupted", file=sys.stderr)
            sys.exit(code)
    except AutoparError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click (vendored by typer) usage errors and exits
        code = getattr(exc, "exit_code", None)
        if code is None:
            raise
        if hasattr(exc, "show"):
            exc.show()  # a usage error: click prints "Usage: ... Error: ..."
        sys.exit(code)


if __name__ == "__main__":
    main()
