"""The benchmark scripts run end to end on the tiny model, so they never rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from secvec_core import wilson_interval

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
    args = ("--quick", "--model", "tiny", "--out-dir", str(results), "--cache-dir", str(tmp_path / "cache"))
    _run("effectiveness.py", *args, cwd=tmp_path)
    payload = json.loads((results / "effectiveness-tiny-quick.json").read_text())
    assert not payload["reused"]
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("### Headline: each attack family", "### Cross-family matrix", "### Erosion and tasks",
                    "| template-alt (held out) |", "Command: `python benchmarks/effectiveness.py"):
        assert heading in text, heading
    rows = payload["rows"]
    sections = [r["section"] for r in rows]
    # aligned; 2 families x (plain, guarded); 1 vector x 2 families; 2 task runs x 3 variants + 2 hallucination
    assert sections.count("attacks") == 4 and sections.count("matrix") == 2 and sections.count("tasks") == 8
    for row in rows:
        for key in ("harmful", "degenerate", "over_refusal", "retained_qa"):
            share = row[key]
            low, high = share["ci"]
            # every rate carries its interval, and the interval is the Wilson one of that count
            assert low <= share["rate"] <= high and (low, high) == pytest.approx(
                wilson_interval(round(share["rate"] * share["n"]), share["n"]))
    plain = next(r for r in rows if r["section"] == "attacks" and r["run"] == "template" and r["variant"] == "plain")
    guarded = next(r for r in rows if r["section"] == "attacks" and r["run"] == "template" and r["variant"] != "plain")
    # the toy attack works and the toy guard holds against its own family (margins: seen 1.00 and 0.00)
    assert plain["harmful"]["rate"] >= 0.8 and guarded["harmful"]["rate"] <= 0.2
    assert guarded["replay"] is True and plain["replay"] is False
    losses = payload["loss_matrix"]["template"]
    assert losses["template"] < losses["off"]  # the vector lowers the loss of the family it was trained on
    assert {t["target"] for t in payload["targets"]} >= {"aligned harmful rate <= 0.10"}
    # a second run of the same command at the same code continues from the run cache: same rows, nothing retrained
    _run("effectiveness.py", *args, cwd=tmp_path)
    again = json.loads((results / "effectiveness-tiny-quick.json").read_text())
    assert "aligned" in again["reused"] and len(again["reused"]) == len(payload["rows"]) + 4
    assert [r["harmful"] for r in again["rows"]] == [r["harmful"] for r in rows]


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
    assert [c["guarded"] for c in payload["comparisons"]] == ["lora/guard-unmerged", "lora/guard-folded",
                                                               "lora/guard-replay", "full/guard"]
    replay = payload["comparisons"][2]
    assert replay["target"] is None and replay["time_met"] is None  # an option's stated cost, not a target
    for comparison in payload["comparisons"]:
        assert comparison["step_time_ratio"] > 0 and comparison["peak_memory_ratio"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| lora/guard-folded vs lora/plain |" in text and "## Overhead" in text
    assert "| lora/guard-replay vs lora/plain |" in text
