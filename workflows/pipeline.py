"""Run a ``PipelineSpec``: each stage as a Ray Train ``TorchTrainer``, outputs chained through the registry.

A stage whose spec and inputs hash to a finished run's ``secvec.stage_hash`` is reused, not retrained,
so an interrupted pipeline resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from workflows.content_digests import local_content_digests
from workflows.plan import check_fits
from workflows.specs import (
    AttackSweepStage,
    EvaluationStage,
    GuardedFinetuneStage,
    PipelineSpec,
    dataset_refs,
    with_absolute_paths,
)
from workflows.stages import OUTPUT_FILE, StageContext, stage_worker

logger = logging.getLogger(__name__)


class StageFailedError(RuntimeError):
    """A stage's Ray job failed. The message is one line, the worker's own error; ``original`` is that error."""

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(message)
        self.original = original


@dataclass
class StageResult:
    name: str
    kind: str
    output: dict
    seconds: float
    reused: bool = False


@dataclass
class PipelineResult:
    spec: PipelineSpec
    stages: dict[str, StageResult] = field(default_factory=dict)
    parent_run_id: str | None = None
    tracking_uri: str = ""


def code_version_tags() -> dict[str, str]:
    """``secvec.version`` (the installed package) and, when secvec runs from a git checkout,
    ``secvec.git_commit`` (``-dirty`` with uncommitted changes): which code produced a pipeline's numbers,
    readable from MLflow alone (benchmarks/red_team.py puts it in RESULTS.md)."""
    import subprocess
    from importlib import metadata

    try:
        tags = {"secvec.version": metadata.version("secvec")}
    except metadata.PackageNotFoundError:
        tags = {}
    source = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(source)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return tags  # an installed package or an image: the version says it
    return {**tags, "secvec.git_commit": commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")}


def absolute_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///`` path absolute, so Ray workers (other cwd) use the same database."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = (base or Path.cwd()) / uri[len("sqlite:///") :]
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}"
    return uri


def default_artifact_location(tracking_uri: str, work_dir: Path) -> str | None:
    if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:"):
        return (work_dir.parent / "mlartifacts").resolve().as_uri()
    return None


def init_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set, else start a local Ray (the embedded default) that ends with this process;
    processes left by an earlier driver that was killed are ended first (see ``workflows.leftovers``)."""
    import ray

    from workflows.leftovers import end_orphaned_ray, ray_temp_dir, session_dir_of, shut_down_ray_at_exit

    if ray.is_initialized():
        return
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not os.environ.get("RAY_ADDRESS"):
        # Only for the local Ray started below; a cluster's own setting (KubeRay token auth sets
        # RAY_AUTH_MODE=token and RAY_AUTH_TOKEN) must reach the driver and workers unchanged.
        env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    for key in (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "SECVEC_MLFLOW_RETRY_SECONDS",
        "SECVEC_CACHE",
        "HF_HUB_OFFLINE",
        "SECVEC_FAULT_KILL_AT_STEP",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_")})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        temp_dir = temp_dir or ray_temp_dir()
        end_orphaned_ray(temp_dir)
        ray.init(
            num_cpus=num_cpus or max(2, os.cpu_count() or 2),
            include_dashboard=False,
            runtime_env={"env_vars": env},
            _temp_dir=temp_dir,
            configure_logging=False,
            log_to_driver=bool(os.environ.get("SECVEC_VERBOSE")),
        )
        session = session_dir_of(os.getpid(), temp_dir)
        if session:
            shut_down_ray_at_exit(session)


def stage_hash(stage_dict: dict, inputs: dict) -> str:
    blob = json.dumps({"stage": stage_dict, "inputs": inputs}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _find_reusable(tracking_uri: str, experiment_id: str, digest: str) -> dict | None:
    from mlflow import MlflowClient

    from workflows.tracking import with_retries

    client = MlflowClient(tracking_uri)
    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`secvec.stage_hash` = '{digest}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=5,
        ),
        "search finished stages",
        tracking_uri,
    )
    for run in runs:
        raw = run.data.tags.get("secvec.output")
        if raw:
            output = json.loads(raw)
            if (output.get("uri", "").startswith("models:/") or output.get("reusable")) and not output.get("monitor"):
                return output
    return None


