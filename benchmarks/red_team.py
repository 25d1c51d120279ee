"""Benchmarks through the pipeline: run a spec of benchmarks/specs with the product's pipeline, then write its
RESULTS.md section from MLflow runs alone (the red-team sweep, and the paper's table).

    python benchmarks/red_team.py benchmarks/specs/sweep-smollm2.yaml          # run, then report
    python benchmarks/red_team.py benchmarks/specs/sweep-smollm2.yaml --report-only
    python benchmarks/red_team.py benchmarks/specs/paper-table-smollm2.yaml    # the paper's table
    python benchmarks/red_team.py benchmarks/specs/ablation-replay-smollm2.yaml  # replay ablations (after it)
    python benchmarks/red_team.py benchmarks/specs/matrix-smollm2.yaml     # each vector alone x each family
    python benchmarks/red_team.py benchmarks/specs/tasks-smollm2.yaml      # erosion, tasks, hallucination
    python benchmarks/red_team.py benchmarks/specs/replay-smollm2.yaml     # replay objectives side by side
    python benchmarks/red_team.py benchmarks/specs/hallucination-smollm2.yaml  # hallucination vector strength
    python benchmarks/red_team.py benchmarks/specs/routing-smollm2.yaml    # vector routing side by side
    python benchmarks/red_team.py benchmarks/specs/replay-alone-smollm2.yaml  # the replay alone on benign data
    python benchmarks/red_team.py benchmarks/specs/tasks-tiny.yaml --out-dir /tmp/r  # its plumbing, minutes

Why a script at all: the numbers come from `secvec run` (the stages a user runs, on local Ray and MLflow on
SQLite) and `secvec report` (the table and heatmap, read back from MLflow); this only adds what a benchmark
section needs around them: the command, the machine, the code version and the wall time of the pipeline run
(from MLflow's own start and end times), and the MLflow run ids behind every number.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, RESULTS_MD, provenance, provenance_markdown, write_section  # noqa: E402

# A research spec's RESULTS title, by the prefix of its name: the first match wins ("replay-alone-" before "replay-").
SECTION_TITLES = (
    ("recipe-", "The recipe against every target"),
    ("ablation-", "Ablation"),
    ("matrix-", "Cross-family matrix"),
    ("tasks-", "Erosion, tasks and hallucination"),
    ("replay-alone-", "Safety replay alone"),
    ("replay-", "Replay objectives"),
    ("hallucination-anchor-", "Hallucination vector with an anchor"),
    ("hallucination-", "Hallucination vector strength"),
    ("routing-", "Vector routing"),
)


def _latest_pipeline_run(tracking_uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        f"tags.`secvec.kind` = 'pipeline' and tags.`secvec.pipeline` = '{name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(
            f"no finished run of pipeline {name!r} at {tracking_uri}: run it first (without --report-only)"
        )
    return runs[0]


def _prompt_counts(spec) -> dict[str, float]:
    """Prompts each sweep cell was scored on, from the spec (the same files the stage read): the intervals of
    cells measured before cells recorded their own counts."""
    from workflows.datasets import load_prompt_list
    from workflows.specs import AttackSweepStage

    sweeps = [s for s in spec.stages if isinstance(s, AttackSweepStage)]
    if len(sweeps) != 1:
        return {}
    counts = {"harmful_n": float(len(load_prompt_list(sweeps[0].harmful_prompts)))}
    if sweeps[0].benign_prompts is not None:
        counts["benign_n"] = float(len(load_prompt_list(sweeps[0].benign_prompts)))
    return counts


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="A spec of benchmarks/specs, e.g. benchmarks/specs/sweep-smollm2.yaml")
    parser.add_argument("--report-only", action="store_true", help="Write the section from the latest finished run.")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="Where the section and its images go; RESULTS.md is reassembled beside it.",
    )
    args = parser.parse_args(argv[1:])
    results_md = RESULTS_MD if args.out_dir == RESULTS_DIR else args.out_dir.parent / "RESULTS.md"

    from workflows.pipeline import absolute_tracking_uri, run_pipeline
    from workflows.report import pipeline_report
    from workflows.specs import load_spec, with_absolute_paths

    spec = with_absolute_paths(load_spec(args.spec))
    info = provenance(argv, seed=0)
    if not args.report_only:
        started = time.monotonic()
        run_pipeline(spec)
        print(f"pipeline {spec.name}: {(time.monotonic() - started) / 60:.1f} min")
    tracking_uri = absolute_tracking_uri(spec.tracking.tracking_uri)
    parent = _latest_pipeline_run(tracking_uri, spec.name)
    wall_s = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    with tempfile.TemporaryDirectory() as scratch:
        report = pipeline_report(tracking_uri, spec.name, scratch, counts=_prompt_counts(spec))
        body = report.read_text(encoding="utf-8").split("\n", 1)[1]  # drop the report's own title
        images = sorted(Path(scratch).glob("*.png"))
        prefix = args.spec.stem
        for image in images:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, args.out_dir / f"{prefix}-{image.name}")
            body = body.replace(f"]({image.name})", f"](results/{prefix}-{image.name})")
    started_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(parent.info.start_time / 1000))
    ran_at = parent.data.tags.get("secvec.git_commit") or "not recorded (runs before the secvec.git_commit tag)"
    title = (
        "Red team"
        if any(s.kind == "attack_sweep" for s in spec.stages)
        else next((t for prefix, t in SECTION_TITLES if spec.name.startswith(prefix)), "The paper's table")
    )
    section = "\n".join(
        [
            f"## {title} through the pipeline: `{spec.name}`",
            "",
            provenance_markdown(info, wall_s).replace("- Command:", "- Section written by:", 1),
            f"- Pipeline run: MLflow run `{parent.info.run_id}` in `{spec.tracking.tracking_uri}`, started "
            f"{started_utc}, code `{ran_at}`; the wall time above is that run's (MLflow start to end, every stage)",
            "",
            body.strip(),
        ]
    )
    write_section(args.out_dir, f"{prefix}.md", section, results_md)
    print(f"wrote {args.out_dir / (prefix + '.md')} and {results_md}")


if __name__ == "__main__":
    main(sys.argv)
