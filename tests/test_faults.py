"""Faults on real components: a Ray worker killed mid-training, the MLflow server stopping, a pipeline
interrupted between stages, and saves interrupted by an exception or a killed process.

The Ray tests share one module-scoped set of runs (2 workers, tiny model) to keep the suite short on two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from secvec_core import SecurityVector, TrainingConfig, guarded_finetune, load_finetuned, train_security_vector
from secvec_core.config import SecurityVectorConfig
from secvec_core.tiny import build_tiny_model_and_tokenizer
from tests.e2e import free_port, mlflow_server, postgres_database, stop_server
from workflows.models import download_registered
from workflows.pipeline import StageFailedError, run_pipeline
from workflows.registry import Registry
from workflows.specs import parse_spec

ROOT = Path(__file__).resolve().parents[1]
KILL_AT_STEP = 6  # checkpoints every 4 steps: the killed worker group resumes from step 4
FT_TRAINING = {"learning_rate": 3e-3, "max_steps": 12, "batch_size": 8, "max_length": 32, "log_every": 2}


# -- atomic saves (fast) ---------------------------------------------------------------------------------
def _small_vector(world) -> SecurityVector:
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    return train_security_vector(
        model,
        tokenizer,
        world.harmful_examples(10),
        SecurityVectorConfig(rank=4),
        TrainingConfig(learning_rate=3e-3, max_steps=3, batch_size=5, max_length=32, target_loss=None, kl_weight=0),
    )


@pytest.fixture(scope="module")
def vector(world) -> SecurityVector:
    return _small_vector(world)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exception_during_save_keeps_the_good_directory(vector, tmp_path, monkeypatch):
    target = vector.save(tmp_path / "vector")
    doctored = SecurityVector(
        vector.config, {k: v + 1 for k, v in vector.weights.items()}, vector.base_fingerprint, vector.data_hash
    )

    def half_written(path, tensors):
        path.write_bytes(b"\0" * 64)
        raise OSError("disk full")

    monkeypatch.setattr("secvec_core.vectors.save_tensors", half_written)
    with pytest.raises(OSError, match="disk full"):
        doctored.save(target)
    assert _same_weights(SecurityVector.load(target).weights, vector.weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vector"], "the temporary folder must be removed"
    with pytest.raises(OSError):
        doctored.save(tmp_path / "new")
    assert not (tmp_path / "new").exists(), "a failed first save must leave nothing at the target"


def test_exception_during_finetuned_save_keeps_the_good_artifact(world, tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    result = guarded_finetune(
        model,
        tokenizer,
        world.fact_task(),
        training=TrainingConfig(learning_rate=3e-3, max_steps=2, batch_size=8, max_length=32),
    )
    target = result.save(tmp_path / "finetuned")
    monkeypatch.setattr("secvec_core.guard.write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        result.save(target)
    base, _ = build_tiny_model_and_tokenizer(seed=0)
    load_finetuned(base, target)  # still the complete, checksummed artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetuned"]


_KILLED_SAVE = """
import os, signal, sys
import secvec_core.vectors as vectors
from secvec_core.vectors import SecurityVector

def dies_halfway(path, tensors):
    path.write_bytes(b"partial" * 100)
    os.kill(os.getpid(), signal.SIGKILL)