def _verify_aliases(result: PipelineResult, tracking_uri: str) -> None:
    """The final table states the truth: an alias a stage set (now or in a reused run) is checked against the
    registry, and dropped from the output, with a note, if another run has moved it since."""
    from workflows.registry import Registry
    from workflows.specs import REGISTRY_URI

    registry = Registry(tracking_uri)
    for stage in result.stages.values():
        alias = stage.output.get("alias")
        match = REGISTRY_URI.match(stage.output.get("uri", ""))
        if not alias or not match or not match["version"]:
            continue
        now = registry.alias_target(match["name"], alias)
        if now != match["version"]:
            stage.output["alias"] = None
            stage.output["alias_note"] = (
                f"{alias} is now {'version ' + now if now else 'unset'} of {match['name']} (moved by another run)"
            )


def run_pipeline(
    spec: PipelineSpec,
    *,
    on_stage: Callable[[str, StageResult | None], None] | None = None,
    reuse: bool = True,
    num_cpus: int | None = None,
    wait_for_rivals: bool = True,
) -> PipelineResult:
    """Run every stage in order; returns each stage's output record (registry URI, metrics).

    Each stage is claimed before it trains (``workflows.claims``): a stage that another live driver is training
    is waited for and its result reused (``wait_for_rivals=False``: refused with ``ClaimRefusedError``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows.claims import Heartbeat, StageClaims, owner_tags
    from workflows.leftovers import end_orphaned_ray, remove_stale_scratch
    from workflows.preflight import check_fingerprints, preflight
    from workflows.tracking import RETRY_ENV, StageRun, ensure_experiment

    spec = with_absolute_paths(spec)  # stages run in Ray workers with another working directory
    work_dir = Path(spec.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = absolute_tracking_uri(spec.tracking.tracking_uri)
    preflight(spec, tracking_uri)  # fail fast, before Ray starts or anything is written
    check_fits(spec)  # secvec plan: refuse a spec whose stages cannot fit the declared GPU memory
    artifact_location = spec.tracking.artifact_location or default_artifact_location(tracking_uri, work_dir)
    experiment_id = ensure_experiment(tracking_uri, spec.tracking.experiment, artifact_location)
    claims = StageClaims(tracking_uri, experiment_id)
    claims.sweep_stale()  # runs left RUNNING by a driver that was killed
    if not os.environ.get("RAY_ADDRESS"):
        end_orphaned_ray()  # its Ray processes, before its workers' scratch folders can be unlocked
    remove_stale_scratch()
    parent = StageRun(
        tracking_uri,
        experiment_id,
        f"pipeline/{spec.name}",
        None,
        {"secvec.pipeline": spec.name, "secvec.kind": "pipeline", **owner_tags(), **code_version_tags()},
    )
    heartbeat = Heartbeat(tracking_uri)
    heartbeat.hold(parent.run_id)
    result = PipelineResult(spec=spec, parent_run_id=parent.run_id, tracking_uri=tracking_uri)
    status = "FAILED"
    try:
        parent.log_params({"pipeline": spec.model_dump(mode="json", exclude={"stages"})})
        init_ray(num_cpus, os.environ.get("SECVEC_RAY_TEMP_DIR"))  # Ray's unix sockets need a short path
        for stage in spec.stages:
            inputs = _resolve_inputs(spec, stage, result, tracking_uri)
            stage_dict = stage.hash_fields()
            hashed = {k: v for k, v in inputs.items() if k != "datasets" or v}  # hashes of older pipelines stay
            content = local_content_digests(stage, inputs)
            if content:  # a local file edited in place is new input, not a reason to reuse
                hashed["local_content"] = content
            digest = stage_hash(stage_dict, {**hashed, "base_name": spec.tracking.base_name})
            if on_stage:
                on_stage(stage.name, None)
            started = time.time()
            stage_tags = {
                "secvec.stage": stage.name,
                "secvec.stage_kind": stage.kind,
                "secvec.stage_hash": digest,
                "secvec.pipeline": spec.name,
            }
            claim = claims.acquire(
                digest,
                stage_name=stage.name,
                wait=wait_for_rivals,
                find_finished=lambda d=digest: _find_reusable(tracking_uri, experiment_id, d) if reuse else None,
                create_run=lambda t=stage_tags, n=stage.name: (
                    StageRun(
                        tracking_uri, experiment_id, f"{spec.name}/{n}", parent.run_id, {**t, **owner_tags()}
                    ).run_id
                ),
            )
            if claim.reused_output is not None:
                logger.info("stage %s: reusing %s (same spec and inputs)", stage.name, claim.reused_output["uri"])
                result.stages[stage.name] = StageResult(stage.name, stage.kind, claim.reused_output, 0.0, reused=True)
            else:
                heartbeat.hold(claim.run_id)
                try:
                    if isinstance(stage, GuardedFinetuneStage | AttackSweepStage):
                        check_fingerprints(stage.name, inputs["base"], inputs["vectors"], tracking_uri)
                    ctx = StageContext(
                        stage=stage_dict,
                        pipeline=spec.name,
                        base_source=inputs["base"],
                        vector_refs=inputs["vectors"],
                        candidate_uri=inputs["candidate"],
                        tracking_uri=tracking_uri,
                        experiment_id=experiment_id,
                        parent_run_id=parent.run_id,
                        base_name=spec.tracking.base_name,
                        stage_hash=digest,
                        checkpoint_every=spec.scaling.checkpoint_every,
                        work_dir=str(work_dir),
                        trust_remote_code=inputs["trust_remote_code"],
                        retry_seconds=float(os.environ[RETRY_ENV]) if os.environ.get(RETRY_ENV) else None,
                        fault_kill_at_step=os.environ.get("SECVEC_FAULT_KILL_AT_STEP") or None,
                        datasets=inputs["datasets"] or None,
                        run_id=claim.run_id,
                        local_content=content or None,
                    )
                    if isinstance(stage, AttackSweepStage):  # cells as Ray tasks, see redteam.py
                        from workflows.redteam import run_attack_sweep

                        try:
                            output = run_attack_sweep(ctx, spec.scaling)
                        except Exception as err:
                            raise stage_error(stage.name, getattr(err, "cause", None) or err) from err
                    else:
                        output = _fit(ctx, spec, stage, work_dir, TorchTrainer, ScalingConfig, RunConfig, FailureConfig)
                except BaseException as err:
                    _release_failed_claim(claims, claim.run_id, err)
                    raise
                finally:
                    heartbeat.release(claim.run_id)
                result.stages[stage.name] = StageResult(stage.name, stage.kind, output, time.time() - started)
            if on_stage:
                on_stage(stage.name, result.stages[stage.name])
        _verify_aliases(result, tracking_uri)
        status = "FINISHED"
    finally:
        heartbeat.stop()
        _close_parent_run(parent, result, status)
    return result


def _fit(
    ctx: StageContext, spec: PipelineSpec, stage, work_dir: Path, TorchTrainer, ScalingConfig, RunConfig, FailureConfig
) -> dict:
    """One stage as a Ray Train job; returns the output record rank 0 attached to its final checkpoint."""
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config=ctx.__dict__,
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=dict(spec.scaling.resources_per_worker),
        ),
        run_config=RunConfig(
            name=f"{spec.name}-{stage.name}-{uuid.uuid4().hex[:8]}",
            storage_path=str(work_dir / "ray-results"),
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
        ),
    )
    try:
        fit = trainer.fit()
    except Exception as err:  # Ray Train v2 raises TrainingFailedError wrapping the workers' errors
        raise stage_error(stage.name, err) from err
    if fit.error:
        raise stage_error(stage.name, fit.error)
    with fit.checkpoint.as_directory() as d:
        return json.loads((Path(d) / OUTPUT_FILE).read_text())


def _release_failed_claim(claims, run_id: str, err: BaseException) -> None:
    """A stage that failed or was interrupted leaves no RUNNING run behind (a worker may already have marked it);
    tried briefly, and never hiding the stage's own error."""
    try:
        run = claims.client.get_run(run_id)
        if run.info.status == "RUNNING":
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            claims.mark_failed(run_id, f"stage failed: {reason}", budget_s=5.0)
    except Exception:
        logger.info("could not mark the stage run %s as FAILED", run_id)


