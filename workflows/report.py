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
        rows.append({"stage": stage.name, "candidate": stage.output.get("candidate", ""),
                     "base_harmful_rate": m.get("base_harmful_rate"), "harmful_rate": m.get("harmful_rate"),
                     "task_accuracy": m.get("task_accuracy"), "transfer_gap": m.get("transfer_gap"),
                     "benign_refusal_rate": m.get("benign_refusal_rate"),
                     "gate": "passed" if stage.output.get("passed") else "held",
                     "reason": stage.output.get("reason", "")})
    return rows


def write_chart(rows: list[dict], path: str | Path) -> Path:
    """Bar chart: harmful rate before fine-tuning and after each candidate, and task accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = ["before fine-tuning"] + [r["stage"] for r in rows]
    harmful = [rows[0]["base_harmful_rate"] if rows else 0.0] + [r["harmful_rate"] for r in rows]
    accuracy = [None] + [r["task_accuracy"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [h or 0 for h in harmful], width=0.4, label="harmful rate (vector off)",
           color="#c0392b")
    ax.bar([x + 0.2 for x in xs], [a or 0 for a in accuracy], width=0.4, label="task accuracy (vector off)",
           color="#2980b9")
    for x, h, a in zip(xs, harmful, accuracy, strict=True):
        ax.text(x - 0.2, (h or 0) + 0.02, f"{h:.2f}" if h is not None else "", ha="center", fontsize=8)
        ax.text(x + 0.2, (a or 0) + 0.02, f"{a:.2f}" if a is not None else "", ha="center", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("rate")
    ax.set_title("secvec: harmful rate and task accuracy")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
