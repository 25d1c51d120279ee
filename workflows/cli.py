"""The ``secvec`` command line. Each command is a thin shell over a workflows/secvec_core function."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="secvec",
    help="Security vectors: fine-tune LLMs on customer data without learning harmful behaviour.",
    no_args_is_help=True,
    add_completion=False,
)


def _register_subcommands() -> None:
    """Sub-command groups live in their own modules (cli_kube.py, cli_assets.py) to keep this file small."""
    from workflows import cli_assets, cli_kube

    cli_kube.register(app)
    cli_assets.register(app)


_register_subcommands()

if __name__ == "__main__":
    app()
