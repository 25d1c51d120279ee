"""`secvec render` / `secvec submit`: the pipeline as a KubeRay RayJob on Kubernetes (see docs/kubernetes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from workflows import kube

_err = Console(stderr=True)

SpecArgument = typer.Argument(..., help="Pipeline spec (YAML file); `secvec run` executes it inside the cluster.")
NamespaceOption = typer.Option("default", "--namespace", "-n", help="Namespace of the RayJob.")
ImageOption = typer.Option(
    None,
    "--image",
    help=f"secvec image in your registry (built from the Dockerfile), e.g. registry.example.com/secvec:"
    f"{kube.DEFAULT_IMAGE_TAG}. Required without --template.",
)
NameOption = typer.Option(None, "--name", help="RayJob name. Default: <spec name>-<UTC timestamp>.")
NumWorkersOption = typer.Option(
    None, "--num-workers", min=1, help="Worker pods; must equal the spec's scaling.num_workers (default 2)."
)
GpusOption = typer.Option(
    None, "--gpus-per-worker", min=0, help="GPUs per worker; must equal what the spec's scaling asks (0 or 1)."
)
DataClaimOption = typer.Option(
    None,
    "--data-claim",
    help="PersistentVolumeClaim mounted at /data on every Ray pod (required if the spec uses /data).",
)
PullSecretOption = typer.Option(None, "--image-pull-secret", help="Secret for pulling the image (repeat).")
NodeSelectorOption = typer.Option(None, "--worker-node-selector", help="KEY=VALUE for the worker pods (repeat).")
TolerationOption = typer.Option(None, "--worker-toleration", help="KEY[=VALUE][:EFFECT] for the workers (repeat).")
TrackingUriOption = typer.Option(None, "--mlflow-tracking-uri", help="MLFLOW_TRACKING_URI of the pipeline pods.")
AuthSecretOption = typer.Option(
    None, "--mlflow-auth-secret", help="Secret with keys username/password for MLflow basic auth."
)
TemplateOption = typer.Option(
    None,
    "--template",
    help="RayJob manifest to start from, e.g. the chart's rayjob-template.yaml: its cluster is kept, what it "
    "mounts at /config is replaced by SPEC; sizing and data options refused.",
)

TemplatePatchOption = typer.Option(
    None,
    "--template-patch",
    help="JSON patch (RFC 6902, YAML or JSON list of operations) applied to --template first, e.g. the "
    "rayjob-patch.yaml a kustomize overlay also applies to its RayJob.",
)


def _fail(message: str) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def _read_spec(spec_path: Path) -> str:
    try:
        text = spec_path.read_text(encoding="utf-8")
    except OSError as error:
        raise _fail(f"cannot read pipeline spec {spec_path}: {error.strerror or error}") from error
    try:
        kube.parse_pipeline_spec(text)
    except kube.PipelineSpecError as error:
        raise _fail(f"{spec_path}: {error}") from error
    from workflows.plan import PlanError, check_spec_text_fits  # no pod for a spec that cannot fit its GPUs

    try:
        check_spec_text_fits(text, str(spec_path))
    except PlanError as error:
        raise _fail(str(error)) from error
    return text


def _node_selector(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    selector = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key or not sep:
            raise _fail(f"--worker-node-selector {pair!r}: expected KEY=VALUE")
        selector[key] = value
    return selector


def _read_template(template_path: Path, patch_path: Path | None) -> dict[str, Any]:
    try:
        template = yaml.safe_load(template_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise _fail(f"cannot read RayJob template {template_path}: {error}") from error
    if not isinstance(template, dict):
        raise _fail(f"RayJob template {template_path} is not a YAML mapping")
    if patch_path is None:
        return template
    try:
        operations = yaml.safe_load(patch_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise _fail(f"cannot read template patch {patch_path}: {error}") from error
    try:
        return kube.patch_template(template, operations)
    except ValueError as error:
        raise _fail(f"{patch_path}: {error}") from error


def _render(
    spec_path: Path,
    *,
    template_path: Path | None,
    template_patch_path: Path | None,
    worker_node_selector: list[str] | None,
    worker_toleration: list[str] | None,
    schedule: str | None = None,
    time_zone: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    text = _read_spec(spec_path)
    if template_patch_path is not None and template_path is None:
        raise _fail("--template-patch patches a --template: give both")
    template = None if template_path is None else _read_template(template_path, template_patch_path)
    try:
        tolerations = [kube.parse_toleration(item) for item in worker_toleration or []] or None
        options.update(
            template=template,
            worker_node_selector=_node_selector(worker_node_selector),
            worker_tolerations=tolerations,
        )
        if schedule:
            obj = kube.render_raycronjob(text, schedule=schedule, time_zone=time_zone, **options)
            rayjob_spec = obj["spec"]["jobTemplate"]
        else:
            obj = kube.render_rayjob(text, **options)
            rayjob_spec = obj["spec"]
        warnings = kube.check_cluster_spec(kube.parse_pipeline_spec(text), rayjob_spec)
    except (ValueError, kube.PipelineSpecError) as error:
        raise _fail(str(error)) from error
    for warning in warnings:
        _err.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return obj


def render(
    spec: Path = SpecArgument,
    namespace: str = NamespaceOption,
    image: str = ImageOption,
    name: str | None = NameOption,
    num_workers: int | None = NumWorkersOption,
    gpus_per_worker: int | None = GpusOption,
    worker_node_selector: list[str] | None = NodeSelectorOption,
    worker_toleration: list[str] | None = TolerationOption,
    mlflow_tracking_uri: str | None = TrackingUriOption,
    mlflow_auth_secret: str | None = AuthSecretOption,
    data_claim: str | None = DataClaimOption,
    image_pull_secret: list[str] | None = PullSecretOption,
    template: Path | None = TemplateOption,
    template_patch: Path | None = TemplatePatchOption,
    schedule: str | None = typer.Option(
        None, "--schedule", help="Cron expression: render a RayCronJob (KubeRay 1.6+, feature gate RayCronJob)."
    ),
    time_zone: str | None = typer.Option(None, "--time-zone", help="Time zone of --schedule (IANA name)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the YAML here instead of stdout."),
) -> None:
    """Print the RayJob (or, with --schedule, the RayCronJob) that runs SPEC, for `kubectl apply -f -`."""
    obj = _render(
        spec,
        template_path=template,
        template_patch_path=template_patch,
        worker_node_selector=worker_node_selector,
        worker_toleration=worker_toleration,
        schedule=schedule,
        time_zone=time_zone,
        name=name,
        namespace=namespace,
        image=image,
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_auth_secret=mlflow_auth_secret,
        data_claim=data_claim,
        image_pull_secrets=image_pull_secret,
    )
    text = kube.to_yaml(obj)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        _err.print(f"wrote {obj['kind']} {obj['metadata']['name']} to {output}", highlight=False)


def submit(
    spec: Path = SpecArgument,
    namespace: str = NamespaceOption,
    image: str = ImageOption,
    name: str | None = NameOption,
    num_workers: int | None = NumWorkersOption,
    gpus_per_worker: int | None = GpusOption,
    worker_node_selector: list[str] | None = NodeSelectorOption,
    worker_toleration: list[str] | None = TolerationOption,
    mlflow_tracking_uri: str | None = TrackingUriOption,
    mlflow_auth_secret: str | None = AuthSecretOption,
    data_claim: str | None = DataClaimOption,
    image_pull_secret: list[str] | None = PullSecretOption,
    template: Path | None = TemplateOption,
    template_patch: Path | None = TemplatePatchOption,
    wait: bool = typer.Option(False, "--wait", help="Follow the RayJob until it finishes; exit 1 if it fails."),
    timeout: float = typer.Option(86400.0, "--timeout", min=1, help="Seconds --wait waits at most."),
    poll_interval: float = typer.Option(5.0, "--poll-interval", min=0.01, help="Seconds between status checks."),
    in_cluster: bool = typer.Option(False, "--in-cluster", help="Use the pod's service account (CronJob)."),
    kubeconfig: str | None = typer.Option(None, "--kubeconfig", help="Kubeconfig file. Default: $KUBECONFIG."),
    context: str | None = typer.Option(None, "--context", help="Kubeconfig context. Default: the current one."),
) -> None:
    """Create a RayJob that runs SPEC on the cluster and print its name."""
    obj = _render(
        spec,
        template_path=template,
        template_patch_path=template_patch,
        worker_node_selector=worker_node_selector,
        worker_toleration=worker_toleration,
        name=name,
        namespace=namespace,
        image=image,
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_auth_secret=mlflow_auth_secret,
        data_claim=data_claim,
        image_pull_secrets=image_pull_secret,
    )
    try:
        api_client = kube.load_api_client(in_cluster=in_cluster, kubeconfig=kubeconfig, context=context)
        created = kube.submit_rayjob(obj, namespace=namespace, api_client=api_client)
    except kube.KubeError as error:
        raise _fail(str(error)) from error
    typer.echo(created)
    if not wait:
        return
    try:
        with _err.status(f"RayJob {created}: submitted") as spinner:

            def show(status: kube.RayJobStatus) -> None:
                spinner.update(f"RayJob {created}: {status.describe()}")
                _err.print(f"RayJob {created}: {status.describe()}", highlight=False, soft_wrap=True)

            final = kube.wait_for_rayjob(
                created, namespace, timeout_s=timeout, poll_s=poll_interval, api=api_client, on_status=show
            )
    except (kube.KubeError, TimeoutError) as error:
        raise _fail(str(error)) from error
    if not final.succeeded:
        raise _fail(f"RayJob {created} did not succeed: {final.describe()}")
    _err.print(f"[green]RayJob {created} succeeded[/]", highlight=False)


def register(app: typer.Typer) -> None:
    """Add Kubernetes commands to the main app."""
    app.command("render")(render)
    app.command("submit")(submit)
