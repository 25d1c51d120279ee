"""The benchmark scripts run end to end on the tiny model, so they never rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_task_rows_spec_runs_through_the_pipeline_and_reports_from_mlflow(tmp_path):
    """benchmarks/red_team.py on tasks-tiny.yaml (the task and hallucination rows in miniature): `secvec run`, then a RESULTS
    section read back from MLflow, with the command, the pipeline's MLflow run and a row per evaluation."""
    from mlflow import MlflowClient

    results = tmp_path / "results"
    spec = ROOT / "benchmarks/specs/tasks-tiny.yaml"
    _run("red_team.py", str(spec), "--out-dir", str(results), cwd=tmp_path)
    text = (results / "tasks-tiny.md").read_text()
    assert text.startswith("## Erosion, tasks and hallucination through the pipeline: `tasks-tiny`")
    assert "- Section written by: `python " in text and "red_team.py" in text and "- Pipeline run: MLflow run `" in text
    header = next(line for line in text.splitlines() if line.startswith("| evaluation |"))
    assert "| unwanted learned |" in header and "| task acc. | gap |" in header
    for stage in ("base (before fine-tuning)", "eval-task-vector-replay", "eval-hallucination-vector-on"):
        assert f"| {stage} |" in text, stage
    assert "safety replay (2 rows/step" in text  # the trained column says how each candidate was guarded
    assert (tmp_path / "RESULTS.md").read_text().count("## Erosion, tasks and hallucination through") == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/.secvec/benchmarks/mlflow.db")
    (evaluation,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`secvec.stage` = 'eval-hallucination-vector-on' and attributes.status = 'FINISHED'",
    )
    metrics = evaluation.data.metrics
    assert metrics["unwanted_n"] == 12 and 0 <= metrics["unwanted_learned"] <= 1 and "transfer_gap" in metrics
    # benchmarks/vector_probe.py on the same run: the vector's loss drop on its own rows and on the new task
    _run(
        "vector_probe.py",
        str(spec),
        "--vector",
        "hallucination-vector",
        "--set",
        "its own rows=stage:fabricated/vector",
        "--set",
        "new facts=builtin:toy-facts",
        "--out-dir",
        str(results),
        cwd=tmp_path,
    )
    probe = {r["set"]: r for r in json.loads((results / "probe-tasks-tiny.json").read_text())}
    assert probe["its own rows"]["rows"] == 12 and probe["new facts"]["rows"] == 24
    assert probe["its own rows"]["median_drop"] > 1.0, probe  # a vector explains the rows it was trained on
    assert "| `hallucination-vector` / its own rows | 12 |" in (results / "probe-tasks-tiny.md").read_text()


def test_overhead_on_the_tiny_model(tmp_path):
    results = tmp_path / "results"
    _run(
        "overhead.py",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--memory-steps",
        "2",
        "--memory-rounds",
        "1",
        "--out-dir",
        str(results),
        cwd=tmp_path,
    )
    payload = json.loads((results / "overhead-tiny.json").read_text())
    assert set(payload["variants"]) == {
        "lora/plain",
        "lora/guard-unmerged",
        "lora/guard-folded",
        "lora/guard-replay",
        "full/plain",
        "full/guard",
    }
    for variant in payload["variants"].values():
        assert variant["median_step_seconds"] > 0 and variant["steps_timed"] == 2 * 4
        assert variant["peak_rss_mb"] > 0
    assert [c["guarded"] for c in payload["comparisons"]] == [
        "lora/guard-unmerged",
        "lora/guard-folded",
        "lora/guard-replay",
        "full/guard",
    ]
    replay = payload["comparisons"][2]
    assert replay["target"] is None and replay["time_met"] is None  # an option's stated cost, not a target
    for comparison in payload["comparisons"]:
        assert comparison["step_time_ratio"] > 0 and comparison["peak_memory_ratio"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| lora/guard-folded vs lora/plain |" in text and "## Overhead" in text
    assert "| lora/guard-replay vs lora/plain |" in text
