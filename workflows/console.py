"""The ``secvec`` console script. It imports nothing outside the standard library before the CLI itself, so
that ``pip install secvec`` (the core library alone) gives a one-line hint instead of a traceback."""

from __future__ import annotations

import sys

# The extra that brings each optional top-level module the CLI imports.
EXTRA_FOR_MODULE = {
    "typer": "pipeline",
    "rich": "pipeline",
    "yaml": "pipeline",
    "pydantic": "pipeline",
    "mlflow": "pipeline",
    "ray": "pipeline",
    "matplotlib": "pipeline",
    "gguf": "pipeline",
    "kubernetes": "kube",
    "psycopg2": "postgres",
    "datasets": "hf",
}


def missing_extra_hint(err: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install, or None when the missing module is not one an extra provides."""
    top = (err.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    return (
        f"error: this secvec command needs the {top!r} package, which comes with the {extra} extra: "
        f"pip install 'secvec[{extra}]'"
    )


def main() -> None:
    try:
        from workflows.cli import app

        app()
    except ModuleNotFoundError as err:
        hint = missing_extra_hint(err)
        if hint is None:
            raise
        sys.stderr.write(hint + "\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
