"""`secvec render` / `secvec submit` (owned by the Kubernetes work; filled in there)."""

import typer


def register(app: typer.Typer) -> None:
    """Add Kubernetes commands to the main app."""