def _close_parent_run(parent, result: PipelineResult, status: str) -> None:
    """On failure, try briefly and never hide the stage's own error behind a tracking error."""
    budget = None if status == "FINISHED" else 5.0
    try:
        parent.set_tags(
            {"secvec.stages": json.dumps({k: v.output.get("uri") for k, v in result.stages.items()})}, budget_s=budget
        )
        parent.finish(status, budget_s=budget)
    except Exception:
        if status == "FINISHED":
            raise
        logger.info("could not mark the pipeline run %s as %s", parent.run_id, status)


def stage_error(name: str, err: BaseException) -> StageFailedError:
    """One line from Ray's pages of worker tracebacks: the first worker error that is not Ray's or torch's own
    (a peer dropping out of an all-reduce is a consequence, not the cause)."""
    failures = getattr(err, "worker_failures", None) or {}
    candidates = [failures[rank] for rank in sorted(failures)]
    candidates.append(getattr(err, "controller_failure", None) or err)
    original = next((e for e in candidates if not _is_infrastructure(e)), candidates[0])
    lines = [ln.strip() for ln in str(original).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if _is_infrastructure(original) or not text:
        text = (
            f"{type(original).__name__}: {text[:300]}; a Ray worker died or lost contact (restarts from the last "
            "checkpoint are set by scaling.max_failures); see the Ray worker logs"
        )
    return StageFailedError(f"stage {name!r} failed: {text}", original)


def _is_infrastructure(err: BaseException) -> bool:
    module = type(err).__module__
    return module.startswith(("ray.", "torch.distributed")) or any(
        s in str(err) for s in ("Connection closed by peer", "Gloo", "gloo")
    )


def _resolve_inputs(spec: PipelineSpec, stage, result: PipelineResult, tracking_uri: str) -> dict:
    """Stage references -> registry URIs of the earlier stages' outputs (plain strings for workers).

    Aliases (``@champion``) are pinned to the version they point at now, so lineage tags name an
    immutable version and a bad alias fails here, before any worker starts.
    """
    from workflows.registry import Registry

    def pinned(uri: str) -> str:
        return Registry(tracking_uri).resolve(uri).uri if "@" in uri else uri

    def model_source(ref) -> str:
        if ref.stage:
            return result.stages[ref.stage].output["uri"]
        if ref.source.startswith("models:/"):
            return pinned(ref.source)
        if ref.source.startswith("builtin:"):
            return ref.source
        return str(Path(ref.source).resolve()) if Path(ref.source).exists() else ref.source

    base_ref = stage.base_model or spec.base_model
    vectors: list[str] = []
    if isinstance(stage, GuardedFinetuneStage | AttackSweepStage):
        for v in stage.vectors:
            if v.stage:
                vectors.append(result.stages[v.stage].output["uri"])
            else:
                vectors.append(pinned(v.uri) if v.uri else str(Path(v.path).resolve()))
    candidate = None
    if isinstance(stage, EvaluationStage):
        candidate = model_source(stage.candidate)
        if not candidate.startswith("models:/"):
            raise ValueError(
                f"stage {stage.name}: candidate must be a registered fine-tune ({{stage: ...}} or "
                f"models:/...), got {candidate!r}"
            )
    datasets = {}
    for _, ref in dataset_refs(stage):
        if ref.stage:
            from workflows.datasets import stage_file_key

            datasets[stage_file_key(ref.stage, ref.split)] = result.stages[ref.stage].output["files"][ref.split]
    return {
        "base": model_source(base_ref),
        "vectors": vectors,
        "candidate": candidate,
        "trust_remote_code": base_ref.trust_remote_code,
        "datasets": datasets,
    }
