"""Summaries of a pipeline run: the results table and a PNG chart."""

from __future__ import annotations

from pathlib import Path

from workflows.pipeline import PipelineResult


def evaluation_rows(result: PipelineResult) -> list[dict]:
    rows = []
    for stage in result.stages.values():
        if stage.kind != "evaluation":
            continue
        m = stage.output.get("metrics", {})
        rows.append(
            {
                "stage": stage.name,
                "candidate": stage.output.get("candidate", ""),
                "base_harmful_rate": m.get("base_harmful_rate"),
                "harmful_rate": m.get("harmful_rate"),
                "task_accuracy": m.get("task_accuracy"),
                "transfer_gap": m.get("transfer_gap"),
                "benign_refusal_rate": m.get("benign_refusal_rate"),
                "gate": "passed" if stage.output.get("passed") else "held",
                "reason": stage.output.get("reason", ""),
            }
        )
    return rows


def base_harmful_rate(rows: list[dict]) -> float | None:
    """The 'before fine-tuning' rate: from the first evaluation that scored the base (``score_base``)."""
    return next((r["base_harmful_rate"] for r in rows if r.get("base_harmful_rate") is not None), None)


def write_chart(rows: list[dict], path: str | Path) -> Path:
    """Bar chart: harmful rate before fine-tuning and after each candidate, and task accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = ["before fine-tuning"] + [r["stage"] for r in rows]
    harmful = [base_harmful_rate(rows)] + [r["harmful_rate"] for r in rows]
    accuracy = [None] + [r["task_accuracy"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(labels)), 4.4))  # room for long stage names, tilted
    xs = range(len(labels))
    ax.bar(
        [x - 0.2 for x in xs], [h or 0 for h in harmful], width=0.4, label="harmful rate (vector off)", color="#c0392b"
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [a or 0 for a in accuracy],
        width=0.4,
        label="task accuracy (vector off)",
        color="#2980b9",
    )
    for x, h, a in zip(xs, harmful, accuracy, strict=True):
        ax.text(x - 0.2, (h or 0) + 0.02, f"{h:.2f}" if h is not None else "", ha="center", fontsize=8)
        ax.text(x + 0.2, (a or 0) + 0.02, f"{a:.2f}" if a is not None else "", ha="center", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("rate")
    ax.set_title("secvec: harmful rate and task accuracy")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_heatmap(cells: list[dict], path: str | Path, title: str = "harmful rate after attack") -> Path:
    """Heatmaps of an attack sweep: one column per attack kind (LoRA rank / full weights), rows plain and guarded,
    learning rate across and steps down; each square shows the harmful rate (vectors off). The worst guarded
    cell is outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from workflows.redteam import attack_label

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = list(dict.fromkeys(attack_label(c) for c in cells))
    rates = sorted({c["learning_rate"] for c in cells})
    steps = sorted({c["max_steps"] for c in cells})
    worst = max(cells, key=lambda c: (c["guarded_harmful_rate"], c["plain_harmful_rate"]))
    fig, axes = plt.subplots(
        2,
        len(kinds),
        figsize=(1.5 + max(2.4, 0.9 * len(rates)) * len(kinds), 1.8 + 1.3 * len(steps)),
        squeeze=False,
        layout="constrained",  # the guarded row's titles clear the plain row's tick labels
    )
    image = None
    for col, kind in enumerate(kinds):
        for row, arm in enumerate(("plain", "guarded")):
            ax = axes[row][col]
            grid = [[float("nan")] * len(rates) for _ in steps]
            for c in cells:
                if attack_label(c) == kind:
                    grid[steps.index(c["max_steps"])][rates.index(c["learning_rate"])] = c[f"{arm}_harmful_rate"]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="Reds", aspect="auto")
            for y, line in enumerate(grid):
                for x, value in enumerate(line):
                    if value == value:  # not NaN
                        ax.text(
                            x,
                            y,
                            f"{value:.2f}",
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if value > 0.6 else "black",
                        )
            if arm == "guarded" and attack_label(worst) == kind:
                x, y = rates.index(worst["learning_rate"]), steps.index(worst["max_steps"])
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#2c3e50", linewidth=2.5))
            ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates], fontsize=7)
            ax.set_yticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
            ax.set_title(f"{kind}, {arm}", fontsize=8)
            if row == 1:
                ax.set_xlabel("learning rate", fontsize=7)
            if col == 0:
                ax.set_ylabel("steps", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="harmful rate (vectors off)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- reports from MLflow alone (`secvec report`) -------------------------------------------------------------

STAGE_KINDS = ("alignment", "data_preparation", "vector_training", "guarded_finetune", "attack_sweep", "evaluation")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rate(rate: float | None, n: float | None) -> str:
    """``0.85 [0.71, 0.93]``: the rate with its 95% Wilson interval when the number of prompts is known
    (cells measured before the counts were recorded show the rate alone)."""
    if rate is None or not n:
        return _fmt(rate)
    from secvec_core.evaluation import wilson_interval

    low, high = wilson_interval(round(rate * n), int(n))
    return f"{rate:.2f} [{low:.2f}, {high:.2f}]"


def _latest_stage_runs(client, pipeline: str) -> list:
    """The latest finished run of each stage of ``pipeline`` (reused stages ran under an earlier pipeline run)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        f"tags.`secvec.pipeline` = '{pipeline}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    latest: dict[str, object] = {}
    for run in runs:
        kind = run.data.tags.get("secvec.stage_kind")
        if kind in STAGE_KINDS and run.data.tags.get("secvec.stage") not in latest:
            latest[run.data.tags["secvec.stage"]] = run
    return sorted(latest.values(), key=lambda r: r.info.start_time)


def sweep_cells(client, run) -> list[dict]:
    """The cells of an attack_sweep run, read back from their own runs (``secvec.cell`` tags)."""
    import json

    ids = json.loads(run.data.tags.get("secvec.redteam.cell_runs", "[]"))
    return [json.loads(client.get_run(i).data.tags["secvec.cell"]) for i in ids]


def _stage_summary(run) -> str:
    import json

    tags, m = run.data.tags, run.data.metrics
    kind = tags["secvec.stage_kind"]
    output = json.loads(tags.get("secvec.output", "{}") or "{}")
    if kind == "evaluation":
        text = (
            f"harmful {_fmt(m.get('harmful_rate'))} (before {_fmt(m.get('base_harmful_rate'))}), task acc "
            f"{_fmt(m.get('task_accuracy'))}, gap {_fmt(m.get('transfer_gap'))}, benign refused "
            f"{_fmt(m.get('benign_refusal_rate'))}"
        )
        if "passed" in output and not output.get("monitor"):
            text += f"; gate {'passed' if output['passed'] else 'held'}: {output.get('reason', '')}"
        return text
    if kind == "attack_sweep":
        text = (
            f"worst guarded cell: {tags.get('secvec.redteam.worst_cell', '?')}, guarded "
            f"{_fmt(m.get('worst_guarded_harmful_rate'))} vs plain {_fmt(m.get('worst_cell_plain_harmful_rate'))}; "
            f"strongest plain attack {_fmt(m.get('max_plain_harmful_rate'))}; guarded benign refused <= "
            f"{_fmt(m.get('max_guarded_benign_refusal_rate'))}"
        )
        return text + f"; gate {tags.get('secvec.gate', '?')}: {tags.get('secvec.gate.reason', '')}"
    if kind == "data_preparation":
        counts = ", ".join(
            f"{k.removeprefix('examples.')} {int(v)}" for k, v in sorted(m.items()) if k.startswith("examples.")
        )
        return f"{counts} examples (seed {tags.get('secvec.data.seed', '?')})"
    loss = m.get("vector.final_loss", m.get("loss"))
    text = f"{tags.get('secvec.output_uri', '')}" + (f", final loss {loss:.3f}" if loss is not None else "")
    if "vector_routing.rows_vectors_off" in m:
        text += f", {int(m['vector_routing.rows_vectors_off'])} of {int(m['vector_routing.rows'])} rows vectors off"
    return text


def cells_table(cells: list[dict], counts: dict[str, float] | None = None) -> list[str]:
    """Markdown rows of a sweep: one line per cell, the worst guarded one marked. ``counts`` (``harmful_n``,
    ``benign_n``) stands in for the prompt counts of cells measured before cells recorded them."""
    counts = counts or {}
    worst = max(cells, key=lambda c: (c["guarded_harmful_rate"], c["plain_harmful_rate"]))
    lines = [
        "| cell | plain harmful | guarded harmful | guarded degenerate | plain benign refused "
        "| guarded benign refused | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        mark = " **(worst)**" if c is worst else ""
        n = {
            f"{arm}_{k}": c.get(f"{arm}_{k}", counts.get(k))
            for arm in ("plain", "guarded")
            for k in ("harmful_n", "benign_n")
        }
        harmful = {arm: _rate(c.get(f"{arm}_harmful_rate"), n[f"{arm}_harmful_n"]) for arm in ("plain", "guarded")}
        refused = {
            arm: _rate(c.get(f"{arm}_benign_refusal_rate"), n[f"{arm}_benign_n"]) for arm in ("plain", "guarded")
        }
        lines.append(
            f"| {c['label']}{mark} | {harmful['plain']} | {harmful['guarded']} | "
            f"{_rate(c.get('guarded_degenerate_rate'), n['guarded_harmful_n'])} | {refused['plain']} | "
            f"{refused['guarded']} | `{c['run_id'][:8]}` |"
        )
    return lines


def evaluations_table(runs: list, guard_of=lambda run: run.data.tags.get("secvec.eval.guard", "?")) -> list[str]:
    """Markdown rows of every evaluation stage with 95% Wilson intervals (counts logged as ``*_n``): the
    candidate's base (from the evaluation that scored it), then each candidate with the vectors off.
    ``guard_of(run)``: how the candidate was trained (default: the label the evaluation logged)."""
    m0 = next((r.data.metrics for r in runs if "base_harmful_rate" in r.data.metrics), None)
    unwanted = any("unwanted_learned" in r.data.metrics for r in runs)  # a column only where it was measured
    lines = [
        "### Evaluations (vectors off, as shipped)",
        "",
        "| evaluation | trained | harmful | degenerate | benign refused | retained QA | task acc. | gap |"
        + (" unwanted learned |" if unwanted else "")
        + " run |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if unwanted else "") + "---|",
    ]

    def row(label, trained, m, prefix, run_id):
        def r(key, n):
            return _rate(m.get(prefix + key), m.get(n))

        gap = m.get("transfer_gap") if not prefix else None
        lines.append(
            f"| {label} | {trained} | {r('harmful_rate', 'harmful_n')} | {r('degenerate_rate', 'harmful_n')} | "
            f"{r('benign_refusal_rate', 'benign_n')} | {r('retained_qa', 'retained_qa_n')} | "
            f"{r('task_accuracy', 'task_n')} | {'-' if gap is None else f'{gap:+.2f}'} | "
            + (f"{r('unwanted_learned', 'unwanted_n')} | " if unwanted else "")
            + f"{run_id} |"
        )

    if m0 is not None:
        row("base (before fine-tuning)", "-", m0, "base_", "-")
    for run in runs:
        tags = run.data.tags
        row(tags["secvec.stage"], guard_of(run), run.data.metrics, "", f"`{run.info.run_id[:8]}`")
    return lines


def pipeline_report(
    tracking_uri: str, pipeline: str, out_dir: str | Path, counts: dict[str, float] | None = None
) -> Path:
    """``report.md`` (a table of every stage's latest finished run, then each sweep's cells) and PNG plots (the
    evaluation chart, one heatmap per sweep) in ``out_dir``, read from MLflow runs alone."""
    from mlflow import MlflowClient

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    runs = _latest_stage_runs(client, pipeline)
    if not runs:
        raise ValueError(
            f"no finished runs of pipeline {pipeline!r} at {tracking_uri}; check the name "
            "(tag secvec.pipeline) and the tracking URI"
        )
    lines = [
        f"# secvec report: pipeline `{pipeline}`",
        "",
        f"From MLflow at `{tracking_uri}`: the latest finished "
        "run of each stage. Rates are fractions of prompts, scored with the vectors off (as shipped).",
        "",
        "| stage | kind | result | run |",
        "|---|---|---|---|",
    ]
    for run in runs:
        tags = run.data.tags
        lines.append(
            f"| {tags['secvec.stage']} | {tags['secvec.stage_kind']} | {_stage_summary(run)} | "
            f"`{run.info.run_id[:8]}` |"
        )
    evaluated = [r for r in runs if r.data.tags["secvec.stage_kind"] == "evaluation"]
    if evaluated:
        lines += ["", *evaluations_table(evaluated, lambda run: _candidate_guard(client, run))]
    evaluations = [
        {
            "stage": r.data.tags["secvec.stage"],
            **{k: r.data.metrics.get(k) for k in ("base_harmful_rate", "harmful_rate", "task_accuracy")},
        }
        for r in runs
        if r.data.tags["secvec.stage_kind"] == "evaluation"
    ]
    if evaluations:
        write_chart(evaluations, out_dir / "evaluations.png")
        lines += ["", "![evaluations](evaluations.png)"]
    for run in runs:
        if run.data.tags["secvec.stage_kind"] == "attack_sweep":
            lines += ["", *sweep_section(client, run, out_dir, counts)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _candidate_guard(client, run) -> str:
    """The training of the evaluated version, from the version's own tags (so a report written later uses today's
    wording, e.g. replay without a vector); the label the evaluation logged when the version is gone."""
    from mlflow.exceptions import MlflowException

    from workflows.evaluate import guard_label
    from workflows.specs import REGISTRY_URI

    logged = run.data.tags.get("secvec.eval.guard", "?")
    match = REGISTRY_URI.match(run.data.tags.get("secvec.candidate", ""))
    if not match or not match["version"]:
        return logged
    try:
        return guard_label(client.get_model_version(match["name"], match["version"]).tags)
    except MlflowException:  # a deleted version: the logged label still holds
        return logged


def sweep_section(client, run, out_dir: Path, counts: dict[str, float] | None = None) -> list[str]:
    stage = run.data.tags["secvec.stage"]
    cells = sweep_cells(client, run)
    heatmap = write_heatmap(cells, out_dir / f"{stage}-heatmap.png", title=f"{stage}: harmful rate after attack")
    replay = run.data.tags.get("secvec.redteam.safety_replay", "none")
    routing = run.data.tags.get("secvec.redteam.vector_routing", "none")
    guards = (
        run.data.tags.get("secvec.redteam.vectors", "?")
        + ("" if replay == "none" else f" + safety replay ({replay}) in every guarded arm")
        + ("" if routing == "none" else f" + vector routing ({routing})")
    )
    return [
        f"## Red team `{stage}`",
        "",
        f"Vectors: {guards}; gate "
        f"**{run.data.tags.get('secvec.gate', '?')}**: {run.data.tags.get('secvec.gate.reason', '')}",
        "",
        *cells_table(cells, counts),
        "",
        f"![{stage}]({heatmap.name})",
    ]


def sweep_report(tracking_uri: str, run_id: str, out_dir: str | Path) -> Path:
    """``report.md`` and heatmap of one attack_sweep run (by run id)."""
    from mlflow import MlflowClient

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if run.data.tags.get("secvec.stage_kind") != "attack_sweep":
        raise ValueError(f"run {run_id} is not an attack_sweep stage run")
    path = out_dir / "report.md"
    path.write_text("\n".join(sweep_section(client, run, out_dir)) + "\n", encoding="utf-8")
    return path
