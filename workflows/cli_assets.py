"""`secvec models import` / `secvec data import`: bring models and prompt data into the local cache."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()

models_app = typer.Typer(help="Import base models into the local cache.", no_args_is_help=True)
data_app = typer.Typer(help="Import prompt data sets into the local cache.", no_args_is_help=True)


@models_app.command("import")
def import_model_command(
    name_or_path: str = typer.Argument(
        ..., help="'smollm2', a local .gguf file, a Hugging Face directory, or a hub id."
    ),
    verify: bool = typer.Option(True, help="Re-hash a cached copy's files before reusing it."),
) -> None:
    """Convert or copy a model into the cache (safetensors) and print its path and fingerprint."""
    from workflows.assets import cache_dir, import_model

    with console.status(f"Importing {name_or_path} into {cache_dir()}") as status:
        imported = import_model(name_or_path, verify=verify, progress=lambda message: status.update(message))
    console.print(f"[green]Imported[/green] {name_or_path}")
    console.print(f"path:        {imported.path}", soft_wrap=True)
    console.print(f"fingerprint: {imported.fingerprint}", soft_wrap=True)


@data_app.command("import")
def import_data_command() -> None:
    """Extract Do-Not-Answer and HarmBench prompts into the cache; print files, counts, checksums."""
    from workflows.assets import cache_dir, import_datasets

    with console.status(f"Importing prompt data into {cache_dir()}") as status:
        paths = import_datasets(progress=lambda message: status.update(message))
    table = Table(title=f"Prompt data in {paths.directory}")
    table.add_column("file")
    table.add_column("prompts", justify="right")
    table.add_column("sha256", overflow="fold")
    counts = {"donotanswer.jsonl": paths.counts["donotanswer"], "harmbench.jsonl": paths.counts["harmbench"]}
    for name, digest in sorted(paths.sha256.items()):
        table.add_row(name, str(counts.get(name, "")), digest)
    console.print(table)
    console.print(f"checksums: {paths.checksums}", soft_wrap=True)
    console.print("HarmBench prompts are for evaluation only; see LICENSES.md for terms.")


def register(app: typer.Typer) -> None:
    """Add asset import commands to the main app."""
    app.add_typer(models_app, name="models")
    app.add_typer(data_app, name="data")
