"""The ``secvec`` command line. Each command is a thin shell over a workflows/secvec_core function."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    name="secvec",
    help="Security vectors: fine-tune LLMs on customer data without learning harmful behaviour.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(
    help="Inspect the MLflow registry: vectors, fine-tuned models, lineage.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")
# soft_wrap: printed lines (commands to copy, URIs) are never broken at 80 columns when piped or logged.
console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _refuse_unfit(parsed) -> None:
    """One line and exit 2 when a stage cannot fit the declared GPU memory (before Ray starts)."""
    from workflows.plan import PlanError, check_fits

    try:
        check_fits(parsed)
    except PlanError as err:
        _fail(str(err))


def _load(spec_path: Path):
    from workflows.specs import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as err:
        _fail(str(err))


@app.command()
def validate(spec: Path = typer.Argument(..., help="Pipeline spec (YAML).")) -> None:
    """Check a pipeline spec; errors name the field path."""
    parsed = _load(spec)
    console.print(
        f"[green]ok[/] {spec}: pipeline {parsed.name!r} with {len(parsed.stages)} stage(s): "
        + ", ".join(f"{s.name} ({s.kind})" for s in parsed.stages)
    )


@app.command()
def schema(output: Path | None = typer.Option(None, "-o", "--output", help="Write to a file.")) -> None:
    """Print the JSON Schema of pipeline specs (for editors and CI)."""
    from workflows.specs import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text + "\n")


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    gpu: str | None = typer.Option(
        None, help="Check against a known GPU (overrides scaling.gpu), e.g. A100-80GB, H100, L4, A10G, RTX4090."
    ),
    gpu_memory_gb: float | None = typer.Option(None, help="Check against this much memory per GPU."),
    num_workers: int | None = typer.Option(None, help="Override scaling.num_workers."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Memory per worker for each stage (weights, gradients, optimizer, activations, stash) and whether it fits."""
    from workflows.plan import GB, plan_spec, plan_with_overrides

    parsed = _load(spec)
    try:
        parsed = plan_with_overrides(parsed, gpu=gpu, gpu_memory_gb=gpu_memory_gb, num_workers=num_workers)
    except ValueError as err:
        _fail(str(err).splitlines()[0])
    result = plan_spec(parsed)
    usable = result.usable_bytes()
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        where = (
            f"{result.gpus} GPU(s) of {result.gpu_memory_gb:g} GB"
            if result.gpu_memory_gb
            else (
                "GPUs of undeclared memory (set scaling.gpu or gpu_memory_gb)"
                if result.device == "gpu"
                else "CPU workers"
            )
        )
        table = Table(title=f"secvec plan: {parsed.name} on {where}, per worker (GB)")
        for col in (
            "stage",
            "engine",
            "workers",
            "micro-batch",
            "dtype",
            "weights",
            "grads",
            "optimizer",
            "activations",
            "total",
            "stash",
            "fits",
        ):
            table.add_column(col, no_wrap=True)

        def gb(x):
            return f"{x / GB:.2f}"

        for s in result.stages:
            if not s.parts:
                table.add_row(s.stage, s.engine, str(s.workers), "-", s.dtype, *["-"] * 6, s.note)
                continue
            fits = "-" if usable is None else ("[green]yes[/]" if s.total <= usable else "[red]no[/]")
            stash = f"{gb(s.stash_bytes)} {s.stash_kind}" if s.stash_bytes else "-"
            table.add_row(
                s.stage,
                s.engine,
                str(s.workers),
                str(s.micro_batch),
                s.dtype,
                gb(s.parts["weights"]),
                gb(s.parts["gradients"]),
                gb(s.parts["optimizer"]),
                gb(s.parts["activations"]),
                gb(s.total),
                stash,
                fits,
            )
        console.print(table)
        if usable is not None:
            console.print(
                f"usable per GPU: {usable / GB:.1f} GB ({result.gpu_memory_gb:g} GB less the CUDA context "
                "and allocator reserve); total = weights + optimizer + max(activations, gradients)."
            )
    unfit = result.unfit()
    if unfit:
        from workflows.plan import PlanError, check_fits

        try:
            check_fits(parsed)
        except PlanError as err:
            _fail(str(err), code=1)


