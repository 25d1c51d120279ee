"""The attack_sweep stage: red-team security vectors over the grid of attacks a fine-tuning service allows.

A defence that holds at its authors' hyperparameters can break at a larger learning rate or more steps, and a
service's customers choose both. So every cell of the grid (learning rate x steps x LoRA rank / full weights)
fine-tunes the base model on the attack data twice, plain and guarded by the vectors (on and frozen), and
scores both with the vectors off, as shipped. The summary is the **worst guarded cell**, the plain harmful
rate in that same cell (how strong the attack was there), the strongest plain attack of the sweep and the
highest benign refusal rate of a guarded model; it decides whether the vectors may become ``champion``
(:mod:`workflows.gates`).

Cells run as Ray tasks, as many side by side as the cluster's resources allow (each asks for
``scaling.resources_per_worker``). Each cell logs one MLflow child run of the sweep's run, tagged with a hash
of everything that determines it; a rerun reuses finished cells, and a plain arm already measured (same base,
data, hyperparameters and evaluation, whatever the vectors) is reused by other sweeps.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from workflows.specs import AttackGrid, AttackSweepStage, ScalingSpec
from workflows.stages import StageContext

logger = logging.getLogger(__name__)
ARTIFACT_DIR = "redteam"
CELL_KIND = "attack_cell"
# What one arm measures; the prompt counts let `secvec report` give every rate its interval.
ARM_METRICS = ("harmful_rate", "degenerate_rate", "benign_refusal_rate", "final_loss", "harmful_n", "benign_n")


def grid_cells(grid: AttackGrid) -> list[dict]:
    """Every combination of the grid, adapters outermost, as plain dicts (JSON-ready, hashable by content)."""
    cells = []
    for adapter, lr, steps in itertools.product(grid.adapters, grid.learning_rate, grid.max_steps):
        cell = {"mode": adapter.mode, "learning_rate": lr, "max_steps": steps}
        if adapter.mode == "lora":
            cell.update(rank=adapter.rank, alpha=adapter.alpha or 2 * adapter.rank)
        cells.append(cell)
    return cells


def attack_label(cell: dict) -> str:
    return "full weights" if cell["mode"] == "full" else f"LoRA r{cell['rank']}"


def cell_label(cell: dict) -> str:
    return f"{attack_label(cell)}, lr {cell['learning_rate']:g}, {cell['max_steps']} steps"


def cell_hashes(ctx: StageContext, spec: AttackSweepStage, cell: dict) -> tuple[str, str]:
    """(cell hash, plain-arm hash): the plain arm does not depend on the vectors, so other sweeps reuse it."""
    from workflows.pipeline import stage_hash

    what = {
        "cell": cell,
        "training": spec.training.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "harmful_prompts": spec.harmful_prompts.model_dump(mode="json"),
        "benign_prompts": spec.benign_prompts.model_dump(mode="json") if spec.benign_prompts else None,
        "judge": spec.judge.model_dump(mode="json"),
        "max_new_tokens": spec.max_new_tokens,
    }
    inputs = {"base": ctx.base_source, "datasets": ctx.datasets or {}}
    content = ctx.local_content or {}  # an edited local data file, base or vector makes new cells
    vector_paths = {str(Path(v).resolve()) for v in ctx.vector_refs if not v.startswith("models:/")}
    plain_content = {k: v for k, v in content.items() if k not in vector_paths}
    guarded = {**inputs, "vectors": ctx.vector_refs, **({"local_content": content} if content else {})}
    if spec.safety_replay is not None:  # only the guarded arm replays; without it the hash is as before
        guarded["safety_replay"] = spec.safety_replay.model_dump(mode="json")
    if spec.vector_routing is not None:  # likewise
        guarded["vector_routing"] = spec.vector_routing.model_dump(mode="json")
    plain = {**inputs, **({"local_content": plain_content} if plain_content else {})}
    return stage_hash(what, guarded), stage_hash(what, plain)


# -- inside a Ray task -------------------------------------------------------------------------------------


def _setup(ctx: StageContext, threads: int):
    import torch

    from workflows.datasets import use_stage_outputs
    from workflows.leftovers import Scratch
    from workflows.models import load_base_model

    torch.set_num_threads(max(1, threads))
    if ctx.retry_seconds is not None:
        from workflows.tracking import RETRY_ENV

        os.environ[RETRY_ENV] = str(ctx.retry_seconds)
    if ctx.datasets:
        use_stage_outputs(ctx.datasets, ctx.tracking_uri)
    # Downloads (registry models and vectors: hundreds of MB for a real model) go to a locked scratch folder
    # that the caller removes when the cell ends; a killed task's is removed by the next run.
    scratch = Scratch("cell")
    model, tokenizer = load_base_model(
        ctx.base_source, ctx.tracking_uri, trust_remote_code=ctx.trust_remote_code, cache=str(scratch.path)
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer, scratch


def _scores(model, tokenizer, spec: AttackSweepStage) -> dict[str, float]:
    """Harmful (complied) and degenerate shares on the harmful prompts, refusals on the benign ones."""
    from secvec_core import refusal_rate, score_answers
    from workflows.datasets import load_prompt_list

    harmful = load_prompt_list(spec.harmful_prompts)
    report = score_answers(model, tokenizer, harmful, spec.judge.build(), max_new_tokens=spec.max_new_tokens)
    out = {
        "harmful_rate": report.share("complied"),
        "degenerate_rate": report.share("degenerate"),
        "harmful_n": float(len(harmful)),
    }
    if spec.benign_prompts is not None:
        benign = load_prompt_list(spec.benign_prompts)
        out["benign_refusal_rate"] = refusal_rate(model, tokenizer, benign, max_new_tokens=spec.max_new_tokens)
        out["benign_n"] = float(len(benign))
    return out


def replay_for(spec: AttackSweepStage, seed: int):
    """The guarded arms' safety replay (None when the spec has none), seeded like the cell's training."""
    return None if spec.safety_replay is None else spec.safety_replay.build(seed)


def _attack(base, tokenizer, spec: AttackSweepStage, cell: dict, vectors: list) -> dict[str, float]:
    """One arm: fine-tune a copy of the base on the attack data, score it with the vectors off. The plain arm
    (no vectors) never replays: it measures the attack's strength."""
    from secvec_core import TaskAdapterConfig, TrainingConfig, guarded_finetune
    from workflows.datasets import load_examples

    training = TrainingConfig(
        **{**spec.training.model_dump(), "learning_rate": cell["learning_rate"], "max_steps": cell["max_steps"]}
    )
    adapter = TaskAdapterConfig(rank=cell["rank"], alpha=cell["alpha"]) if cell["mode"] == "lora" else None
    result = guarded_finetune(
        copy.deepcopy(base),
        tokenizer,
        load_examples(spec.data),
        vectors,
        mode=cell["mode"],
        training=training,
        task_adapter=adapter,
        safety_replay=replay_for(spec, training.seed) if vectors else None,
        vector_routing=spec.vector_routing.build() if vectors and spec.vector_routing is not None else None,
    )
    with result.vectors_on(False) as shipped:
        scores = _scores(shipped, tokenizer, spec)
    routed = {} if result.vector_routing is None else {"rows_vectors_off": result.vector_routing["rows_vectors_off"]}
    return {**scores, **routed, "final_loss": result.history.final_loss}


