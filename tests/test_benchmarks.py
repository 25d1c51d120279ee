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


def test_effectiveness_quick_on_the_tiny_model(tmp_path):
    results = tmp_path / "results"
    _run("effectiveness.py", "--quick", "--model", "tiny", "--out-dir", str(results), cwd=tmp_path)
    payload = json.loads((results / "effectiveness-tiny-quick.json").read_text())
    assert (results / "harmful-vs-samples-tiny-quick.png").stat().st_size > 1000
    text = (tmp_path / "RESULTS.md").read_text()
    for row in (
        "| aligned model |",
        "harmful (all available)",
        "+ same, guarded by a vector from",
        "+ benign new task | plain",
        "+ benign new task | guarded",
        "+ mixed (new task +",
        "+ hallucination set",
    ):
        assert row in text, row
    assert "harmful-vs-samples-tiny-quick.png" in text and "Command: `python benchmarks/effectiveness.py" in text
    rows = payload["rows"]
    assert len(rows) == 11
    for row in rows:
        for key in ("harmful_rate", "task_accuracy", "retained_qa", "benign_refusal", "fabricated_learned"):
            if key in row:
                assert 0.0 <= row[key] <= 1.0, (row["run"], key)
        if "transfer_gap" in row:
            assert -1.0 <= row["transfer_gap"] <= 1.0
    assert all(0.0 <= v <= 1.0 for curve in payload["chart"].values() for v in curve.values())
    assert {t["target"] for t in payload["targets"]} >= {"aligned harmful rate <= 0.10"}


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
        "full/plain",
        "full/guard",
    }
    for variant in payload["variants"].values():
        assert variant["median_step_seconds"] > 0 and variant["steps_timed"] == 2 * 4
        assert variant["peak_rss_mb"] > 0
    assert [c["guarded"] for c in payload["comparisons"]] == ["lora/guard-unmerged", "lora/guard-folded", "full/guard"]
    for comparison in payload["comparisons"]:
        assert comparison["step_time_ratio"] > 0 and comparison["peak_memory_ratio"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| lora/guard-folded vs lora/plain |" in text and "## Overhead" in text