def _run_with_progress(spec, reuse: bool):
    from workflows.pipeline import run_pipeline

    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} stages"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"pipeline {spec.name}", total=len(spec.stages))

        def on_stage(name, stage_result):
            if stage_result is None:
                progress.update(task, description=f"{spec.name}: {name}")
            else:
                note = " (reused)" if stage_result.reused else f" ({stage_result.seconds:.0f}s)"
                progress.console.print(f"  [green]done[/] {name}{note} -> {stage_result.output.get('uri', '')}")
                progress.advance(task)

        return run_pipeline(spec, on_stage=on_stage, reuse=reuse)


def _print_evaluations(result) -> list[dict]:
    from workflows.report import base_harmful_rate, evaluation_rows

    rows = evaluation_rows(result)
    if not rows:
        return rows
    table = Table(title="Evaluation, vector off (as shipped)")
    for col in ("model", "harmful", "task acc", "gap", "benign refused", "gate"):
        table.add_column(col, no_wrap=col != "model")

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    table.add_row("before fine-tuning", f(base_harmful_rate(rows)), "-", "-", "-", "")
    for r in rows:
        gate = "[yellow]held[/]"
        if r["gate"] == "passed":  # champion only if the registry says so now (another run may have moved it)
            alias = result.stages[r["stage"]].output.get("alias", "champion")
            gate = "[green]champion[/]" if alias == "champion" else "[yellow]passed, not champion[/]"
        table.add_row(
            r["candidate"].split("/")[-2].split(".")[-1],
            f(r["harmful_rate"]),
            f(r["task_accuracy"]),
            f(r["transfer_gap"]),
            f(r["benign_refusal_rate"]),
            gate,
        )
    console.print(table)
    for r in rows:
        if r["gate"] != "passed":
            console.print(f"  {r['stage']}: held back: {r['reason']}", highlight=False)
        elif result.stages[r["stage"]].output.get("alias_note"):
            console.print(f"  {r['stage']}: {result.stages[r['stage']].output['alias_note']}", highlight=False)
    console.print("  gap = task accuracy with the vector on minus off (0 means the task carries over).")
    return rows


def _run_or_fail(spec, reuse: bool):
    """Run the pipeline; any failure becomes one line on stderr and exit code 1 (SECVEC_VERBOSE=1: traceback)."""
    from workflows.pipeline import StageFailedError
    from workflows.registry import RegistryError
    from workflows.tracking import TrackingUnavailableError

    try:
        return _run_with_progress(spec, reuse)
    except StageFailedError as err:
        _fail(str(err), code=1)
    except (TrackingUnavailableError, RegistryError, FileNotFoundError, ValueError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__, code=1)
    except RuntimeError as err:
        _fail(_root_cause(str(err)), code=1)
    except Exception as err:
        if os.environ.get("SECVEC_VERBOSE"):
            raise
        _fail(f"{type(err).__name__}: {_root_cause(str(err))} (set SECVEC_VERBOSE=1 for the traceback)", code=1)


def _configure_logging(verbose: bool) -> None:
    """Quiet by default: a failure is the one line `_fail` prints. MLflow's HTTP retries (urllib3) and secvec's
    own retry notices show only with --verbose, which also sets SECVEC_VERBOSE (Ray's logs, tracebacks)."""
    if verbose:
        os.environ["SECVEC_VERBOSE"] = "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.INFO if verbose else logging.ERROR)


