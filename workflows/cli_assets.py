"""`secvec models import` / `secvec data import` (owned by the assets work; filled in there)."""

import typer


def register(app: typer.Typer) -> None:
    """Add asset import commands to the main app."""