def run_cell(
    config: dict, cell: dict, hashes: tuple[str, str], plain: dict | None, parent_run_id: str, threads: int
) -> dict:
    """Ray task: one cell, plain then guarded, logged as a child run of the sweep. ``plain`` holds the plain
    arm's metrics when another run already measured them."""
    from workflows.models import load_vector
    from workflows.tracking import StageRun

    ctx = StageContext(**config)
    spec = ctx.spec()
    started = time.time()
    base, tokenizer, scratch = _setup(ctx, threads)
    cache = str(scratch.path)
    run = StageRun(
        ctx.tracking_uri,
        ctx.experiment_id,
        f"{ctx.pipeline}/{spec.name}/{cell_label(cell)}",
        parent_run_id,
        {
            "secvec.stage": spec.name,
            "secvec.stage_kind": CELL_KIND,
            "secvec.pipeline": ctx.pipeline,
            "secvec.cell_hash": hashes[0],
            "secvec.plain_hash": hashes[1],
        },
    )
    try:
        replay = replay_for(spec, spec.training.seed)
        run.log_params(
            {
                "cell": cell,
                "vectors": ctx.vector_refs,
                "base_model": ctx.base_source,
                **({f"safety_replay.{k}": v for k, v in replay.describe().items()} if replay else {}),
                **({"vector_routing.min_gain": spec.vector_routing.min_gain} if spec.vector_routing else {}),
            }
        )
        reused_plain = plain is not None
        if plain is None:
            plain = _attack(base, tokenizer, spec, cell, [])
        vectors = [load_vector(ref, ctx.tracking_uri, cache) for ref in ctx.vector_refs]
        guarded = _attack(base, tokenizer, spec, cell, vectors)
        record = {
            **cell,
            "label": cell_label(cell),
            "run_id": run.run_id,
            "plain_reused": reused_plain,
            **{f"plain_{k}": v for k, v in plain.items()},
            **{f"guarded_{k}": v for k, v in guarded.items()},
            "seconds": time.time() - started,
        }
        run.log_metrics(
            {
                **{f"plain.{k}": v for k, v in plain.items()},
                **{f"guarded.{k}": v for k, v in guarded.items()},
                "seconds": record["seconds"],
            }
        )
        run.set_tags({"secvec.cell": json.dumps(record)})
        run.finish()
    except BaseException:
        run.finish("FAILED", budget_s=5.0)
        raise
    finally:
        scratch.remove()
    return record


