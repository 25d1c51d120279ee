"""Per-worker code of the three stages (plus alignment), run inside Ray Train's ``TorchTrainer``.

Every rank trains on its slice of each batch on torch's engines (``secvec_core.training``: DDP for
adapters through Ray Train's ``prepare_model``, FSDP2 for full weights); rank 0 alone talks to MLflow and
saves artifacts (after sharded training every rank helps gather the weights first). The algorithm is
entirely in ``secvec_core``; this module loads inputs, reports progress and records lineage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter

from workflows.specs import Stage

logger = logging.getLogger(__name__)
OUTPUT_FILE = "secvec_stage_output.json"
STATE_FILE = "training_state.pt"
RUN_FILE = "mlflow_run.json"


@dataclass
class StageContext:
    """What the driver hands each worker (plain JSON, so it crosses process and node boundaries)."""

    stage: dict
    pipeline: str
    base_source: str
    vector_refs: list[str]
    candidate_uri: str | None
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    base_name: str
    stage_hash: str
    checkpoint_every: int
    work_dir: str
    trust_remote_code: bool = False
    retry_seconds: float | None = None  # the driver's $SECVEC_MLFLOW_RETRY_SECONDS when the stage started
    fault_kill_at_step: str | None = None  # the driver's $SECVEC_FAULT_KILL_AT_STEP (fault-injection tests)
    datasets: dict[str, str] | None = None  # "<stage>/<split>" -> artifact URI of a data_preparation output
    run_id: str | None = None  # the MLflow run the driver created to claim this stage (workflows.claims)
    local_content: dict[str, str] | None = None  # path -> digest of local inputs (workflows.content_digests)

    def spec(self):
        return TypeAdapter(Stage).validate_python(self.stage)


def stage_worker(config: dict) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train

    ctx = StageContext(**config)
    if ctx.retry_seconds is not None:
        from workflows.tracking import RETRY_ENV

        os.environ[RETRY_ENV] = str(ctx.retry_seconds)
    world = ray.train.get_context()
    rank = world.get_world_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, world.get_local_world_size())))
    logging.basicConfig(level=logging.INFO)
    if ctx.datasets:
        from workflows.datasets import use_stage_outputs

        use_stage_outputs(ctx.datasets, ctx.tracking_uri)
    worker = _StageWorker(ctx, rank)
    worker.run()


def scratch_root() -> Path:
    """Where stages keep scratch files (checkpoints before upload, downloads, folding stashes):
    ``$SECVEC_SCRATCH_DIR`` (point it at a pod volume), else ``<temp dir>/secvec-scratch``. Stable across
    runs, so a stale folding stash left by a killed worker is found and removed by the next run."""
    root = Path(os.environ.get("SECVEC_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "secvec-scratch")
    root.mkdir(parents=True, exist_ok=True)
    return root


class _StageWorker:
    def __init__(self, ctx: StageContext, rank: int):
        import ray.train

        self.ctx, self.rank = ctx, rank
        self.spec = ctx.spec()
        from workflows.leftovers import Scratch, remove_stale_scratch

        remove_stale_scratch()  # of workers killed earlier on this node
        self._scratch = Scratch(self.spec.name)  # removed when the stage ends (run)
        self.scratch = self._scratch.path
        self.scratch_root = scratch_root()  # stable across runs: folding stashes (stale ones are cleaned up)
        self.resume_state = None
        self.run_id = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                if (Path(d) / STATE_FILE).exists():
                    self.resume_state = torch.load(Path(d) / STATE_FILE, weights_only=True)
                if (Path(d) / RUN_FILE).exists():
                    self.run_id = json.loads((Path(d) / RUN_FILE).read_text())["run_id"]
        self.mlflow = None
        if rank == 0:
            from workflows.tracking import StageRun

            tags = {
                "secvec.stage": self.spec.name,
                "secvec.stage_kind": self.spec.kind,
                "secvec.stage_hash": ctx.stage_hash,
                "secvec.pipeline": ctx.pipeline,
            }
            self.mlflow = StageRun(
                ctx.tracking_uri,
                ctx.experiment_id,
                f"{ctx.pipeline}/{self.spec.name}",
                ctx.parent_run_id,
                tags,
                existing_run_id=self.run_id or ctx.run_id,
            )
            self.run_id = self.mlflow.run_id
            if self.resume_state is None:
                self.mlflow.log_params(
                    {
                        "stage": ctx.stage,
                        "base_model": ctx.base_source,
                        "vectors": ctx.vector_refs,
                        "candidate": ctx.candidate_uri or "",
                    }
                )
            else:  # a restarted worker group: record where training continued
                resumed = int(self.resume_state["step"])
                self.mlflow.set_tags({"secvec.resumed_from_step": str(resumed)})
                self.mlflow.log_metrics({"resumed_from_step": resumed}, step=resumed)

    # -- progress and checkpoints --------------------------------------------------------------------
    def hooks(self):
        from secvec_core.training import TrainingHooks

        pending: dict = {}

        def on_checkpoint(step: int, state: dict) -> None:
            if self.rank == 0:
                pending["state"] = state

        def on_log(step: int, metrics: dict) -> None:
            import ray.train

            self._maybe_inject_fault(step)
            if self.mlflow:
                self.mlflow.log_metrics(metrics, step=step)
            checkpoint = None
            if self.rank == 0 and "state" in pending:
                d = Path(tempfile.mkdtemp(prefix="ckpt-", dir=self.scratch))
                torch.save(pending.pop("state"), d / STATE_FILE)
                (d / RUN_FILE).write_text(json.dumps({"run_id": self.run_id}))
                checkpoint = ray.train.Checkpoint.from_directory(str(d))
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)

        return TrainingHooks(
            on_log=on_log,
            on_checkpoint=on_checkpoint,
            checkpoint_every=self.ctx.checkpoint_every,
            resume_from=self.resume_state,
        )

    def _maybe_inject_fault(self, step: int) -> None:
        """Fault injection for tests: ``SECVEC_FAULT_KILL_AT_STEP=N[:RANK]`` kills worker RANK (default 0) at
        its first report at or after step N, before that report's checkpoint is saved. A marker file in the work
        dir makes it fire once per stage, so the restarted worker group resumes from the previous checkpoint."""
        if not self.ctx.fault_kill_at_step:
            return
        at_step, _, rank = self.ctx.fault_kill_at_step.partition(":")
        if self.rank != int(rank or 0) or step < int(at_step):
            return
        marker = Path(self.ctx.work_dir) / "faults" / f"killed-{self.ctx.stage_hash.removeprefix('sha256:')[:16]}"
        if marker.exists():
            return
        self._wait_for_registered_checkpoint()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {self.rank} of stage {self.spec.name} at step {step}\n")
        logger.warning("fault injection: killing worker rank %d at step %d", self.rank, step)
        os._exit(1)

    @staticmethod
    def _wait_for_registered_checkpoint(timeout_s: float = 60.0) -> None:
        """Ray Train's controller collects a reported checkpoint when it next polls the workers (every 2 s);
        a worker that dies milliseconds after reporting takes the unpolled report with it and the group
        restarts from the checkpoint before. A real failure comes minutes after the last checkpoint, so the
        injected one waits until the controller has recorded a checkpoint (its snapshot file lists one)."""
        import time

        import ray.train

        try:
            snapshot = Path(ray.train.get_context().get_storage().checkpoint_manager_snapshot_path)
        except Exception:  # noqa: BLE001 - another storage layout: fall back to outlasting a few polls
            time.sleep(8.0)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        logger.warning("fault injection: no registered checkpoint after %.0f s; killing anyway", timeout_s)

    def finish(self, output: dict, artifact_dir: Path | None = None) -> None:
        """Report the final result; rank 0 attaches the output record (and artifact) as a checkpoint."""
        import ray.train

        checkpoint = None
        if self.rank == 0:
            final = self.scratch / "final"
            final.mkdir()
            if artifact_dir is not None:
                shutil.copytree(artifact_dir, final / "artifact")
            (final / OUTPUT_FILE).write_text(json.dumps(output, indent=2))
            self.mlflow.set_tags(
                {"secvec.output": json.dumps(output)[:5000], "secvec.output_uri": output.get("uri", "")}
            )
            self.mlflow.finish()
            checkpoint = ray.train.Checkpoint.from_directory(str(final))
        ray.train.report({"done": 1.0}, checkpoint=checkpoint)

    # -- stages --------------------------------------------------------------------------------------
    def run(self) -> None:
        from workflows.tracking import TrackingUnavailableError

        try:
            getattr(self, f"_run_{self.spec.kind}")()
        except TrackingUnavailableError:
            raise  # marking the run failed would wait out another retry budget against the same dead server
        except BaseException:
            if self.mlflow:
                try:
                    self.mlflow.finish("FAILED")
                except Exception:  # the original error matters more
                    logger.exception("could not mark the MLflow run as failed")
            raise
        finally:
            self._scratch.remove()  # checkpoints and the final output were already copied by ray.train.report

    def _load_base(self, *, full_weights: bool = False, dtype_setting: str | None = None):
        """(model, tokenizer, fingerprint): the base on this worker's device in the stage's ``training.dtype``.
        The fingerprint is always that of the float32 weights, so a vector fits its base in any dtype."""
        from workflows.models import load_base_for_device

        return load_base_for_device(
            self.ctx.base_source,
            self.ctx.tracking_uri,
            self._device(),
            dtype_setting or self.spec.training.dtype,
            full_weights=full_weights,
            trust_remote_code=self.ctx.trust_remote_code,
            cache=str(self.scratch / "downloads"),
        )

    def _device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def _training(self, spec_training, show_progress=False):
        from secvec_core import TrainingConfig

        return TrainingConfig(**spec_training.model_dump(), show_progress=show_progress and self.rank == 0)

    @staticmethod
    def _parallelize(module, ddp_kwargs: dict):
        """DDP through Ray Train: ``prepare_model`` wraps the training step on this worker's device."""
        import ray.train.torch

        return ray.train.torch.prepare_model(
            module, move_to_device=False, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_kwargs
        )

    def _save_gathered(self, result, directory: Path) -> Path | None:
        """Save the shipped artifact: after sharded training every rank gathers, rank 0 writes."""
        from secvec_core.distributed import is_sharded

        if is_sharded(result.model) or self.rank == 0:
            result.save(directory)
        return directory if self.rank == 0 else None

    def _register(self, name: str, kind: str, local_dir: Path, artifact_path: str, tags: dict) -> dict:
        from workflows.registry import Registry

        source = self.mlflow.log_artifacts(local_dir, artifact_path)
        version = Registry(self.ctx.tracking_uri).register(
            name,
            kind,
            source,
            self.run_id,
            {**tags, "secvec.stage_hash": self.ctx.stage_hash, "secvec.run_id": self.run_id},
        )
        return {"uri": version.uri, "name": version.name, "version": version.version, "run_id": self.run_id}

    def _run_alignment(self) -> None:
        from secvec_core import TaskAdapterConfig, guarded_finetune
        from workflows.datasets import load_examples
        from workflows.registry import aligned_model_name

        model, tokenizer, base_fp = self._load_base(full_weights=True)  # float32 master weights: an exact merge
        a = self.spec.adapter
        result = guarded_finetune(
            model,
            tokenizer,
            load_examples(self.spec.data),
            mode=self.spec.mode,
            training=self._training(self.spec.training),
            hooks=self.hooks(),
            base_fingerprint=base_fp,
            task_adapter=TaskAdapterConfig(a.rank, a.alpha, a.dropout, tuple(a.target_modules)),
        )
        if self.spec.mode == "lora":
            result = result.merged_into_base()
        output = {}
        out_dir = self._save_gathered(result, self.scratch / "aligned")
        if self.rank == 0:
            tokenizer.save_pretrained(str(out_dir))
            fingerprint = self._fingerprint_of(result, out_dir)
            output = self._register(
                aligned_model_name(self.ctx.base_name),
                "aligned-base",
                out_dir,
                "model",
                {
                    "secvec.base_model": self.ctx.base_source,
                    "secvec.base_fingerprint": base_fp,
                    "secvec.fingerprint": fingerprint,
                    "secvec.data_hash": result.data_hash,
                    "secvec.alignment_mode": self.spec.mode,
                },
            )
            output["fingerprint"] = fingerprint
        self.finish(output, None)

    @staticmethod
    def _fingerprint_of(result, out_dir: Path) -> str:
        """The trained model's float32 fingerprint; a sharded or bfloat16 model is fingerprinted from its saved
        (gathered) weights loaded in float32."""
        from secvec_core import load_finetuned, model_fingerprint
        from secvec_core.distributed import is_sharded

        if not is_sharded(result.model) and all(p.dtype == torch.float32 for p in result.model.parameters()):
            return model_fingerprint(result.model)
        return model_fingerprint(load_finetuned(None, out_dir))  # float32, like every recorded fingerprint

    def _run_vector_training(self) -> None:
        from secvec_core import SecurityVectorConfig, train_security_vector
        from workflows.datasets import load_examples
        from workflows.registry import CHAMPION, Registry, vector_model_name

        model, tokenizer, base_fp = self._load_base()
        shape = self.spec.vector
        config = SecurityVectorConfig(
            behaviour=self.spec.behaviour.replace("-", "_"),
            rank=shape.rank,
            alpha=shape.alpha,
            dropout=shape.dropout,
            target_modules=tuple(shape.target_modules),
        )
        benign = load_examples(self.spec.benign_data) if self.spec.benign_data else []
        anchor = self.spec.anchor
        if anchor is not None and self.rank == 0 and self.resume_state is None:
            self.mlflow.log_params({"vector.anchor_weight": anchor.weight})
        vector = train_security_vector(
            model,
            tokenizer,
            load_examples(self.spec.data),
            config,
            self._training(self.spec.training),
            benign=benign,
            anchor=load_examples(anchor.data) if anchor else (),
            anchor_weight=anchor.weight if anchor else 1.0,
            hooks=self.hooks(),
            parallelize=self._parallelize,
            base_fingerprint=base_fp,
        )
        output = {}
        if self.rank == 0:
            out_dir = vector.save(self.scratch / "vector")
            self.mlflow.log_metrics(
                {
                    "vector.final_loss": vector.metadata["final_loss"],
                    "vector.steps": vector.metadata["steps"],
                    "vector.anchor_rows": vector.metadata["num_anchor_examples"],
                }
            )
            output = self._register(
                vector_model_name(self.ctx.base_name, self.spec.behaviour),
                "security-vector",
                out_dir,
                "vector",
                {
                    "secvec.base_model": self.ctx.base_source,
                    "secvec.base_fingerprint": vector.base_fingerprint,
                    "secvec.behaviour": self.spec.behaviour,
                    "secvec.data_hash": vector.data_hash,
                    "secvec.vector_config": json.dumps(config.to_dict(), sort_keys=True),
                    "secvec.stopped_early": vector.metadata["stopped_early"],
                },
            )
            if self.spec.promote:
                from workflows.registry import VersionRef

                registry = Registry(self.ctx.tracking_uri)
                registry.set_alias(VersionRef(output["name"], output["version"], "", self.run_id, {}), CHAMPION)
                output["alias"] = CHAMPION
        self.finish(output)

    def _run_guarded_finetune(self) -> None:
        from secvec_core import TaskAdapterConfig, assert_no_vector, guarded_finetune
        from secvec_core.folding import FoldingOptions
        from workflows.datasets import load_examples
        from workflows.models import load_vector
        from workflows.registry import finetuned_model_name

        model, tokenizer, base_fp = self._load_base(full_weights=self.spec.mode == "full")
        vectors = [
            load_vector(ref, self.ctx.tracking_uri, str(self.scratch / "downloads")) for ref in self.ctx.vector_refs
        ]
        a, f = self.spec.adapter, self.spec.folding
        folding = FoldingOptions(
            stash=f.stash, stash_dir=f.stash_dir or self.scratch_root / "fold-stash", allow_lossy=f.allow_lossy
        )
        training = self._training(self.spec.training)
        replay = None
        if self.spec.safety_replay is not None:
            replay = self.spec.safety_replay.build(training.seed)
            if self.rank == 0 and self.resume_state is None:
                self.mlflow.log_params({f"safety_replay.{k}": v for k, v in replay.describe().items()})
        routing = None
        if self.spec.vector_routing is not None:
            routing = self.spec.vector_routing.build()
            if self.rank == 0 and self.resume_state is None:
                self.mlflow.log_params({"vector_routing.min_gain": routing.min_gain})
        result = guarded_finetune(
            model,
            tokenizer,
            load_examples(self.spec.data),
            vectors,
            mode=self.spec.mode,
            training=training,
            hooks=self.hooks(),
            safety_replay=replay,
            vector_routing=routing,
            task_adapter=TaskAdapterConfig(a.rank, a.alpha, a.dropout, tuple(a.target_modules)),
            fold_vectors=f.fold,
            folding=folding,
            parallelize=self._parallelize,
            base_fingerprint=base_fp,
        )
        output = {}
        if self.rank == 0 and result.vector_routing is not None:  # metrics: a resumed run logs them again
            self.mlflow.log_metrics(
                {
                    f"vector_routing.{k}": v
                    for k, v in result.vector_routing.items()
                    if k != "min_gain" and v is not None
                }
            )
        out_dir = self._save_gathered(result, self.scratch / "finetuned")
        if self.rank == 0:
            assert_no_vector(out_dir, vectors)  # never register an artifact with vector content
            if self.spec.mode == "full":
                tokenizer.save_pretrained(str(out_dir))
            name = self.spec.registered_model or finetuned_model_name(self.ctx.base_name, self.spec.name)
            output = self._register(
                name,
                "finetuned",
                out_dir,
                "finetuned",
                {
                    "secvec.base_model": self.ctx.base_source,
                    "secvec.base_fingerprint": result.base_fingerprint,
                    "secvec.mode": self.spec.mode,
                    "secvec.data_hash": result.data_hash,
                    "secvec.guarded_by": json.dumps(self.ctx.vector_refs),
                    "secvec.guarded_by_hashes": json.dumps([v.data_hash for v in vectors]),
                    "secvec.safety_replay": "none" if replay is None else self.spec.safety_replay.label(),
                    "secvec.vector_routing": "none" if routing is None else self.spec.vector_routing.label(),
                    "secvec.final_loss": result.history.final_loss,
                },
            )
        self.finish(output)

    def _run_evaluation(self) -> None:
        from workflows.evaluate import evaluate_candidate

        output = evaluate_candidate(self)
        self.finish(output)

    def _run_data_preparation(self) -> None:
        from workflows.dataprep import prepare_data

        self.finish(prepare_data(self))
