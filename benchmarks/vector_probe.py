"""What a trained vector does to the loss of each kind of answer: a RESULTS section from a pipeline's own stages.

    python benchmarks/vector_probe.py benchmarks/specs/hallucination-anchor-smollm2.yaml \\
        --vector hallucination-vector-anchor --vector hallucination-vector-contrast-w4 \\
        --set "new facts (the customer's task)=builtin:fictional-facts" --set "true capitals=stage:capitals-true/vector"

Why: a vector guards the rows whose loss it lowers (those bring the shipped weights little gradient). Whether a
vector lowers the loss of the data it should guard, and *not* of the data a customer must still be able to
teach, is the mechanism behind every guarded run's numbers; this measures it directly. For each vector stage of
the spec (run first with ``benchmarks/red_team.py``; its registered vector and base model are read from MLflow),
and each named set of rows, the mean response loss (nats per token) with the vector off and on, and the median of
the per-row drop. Sets: ``builtin:NAME``, ``stage:NAME[/SPLIT]`` (a data_preparation stage's output) or
``path:FILE.jsonl``. No training, CPU minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, RESULTS_MD, provenance, provenance_markdown, write_section  # noqa: E402


def _stage_output(client, experiment_id: str, stage: str) -> dict:
    runs = client.search_runs(
        [experiment_id],
        f"tags.`secvec.stage` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"vector_probe: no finished stage {stage!r} in MLflow; run the spec first")
    return json.loads(runs[0].data.tags["secvec.output"])


def _rows(ref: str, client, experiment_id: str, tracking_uri: str) -> list:
    """The rows of one ``--set``, read the way pipeline stages read them (``workflows.datasets.load_examples``)."""
    from pydantic import ValidationError

    from workflows.datasets import load_examples, stage_file_key, use_stage_outputs
    from workflows.specs import DatasetRef

    kind, _, name = ref.partition(":")
    fields = {"builtin": {"builtin": name}, "path": {"path": name}}
    if kind == "stage":
        stage, _, split = name.partition("/")
        files = _stage_output(client, experiment_id, stage)["files"]
        split = split or (next(iter(files)) if len(files) == 1 else "")
        if split not in files:
            raise SystemExit(f"vector_probe: stage {stage!r} has splits {sorted(files)}; name one as {stage}/SPLIT")
        use_stage_outputs({stage_file_key(stage, split): files[split]}, tracking_uri)
        fields["stage"] = {"stage": stage, "split": split}
    if kind not in fields:
        raise SystemExit(f"vector_probe: a set is builtin:NAME, stage:NAME[/SPLIT] or path:FILE, got {ref!r}")
    try:
        return load_examples(DatasetRef(**fields[kind]))
    except ValidationError as err:
        raise SystemExit(f"vector_probe: set {ref!r}: {err.errors()[0]['msg']}") from None
    except (ValueError, OSError) as err:
        raise SystemExit(f"vector_probe: set {ref!r}: {err}") from None


def probe(spec_path: str, vectors: list[str], sets: list[tuple[str, str]]) -> list[dict]:
    import mlflow
    import torch
    from mlflow import MlflowClient

    from secvec_core import SecurityVector
    from secvec_core.adapters import activate
    from secvec_core.data import pad_token_id, tokenize_examples
    from secvec_core.routing import row_losses
    from workflows.models import load_base_model
    from workflows.pipeline import absolute_tracking_uri
    from workflows.specs import load_spec

    spec = load_spec(spec_path)
    uri = absolute_tracking_uri(spec.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(spec.tracking.experiment).experiment_id
    stages = {s.name: s for s in spec.stages}
    examples = {label: _rows(ref, client, experiment_id, uri) for label, ref in sets}
    bases: dict[str, tuple] = {}  # source -> (model, tokenizer, {label: (rows, losses off)}): vectors share a base
    out = []
    for vector_stage in vectors:
        stage = stages.get(vector_stage)
        if stage is None or stage.kind != "vector_training":
            raise SystemExit(f"vector_probe: {vector_stage!r} is not a vector_training stage of {spec.name}")
        base = stage.base_model or spec.base_model
        source = _stage_output(client, experiment_id, base.stage)["uri"] if base.stage else base.source
        if source not in bases:
            model, tokenizer = load_base_model(source, uri)
            model.eval()
            pad = pad_token_id(tokenizer)
            measured = {}
            for label, rows in examples.items():
                tokenized = tokenize_examples(tokenizer, rows, 128, "truncate")
                measured[label] = (tokenized, torch.tensor(row_losses(model, tokenized, pad, 8, f"base: {label}")))
            bases[source] = (model, tokenizer, measured)
        model, tokenizer, measured = bases[source]
        pad = pad_token_id(tokenizer)
        vector = SecurityVector.load(
            mlflow.artifacts.download_artifacts(_stage_output(client, experiment_id, vector_stage)["uri"])
        )
        with_vector = vector.attach(copy.deepcopy(model))
        activate(with_vector, [vector.name])
        with_vector.eval()
        for label, (rows, off) in measured.items():
            on = torch.tensor(row_losses(with_vector, rows, pad, 8, f"{vector_stage}: {label}"))
            out.append(
                {
                    "vector": vector_stage,
                    "set": label,
                    "rows": len(rows),
                    "off": float(off.mean()),
                    "on": float(on.mean()),
                    "median_drop": float((off - on).median()),
                }
            )
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--vector", action="append", required=True, help="a vector_training stage of the spec")
    parser.add_argument("--set", action="append", required=True, help="LABEL=builtin:NAME|stage:NAME[/SPLIT]|path:F")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv[1:])
    sets = []
    for item in args.set:
        label, sep, ref = item.partition("=")
        if not sep or not label or not ref:
            parser.error(f"--set wants LABEL=REF, got {item!r}")
        sets.append((label, ref))
    info = provenance(argv, seed=0)
    started = time.time()
    rows = probe(args.spec, args.vector, sets)
    name = Path(args.spec).stem
    table = [
        "| vector | rows | loss, vector off | loss, vector on | median drop per row |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| `{r['vector']}` / {r['set']} | {r['rows']} | {r['off']:.2f} | {r['on']:.2f} | {r['median_drop']:+.2f} |"
        for r in rows
    ]
    section = "\n".join(
        [
            f"## What each vector does to each kind of answer: `{name}`",
            "",
            provenance_markdown(info, time.time() - started),
            "- Loss: mean response cross-entropy per row, nats per token, on the aligned base with the vector off and "
            "on (no training; `benchmarks/vector_probe.py`). A drop means the vector explains those rows: in a "
            "guarded fine-tune they bring the shipped weights little gradient.",
            "",
            *table,
        ]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"probe-{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    results_md = RESULTS_MD if args.out_dir == RESULTS_DIR else args.out_dir.parent / "RESULTS.md"
    write_section(args.out_dir, f"probe-{name}.md", section, results_md)
    print(section)


if __name__ == "__main__":
    main(sys.argv)