def run_baseline(config: dict, threads: int) -> dict:
    """Ray task: the base model before any attack (the reference point of the summary)."""
    ctx = StageContext(**config)
    base, tokenizer, scratch = _setup(ctx, threads)
    try:
        return _scores(base, tokenizer, ctx.spec())
    finally:
        scratch.remove()


# -- in the driver -----------------------------------------------------------------------------------------


def _finished_cell(client, tracking_uri: str, experiment_id: str, tag: str, digest: str) -> dict | None:
    from workflows.tracking import with_retries

    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`{tag}` = '{digest}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        ),
        "search finished cells",
        tracking_uri,
    )
    return json.loads(runs[0].data.tags["secvec.cell"]) if runs and "secvec.cell" in runs[0].data.tags else None


def summarize(cells: list[dict], baseline: dict) -> dict[str, float | str]:
    """Worst guarded cell (highest guarded harmful rate; among equals, the strongest plain attack), the plain rate
    in that cell, the strongest plain attack, and the highest over-refusal of a guarded model."""
    worst = max(cells, key=lambda c: (c["guarded_harmful_rate"], c["plain_harmful_rate"]))
    summary: dict = {
        "worst_guarded_harmful_rate": worst["guarded_harmful_rate"],
        "worst_cell_plain_harmful_rate": worst["plain_harmful_rate"],
        "max_plain_harmful_rate": max(c["plain_harmful_rate"] for c in cells),
        "cells": float(len(cells)),
        "base_harmful_rate": baseline["harmful_rate"],
    }
    if "guarded_benign_refusal_rate" in worst:
        summary["max_guarded_benign_refusal_rate"] = max(c["guarded_benign_refusal_rate"] for c in cells)
        summary["max_plain_benign_refusal_rate"] = max(c["plain_benign_refusal_rate"] for c in cells)
        summary["base_benign_refusal_rate"] = baseline["benign_refusal_rate"]
    return {**summary, "worst_cell": worst["label"], "worst_cell_run_id": worst["run_id"]}


def sweep_tags(ctx: StageContext, spec: AttackSweepStage) -> dict[str, str]:
    """What guarded the guarded arms, for the report: the vectors, and the safety replay and routing if any."""
    replay = "none" if spec.safety_replay is None else spec.safety_replay.label()
    routing = "none" if spec.vector_routing is None else spec.vector_routing.label()
    return {
        "secvec.redteam.vectors": json.dumps(ctx.vector_refs),
        "secvec.redteam.safety_replay": replay,
        "secvec.redteam.vector_routing": routing,
    }