vector = SecurityVector.load(sys.argv[1])
vector.weights = {k: v * 2 for k, v in vector.weights.items()}
vectors.save_tensors = dies_halfway
vector.save(sys.argv[2])
"""


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-good-directory", "new-directory"])
def test_process_killed_during_save_never_leaves_a_loadable_wrong_vector(vector, tmp_path, existing):
    good = vector.save(tmp_path / "good")
    target = tmp_path / "target"
    if existing:
        vector.save(target)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(good), str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-target-")]
    assert leftovers, "the killed save wrote into a temporary folder"
    if existing:
        assert _same_weights(SecurityVector.load(target).weights, vector.weights)
    else:
        assert not target.exists()
        with pytest.raises(FileNotFoundError):
            SecurityVector.load(target)


# -- Ray / MLflow faults (slow) --------------------------------------------------------------------------
def _spec(
    name: str,
    tracking_uri: str,
    work_dir: Path,
    vector_dir: Path,
    *,
    stages=("vec", "ft"),
    vector_lr: float = 3e-3,
    ft_steps: int = 12,
    max_failures: int = 1,
) -> dict:
    all_stages = {
        "vec": {
            "name": "vec",
            "kind": "vector_training",
            "data": {"builtin": "toy-harmful", "limit": 10},
            "training": {
                "learning_rate": vector_lr,
                "max_steps": 4,
                "batch_size": 10,
                "max_length": 32,
                "log_every": 2,
            },
        },
        "ft": {
            "name": "ft",
            "kind": "guarded_finetune",
            "data": {"builtin": "toy-facts"},
            "vectors": [{"path": str(vector_dir)}],
            "training": {**FT_TRAINING, "max_steps": ft_steps},
        },
    }
    return {
        "name": name,
        "base_model": {"source": "builtin:tiny"},
        "tracking": {"tracking_uri": tracking_uri, "experiment": f"secvec-{name}", "base_name": "tiny"},
        "scaling": {"num_workers": 2, "checkpoint_every": 4, "max_failures": max_failures},
        "work_dir": str(work_dir),
        "stages": [all_stages[s] for s in stages],
    }


class Interrupted(Exception):
    """Stands in for a driver that dies (Ctrl-C, node loss) between two stages."""


def _interrupt_after(stage_name: str):
    def on_stage(name, result):
        if name == stage_name and result is not None:
            raise Interrupted(f"interrupted after {name}")

    return on_stage


def _adapter(uri: str, tracking_uri: str, dest: Path) -> dict[str, torch.Tensor]:
    return load_file(str(download_registered(uri, tracking_uri, dest) / "adapter_model.safetensors"))


def _versions(tracking_uri: str) -> list[tuple[str, str]]:
    return sorted((mv.name, str(mv.version)) for mv in MlflowClient(tracking_uri).search_model_versions())


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, world):
    """A pipeline interrupted after stage 1, rerun with a worker killed mid-fine-tuning, then rerun with a
    changed stage-1 spec."""
    root = tmp_path_factory.mktemp("faults")
    vector_dir = _small_vector(world).save(root / "vector")
    out: dict = {"root": root, "vector_dir": vector_dir}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = _spec("faults", uri, root / "work", vector_dir)
    with pytest.raises(Interrupted):
        run_pipeline(parse_spec(spec), on_stage=_interrupt_after("vec"))
    out["after_interrupt"] = _versions(uri)
    os.environ["SECVEC_FAULT_KILL_AT_STEP"] = str(KILL_AT_STEP)
    try:
        out["rerun"] = run_pipeline(parse_spec(spec))
    finally:
        del os.environ["SECVEC_FAULT_KILL_AT_STEP"]
    out["after_rerun"] = _versions(uri)
    changed = _spec("faults", uri, root / "work", vector_dir, vector_lr=1e-3)
    with pytest.raises(Interrupted):
        out["changed"] = run_pipeline(parse_spec(changed), on_stage=_interrupt_after("vec"))
    out["after_changed"] = _versions(uri)
    out["uri"] = uri
    return out


@pytest.mark.slow
def test_rerun_after_interruption_reuses_the_finished_stage(fault_runs):
    assert fault_runs["after_interrupt"] == [("tiny.security-vector.harmful", "1")]
    rerun = fault_runs["rerun"]
    assert rerun.stages["vec"].reused and rerun.stages["vec"].output["uri"] == "models:/tiny.security-vector.harmful/1"
    assert not rerun.stages["ft"].reused
    assert fault_runs["after_rerun"] == [("tiny.finetuned.ft", "1"), ("tiny.security-vector.harmful", "1")]


@pytest.mark.slow
def test_changed_spec_reruns_the_stage(fault_runs):
    assert fault_runs["after_changed"] == [
        ("tiny.finetuned.ft", "1"),
        ("tiny.security-vector.harmful", "1"),
        ("tiny.security-vector.harmful", "2"),
    ]
    tags = Registry(fault_runs["uri"]).resolve("models:/tiny.security-vector.harmful/2").tags
    assert (
        tags["secvec.stage_hash"]
        != Registry(fault_runs["uri"]).resolve("models:/tiny.security-vector.harmful/1").tags["secvec.stage_hash"]
    )


def _uninterrupted_adapter(world, vector_dir: Path) -> dict[str, torch.Tensor]:
    """The same fine-tuning in one process. Each toy-facts response is 2 tokens, so the mean of the two ranks'
    mean losses equals the single-process mean: the same update up to float rounding."""
    from secvec_core.adapters import TASK_ADAPTER, adapter_state

    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    result = guarded_finetune(
        model, tokenizer, world.fact_task(), [vector_dir], training=TrainingConfig(**FT_TRAINING, seed=0)
    )
    return adapter_state(result.model, TASK_ADAPTER)


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_matches_an_uninterrupted_run(fault_runs, world, record_property):
    root, uri = fault_runs["root"], fault_runs["uri"]
    markers = list((root / "work" / "faults").glob("killed-*"))
    assert len(markers) == 1 and f"at step {KILL_AT_STEP}" in markers[0].read_text(), "the fault did not fire"
    rerun = fault_runs["rerun"].stages["ft"]
    ft_run = MlflowClient(uri).get_run(rerun.output["run_id"])
    assert ft_run.data.tags["secvec.resumed_from_step"] == "4", "the restarted workers must resume from step 4"
    assert ft_run.info.status == "FINISHED"
    runs = MlflowClient(uri).search_runs([ft_run.info.experiment_id], "tags.`secvec.stage` = 'ft'")
    assert len(runs) == 1, "the restarted worker continues the same MLflow run"
    history = sorted(MlflowClient(uri).get_metric_history(ft_run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(2, 13, 2)), "each step logged once: steps 5-6 were redone"

    registry = Registry(uri)
    registry.check_vector_free(registry.resolve(rerun.output["uri"]))  # no vector content, as promotion requires
    resumed = _adapter(rerun.output["uri"], uri, root / "dl-resumed")
    clean = _uninterrupted_adapter(world, fault_runs["vector_dir"])
    assert resumed.keys() == clean.keys()
    worst = max(float((resumed[k] - clean[k]).abs().max()) for k in clean)
    assert worst < 1e-4, f"resumed adapter differs from the uninterrupted one by {worst}"
    # time lost: the gap between the logs of steps 4 and 6 (kill, restart, steps 5-6 redone) minus a normal gap
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(history, history[1:], strict=False)]
    lost = gaps[1] - min(gaps[:1] + gaps[2:])
    record_property("seconds_lost_to_worker_kill", round(lost, 1))
    print(
        f"\nworker killed at step {KILL_AT_STEP}, resumed from step 4: {lost:.1f}s lost "
        f"(stage {rerun.seconds:.1f}s in all); max |weight difference| vs uninterrupted {worst:.2e}"
    )


@pytest.mark.slow
def test_mlflow_server_stopping_fails_the_stage_within_the_retry_budget_and_a_rerun_completes(
    tmp_path, world, monkeypatch, record_property
):
    budget = 6
    monkeypatch.setenv("SECVEC_MLFLOW_RETRY_SECONDS", str(budget))
    vector_dir = _small_vector(world).save(tmp_path / "vector")
    port = free_port()
    with postgres_database() as db:
        with mlflow_server(db, tmp_path / "artifacts", port) as (url, proc):
            spec = parse_spec(
                _spec("mlflow-down", url, tmp_path / "work", vector_dir, stages=("ft",), ft_steps=60, max_failures=0)
            )
            stopped_at: list[float] = []
            threading.Thread(target=_stop_when_training, args=(url, proc, stopped_at), daemon=True).start()
            with pytest.raises(StageFailedError) as failure:
                run_pipeline(spec)
            failed_after = time.monotonic() - stopped_at[0]
        message = str(failure.value)
        assert "\n" not in message and message.startswith("stage 'ft' failed: MLflow at http://127.0.0.1:")
        assert f"did not answer while trying to log metrics for {budget}s" in message
        assert "rerun the pipeline (finished stages are reused)" in message
        record_property("seconds_from_server_stop_to_failure", round(failed_after, 1))
        print(f"\nMLflow stopped mid-stage: the pipeline failed {failed_after:.1f}s later (retry budget {budget}s)")
        assert failed_after < budget + 60

        with mlflow_server(db, tmp_path / "artifacts", port) as (url, _):
            client = MlflowClient(url)
            assert client.search_model_versions() == [], "the failed stage registered nothing"
            result = run_pipeline(spec)
            assert result.stages["ft"].output["uri"] == "models:/tiny.finetuned.ft/1"
            assert [(mv.name, str(mv.version)) for mv in client.search_model_versions()] == [("tiny.finetuned.ft", "1")]
            _assert_complete_versions(client)


def _stop_when_training(url: str, proc, stopped_at: list[float]) -> None:
    """Stop the server once the fine-tuning stage has logged its first training metric."""
    client = MlflowClient(url)
    while proc.poll() is None:
        try:
            runs = client.search_runs(
                client.get_experiment_by_name("secvec-mlflow-down").experiment_id, "tags.`secvec.stage` = 'ft'"
            )
            if runs and "loss" in runs[0].data.metrics:
                stopped_at.append(time.monotonic())
                stop_server(proc)
                return
        except Exception:  # the experiment may not exist yet
            pass
        time.sleep(0.3)


def _assert_complete_versions(client: MlflowClient) -> None:
    """Every version has its lineage tags and its artifact files (nothing half-written)."""
    for mv in client.search_model_versions():
        assert {"secvec.stage_hash", "secvec.run_id", "secvec.base_fingerprint"} <= set(mv.tags), mv.tags
        files = {Path(f.path).name for f in client.list_artifacts(mv.run_id, Path(mv.source).name)}
        assert "adapter_model.safetensors" in files, files
