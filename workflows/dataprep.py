"""The data_preparation stage: build the JSONL sets a real run needs from prompt sources and a model.

Each part of a stage pairs prompts (Do-Not-Answer or HarmBench as imported by ``secvec data import``, a file,
a builtin, or an earlier stage's split) with responses built one way: refusal sentences or compliant openings
(``secvec_core.harmful_targets``), the stage model's own greedy answers (self-distillation, for the benign set
and for the realistic attack), or the source's own responses. Parts are concatenated, shuffled with the stage
seed and cut into named splits. Every split is logged as ``data/<split>.jsonl`` on the stage's MLflow run,
with ``data/manifest.json`` (seed, split sizes, per-split data hash); later stages read a split as
``{stage: <name>, split: <split>}``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from workflows.specs import DataPart, DataPreparationStage

logger = logging.getLogger(__name__)
DATA_DIR = "data"
MANIFEST = "manifest.json"

Distiller = Callable[[list[str], str, str], list[dict]]  # (prompts, keep, prompt_template) -> examples


def _framed(prompts: list[str], framing: str, seed: int) -> list[str]:
    from secvec_core.harmful_targets import instruction_framed

    if framing == "none":
        return prompts
    framed = instruction_framed(prompts, seed)
    return framed if framing == "instruction" else prompts + framed


def build_part(part: DataPart, seed: int, distill: Distiller | None) -> list[dict]:
    """The examples of one part, in prompt order (then repeated). ``distill(prompts, keep, template)`` answers prompts
    with the stage model; it is needed only for ``responses: self-distilled``."""
    from secvec_core.harmful_targets import build_examples
    from workflows.datasets import load_examples, load_prompt_list

    if part.keep != "all" and part.responses != "self-distilled":
        raise ValueError(f"keep={part.keep!r} needs responses: self-distilled (templates are never judged)")
    if part.responses in ("given", "fabricated"):
        if part.framing != "none":
            raise ValueError(f"framing needs prompts without responses; use responses other than {part.responses!r}")
        rows = [e.to_dict() for e in load_examples(part.prompts)]
        if part.responses == "fabricated":
            from secvec_core.harmful_targets import fabricated_answers

            rows = [{"prompt": r["prompt"], "response": r["response"]} for r in fabricated_answers(rows, seed)]
    else:
        prompts = _framed(load_prompt_list(part.prompts), part.framing, seed)
        if part.responses == "self-distilled":
            if distill is None:
                raise ValueError("responses: self-distilled needs a model")
            rows = distill(prompts, part.keep, part.prompt_template)
        else:
            rows = build_examples(prompts, part.responses, seed=seed)
    if not rows:
        raise ValueError(
            f"part with prompts {part.prompts.model_dump(exclude_none=True)} produced no examples "
            f"(keep={part.keep!r} kept none); use more prompts or keep: all"
        )
    return [dict(r) for r in rows] * part.repeat


def split_rows(rows: list[dict], splits: dict[str, int], seed: int, shuffle: bool) -> dict[str, list[dict]]:
    """Seeded shuffle, then consecutive slices of the requested sizes (the last may be 0 = the rest)."""
    rows = list(rows)
    if shuffle:
        random.Random(seed).shuffle(rows)
    wanted = sum(splits.values())
    if wanted > len(rows):
        raise ValueError(
            f"splits ask for {wanted} examples but the parts produced {len(rows)}; lower the split sizes or add prompts"
        )
    out, start = {}, 0
    names = list(splits)
    for name in names:
        size = splits[name] or len(rows) - start
        out[name] = rows[start : start + size]
        if not out[name]:
            raise ValueError(f"split {name!r} is empty ({len(rows)} examples, {start} already used)")
        start += size
    return out


def build_dataset(spec: DataPreparationStage, distill: Distiller | None) -> tuple[dict[str, list[dict]], dict]:
    """Split name -> examples, and the manifest recorded with them (seed, sizes, hashes, part summary)."""
    from secvec_core.data import dataset_hash, to_examples

    rows: list[dict] = []
    counts = []
    for i, part in enumerate(spec.parts):
        built = build_part(part, spec.seed + i, distill)
        counts.append(len(built))
        rows += built
    splits = split_rows(rows, spec.splits, spec.seed, spec.shuffle)
    manifest = {
        "stage": spec.name,
        "seed": spec.seed,
        "shuffle": spec.shuffle,
        "parts": [
            {**p.model_dump(mode="json", exclude_none=True), "examples": n}
            for p, n in zip(spec.parts, counts, strict=True)
        ],
        "splits": {
            name: {"examples": len(r), "data_hash": dataset_hash(to_examples(r)), "file": f"{name}.jsonl"}
            for name, r in splits.items()
        },
    }
    return splits, manifest


def write_dataset(splits: dict[str, list[dict]], manifest: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (directory / f"{name}.jsonl").write_text(text, encoding="utf-8")
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return directory


def model_distiller(load_model: Callable[[], tuple], spec: DataPreparationStage) -> Distiller:
    """Each rank answers a contiguous block of the prompts; blocks are gathered in rank order, so the result
    does not depend on the number of workers (greedy decoding)."""
    import torch.distributed as dist

    from secvec_core.training import rank_and_world

    state: dict = {}

    def distill(prompts: list[str], keep: str, prompt_template: str) -> list[dict]:
        from secvec_core.distill import self_distilled_examples  # the lead's helper (secvec_core/distill.py)

        if "model" not in state:
            state["model"], state["tokenizer"] = load_model()  # only when a part needs it
        rank, world = rank_and_world()
        block = -(-len(prompts) // world)
        mine = prompts[rank * block : (rank + 1) * block]
        judge = spec.judge.build()
        rows = (
            self_distilled_examples(
                state["model"],
                state["tokenizer"],
                mine,
                max_new_tokens=spec.max_new_tokens,
                batch_size=spec.batch_size,
                judge=judge,
                keep=keep,
                prompt_template=prompt_template,
            )
            if mine
            else []
        )
        if world == 1:
            return list(rows)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, list(rows))
        return [r for part in gathered for r in part]

    return distill


def prepare_data(worker) -> dict:
    """Stage entry point (every rank builds; rank 0 logs the files). Returns the stage output record."""
    spec: DataPreparationStage = worker.spec
    # The model in the worker device's default dtype (a data stage has no `training:` settings); the
    # fingerprint that _load_base also returns is not needed here.
    splits, manifest = build_dataset(spec, model_distiller(lambda: worker._load_base(dtype_setting="auto")[:2], spec))
    manifest["base_model"] = worker.ctx.base_source if _uses_model(spec.parts) else None
    if worker.rank != 0:
        return {}
    directory = write_dataset(splits, manifest, worker.scratch / DATA_DIR)
    root = worker.mlflow.log_artifacts(directory, DATA_DIR)
    worker.mlflow.log_metrics({f"examples.{name}": len(rows) for name, rows in splits.items()})
    worker.mlflow.set_tags(
        {
            "secvec.data.seed": str(spec.seed),
            **{f"secvec.data.{n}.hash": s["data_hash"] for n, s in manifest["splits"].items()},
        }
    )
    return {
        "uri": root,
        "run_id": worker.run_id,
        "reusable": True,
        "seed": spec.seed,
        "files": {name: f"{root}/{name}.jsonl" for name in splits},
        "counts": {name: len(rows) for name, rows in splits.items()},
        "data_hash": {n: s["data_hash"] for n, s in manifest["splits"].items()},
    }


def _uses_model(parts: Sequence[DataPart]) -> bool:
    return any(p.responses == "self-distilled" for p in parts)