def _root_cause(text: str) -> str:
    """Ray wraps worker errors in pages of traceback; keep the last line that names an error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return line
    return lines[-1] if lines else text


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Rerun stages even if an identical one finished."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show retry notices, Ray's logs and tracebacks."),
) -> None:
    """Run a pipeline: each stage as a Ray Train job, tracked and versioned in MLflow."""
    _configure_logging(verbose)
    parsed = _load(spec)
    _refuse_unfit(parsed)
    result = _run_or_fail(parsed, reuse=not no_reuse)
    _print_evaluations(result)
    console.print(f"MLflow: {result.tracking_uri} (parent run {result.parent_run_id})")


@app.command()
def demo(
    directory: Path = typer.Option(Path(".secvec/demo"), "--dir", help="Where MLflow and outputs go."),
    fresh: bool = typer.Option(True, help="Start from an empty directory (reruns everything)."),
) -> None:
    """The whole method end to end on the built-in tiny model (local Ray, MLflow on SQLite)."""
    import shutil

    from workflows.report import write_chart
    from workflows.specs import parse_spec

    logging.basicConfig(level=logging.WARNING)
    data = yaml.safe_load(resources.files("workflows").joinpath("examples/demo.yaml").read_text())
    directory = directory.resolve()
    if fresh and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data["tracking"]["tracking_uri"] = f"sqlite:///{directory / 'mlflow.db'}"
    data["work_dir"] = str(directory / "work")
    spec = parse_spec(data, "demo")
    console.print(
        "[bold]secvec demo[/]: align a tiny Llama, train a security vector from 10 harmful examples, "
        "fine-tune on new facts + 100 harmful examples without and with it, evaluate, gate."
    )
    result = _run_or_fail(spec, reuse=not fresh)
    rows = _print_evaluations(result)
    chart = write_chart(rows, directory / "demo.png")
    console.print(f"chart: {chart}")
    console.print(f"registry: [bold]{runnable('secvec')} registry list --tracking-uri {result.tracking_uri}[/]")
    console.print(f"MLflow UI: [bold]{runnable('mlflow')} ui --backend-store-uri {result.tracking_uri}[/]")


def runnable(script: str) -> str:
    """How to call ``script`` of this environment from the user's shell: its bare name when PATH finds this very
    copy (an activated venv), else its path (``.venv/bin/secvec`` after ``make demo`` without activating)."""
    import shutil

    here = Path(sys.executable).parent / script
    found = shutil.which(script)
    if not here.exists() or (found and Path(found).resolve() == here.resolve()):
        return script
    try:
        return str(here.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(here.absolute())


@registry_app.command("list")
def registry_list(
    tracking_uri: str = typer.Option(
        os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.secvec/demo/mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Security vectors and fine-tuned models with their lineage, aliases and gate status."""
    from workflows.registry_check import RegistryUnavailable, check_readable_store

    try:
        tracking_uri = check_readable_store(tracking_uri)
    except RegistryUnavailable as err:
        _fail(str(err), code=1)
    from workflows.registry import Registry
    from workflows.tracking import TrackingUnavailableError, redact

    try:
        rows = Registry(tracking_uri).list_models()
    except TrackingUnavailableError as err:
        _fail(str(err), code=1)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=f"secvec registry at {redact(tracking_uri)}")
    for col in ("model", "kind", "version", "aliases", "lineage"):
        table.add_column(col, overflow="fold")
    for r in rows:
        t = r["tags"]
        lineage = [f"base={t.get('secvec.base_model', '?')}"]
        if "secvec.guarded_by" in t:
            lineage.append(f"guarded_by={', '.join(json.loads(t['secvec.guarded_by'])) or 'none'}")
        if "secvec.behaviour" in t:
            lineage.append(f"behaviour={t['secvec.behaviour']} data={t.get('secvec.data_hash', '')[:19]}")
        if "secvec.gate" in t:
            lineage.append(f"gate={t['secvec.gate']}")
        if t.get("secvec.monitor.regressed") == "true":
            lineage.append("[red]REGRESSED[/]")
        table.add_row(r["name"], r["kind"], r["version"], ",".join(r["aliases"]), "\n".join(lineage))
    console.print(table)


@app.command()
def report(
    pipeline: str | None = typer.Argument(None, help="Pipeline name (the spec's `name`)."),
    run: str | None = typer.Option(None, "--run", help="Report one attack_sweep run (its run id) instead."),
    tracking_uri: str = typer.Option(
        os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.secvec/mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI).",
    ),
    output: Path = typer.Option(Path("secvec-report"), "-o", "--output", help="Folder for report.md + PNGs."),
) -> None:
    """Markdown table and plots of a pipeline (or of one red-team sweep), built from MLflow runs alone."""
    from workflows.pipeline import absolute_tracking_uri
    from workflows.report import pipeline_report, sweep_report

    if (pipeline is None) == (run is None):
        _fail("give a pipeline name or --run RUN_ID (one of them)")
    uri = absolute_tracking_uri(tracking_uri)
    try:
        path = sweep_report(uri, run, output) if run else pipeline_report(uri, pipeline, output)
    except Exception as err:  # noqa: BLE001 - one line for any lookup problem
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__, code=1)
    sys.stdout.write(path.read_text(encoding="utf-8"))
    console.print(f"wrote {path} (and its plots)")


def _register_subcommands() -> None:
    """Sub-command groups live in their own modules (cli_kube.py, cli_assets.py) to keep this file small."""
    from workflows import cli_assets, cli_kube

    cli_kube.register(app)
    cli_assets.register(app)


_register_subcommands()

if __name__ == "__main__":
    app()