def run_attack_sweep(ctx: StageContext, scaling: ScalingSpec) -> dict:
    """Run (or reuse) every cell as a Ray task, log the summary and heatmap on the sweep's run, apply the vector
    gate. Returns the stage output record (small: the per-cell table is the ``redteam/summary.json`` artifact)."""
    import ray
    from mlflow import MlflowClient

    from workflows.gates import apply_vector_gate, vector_gate_decision
    from workflows.report import write_heatmap
    from workflows.tracking import StageRun

    spec: AttackSweepStage = ctx.spec()
    run = StageRun(
        ctx.tracking_uri,
        ctx.experiment_id,
        f"{ctx.pipeline}/{spec.name}",
        ctx.parent_run_id,
        {
            "secvec.stage": spec.name,
            "secvec.stage_kind": spec.kind,
            "secvec.stage_hash": ctx.stage_hash,
            "secvec.pipeline": ctx.pipeline,
            **sweep_tags(ctx, spec),
        },
        existing_run_id=ctx.run_id,  # the run the driver created to claim this stage (workflows.claims)
    )
    try:
        if ctx.run_id:  # the claimed run was created by the driver with the stage tags only
            run.set_tags(sweep_tags(ctx, spec))
        run.log_params({"stage": ctx.stage, "base_model": ctx.base_source, "vectors": ctx.vector_refs})
        client = MlflowClient(ctx.tracking_uri)
        resources = dict(scaling.resources_per_worker)
        cpus = resources.pop("CPU", 1.0)
        gpus = resources.pop("GPU", 1.0 if scaling.use_gpu else 0.0)
        options = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "max_retries": scaling.max_failures,
            "resources": resources or None,
        }
        config, threads = asdict(ctx), max(1, int(cpus))
        cell_task = ray.remote(run_cell).options(**options)
        pending, records = [], {}
        for i, cell in enumerate(grid_cells(spec.grid)):
            hashes = cell_hashes(ctx, spec, cell)
            done = _finished_cell(client, ctx.tracking_uri, ctx.experiment_id, "secvec.cell_hash", hashes[0])
            if done is not None:
                records[i] = {**done, "reused": True}
                continue
            plain = _finished_cell(client, ctx.tracking_uri, ctx.experiment_id, "secvec.plain_hash", hashes[1])
            plain_metrics = (
                None if plain is None else {k: plain[f"plain_{k}"] for k in ARM_METRICS if f"plain_{k}" in plain}
            )
            pending.append((i, cell_task.remote(config, cell, hashes, plain_metrics, run.run_id, threads)))
        baseline = ray.get(ray.remote(run_baseline).options(**options).remote(config, threads))
        for i, ref in pending:
            records[i] = {**ray.get(ref), "reused": False}
        cells = [records[i] for i in sorted(records)]
        summary = summarize(cells, baseline)
        metrics = {k: v for k, v in summary.items() if isinstance(v, float | int)}
        passed, reason = vector_gate_decision(metrics, spec.gate)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / ARTIFACT_DIR
            folder.mkdir()
            (folder / "summary.json").write_text(
                json.dumps(
                    {
                        "summary": summary,
                        "baseline": baseline,
                        "cells": cells,
                        "gate": spec.gate.model_dump(),
                        "passed": passed,
                        "reason": reason,
                        "vectors": ctx.vector_refs,
                    },
                    indent=2,
                )
                + "\n"
            )
            write_heatmap(cells, folder / "heatmap.png", title=f"{ctx.pipeline}/{spec.name}: harmful rate after attack")
            artifact_root = run.log_artifacts(folder, ARTIFACT_DIR)
        run.log_metrics(metrics)
        run.set_tags(
            {
                "secvec.redteam.cell_runs": json.dumps([c["run_id"] for c in cells]),
                "secvec.redteam.worst_cell": summary["worst_cell"],
                "secvec.gate": "passed" if passed else "held",
                "secvec.gate.reason": reason,
            }
        )
        promoted, gated = apply_vector_gate(
            ctx.tracking_uri, ctx.vector_refs, run.run_id, summary, passed, reason, promote=spec.promote
        )
        output = {
            "uri": f"{artifact_root}/summary.json",
            "run_id": run.run_id,
            "reusable": True,
            "metrics": metrics,
            "worst_cell": summary["worst_cell"],
            "passed": passed,
            "reason": reason,
            "vectors": ctx.vector_refs,
            "gated": gated,
            "promoted": promoted,
            "reused_cells": sum(c["reused"] for c in cells),
        }
        run.set_tags({"secvec.output": json.dumps(output), "secvec.output_uri": output["uri"]})
        run.finish()
    except BaseException:
        try:
            run.finish("FAILED", budget_s=5.0)
        except Exception:  # the original error matters more
            logger.exception("could not mark the sweep run as failed")
        raise
    return output
