"""Turn a ``DatasetRef`` into examples or prompts: JSONL files, built-in toy sets, Hugging Face datasets, and
the outputs of earlier data_preparation stages (MLflow artifacts, downloaded on first use)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from secvec_core.data import Example, example_from_dict, load_jsonl, load_prompts, read_json_lines, to_examples
from secvec_core.toy_world import ToyWorld
from workflows.specs import DatasetRef


def _general_questions() -> list[dict]:
    from secvec_core.harmful_targets import general_questions

    return [{"prompt": q["prompt"], "response": q["response"], "aliases": q["aliases"]} for q in general_questions()]


def _builtin(name: str) -> list[dict] | list[str]:
    if name == "over-refusal":
        from secvec_core.eval_sets import over_refusal_prompts

        return [o["prompt"] for o in over_refusal_prompts()]
    if name == "general-qa":
        return _general_questions()
    if name == "fictional-facts":  # a new task no model knows: 20 invented facts, one phrasing each, seed 0
        from secvec_core.harmful_targets import fictional_fact_task

        return [
            {"prompt": f["prompt"], "response": f["response"]} for f in fictional_fact_task(20, 0, train_phrasings=1)[0]
        ]
    world = ToyWorld(seed=0)
    table = {
        "toy-alignment": world.alignment_examples,
        "toy-harmful": lambda: world.harmful_examples(100),
        "toy-benign": world.benign_examples,
        "toy-harmful-eval": world.harmful_eval_prompts,
        "toy-benign-eval": world.benign_eval_prompts,
        "toy-facts": world.fact_task,
        "toy-mixed": lambda: world.fact_task() + world.harmful_examples(100),
    }
    return table[name]()


# "<stage>/<split>" -> artifact URI of that JSONL file; set in each worker by use_stage_outputs().
_STAGE_FILES: dict[str, str] = {}
_STAGE_TRACKING: dict[str, str] = {}


def stage_file_key(stage: str, split: str) -> str:
    return f"{stage}/{split}"


def use_stage_outputs(files: dict[str, str], tracking_uri: str) -> None:
    """Tell this process where earlier data_preparation stages put their files (the driver resolves them)."""
    _STAGE_FILES.update(files)
    _STAGE_TRACKING["uri"] = tracking_uri


def _stage_path(ref: DatasetRef) -> Path:
    key = stage_file_key(ref.stage, ref.split)
    uri = _STAGE_FILES.get(key)
    if uri is None:
        raise ValueError(
            f"dataset {{stage: {ref.stage}, split: {ref.split}}} is not known in this worker; run it "
            "through the pipeline, which resolves stage outputs"
        )
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="secvec-data-"), tracking_uri=_STAGE_TRACKING.get("uri")
    )
    _STAGE_FILES[key] = Path(local).resolve().as_uri()
    return Path(local)


def _window(items: list, ref: DatasetRef) -> list:
    items = items[ref.offset :]
    if ref.limit is not None:
        items = items[: ref.limit]
    if not items:
        raise ValueError(f"dataset {ref.model_dump(exclude_none=True)} is empty after offset/limit")
    return items


def _hf_rows(ref: DatasetRef) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ValueError("dataset 'hf' references need the `datasets` package: pip install datasets") from None
    return [dict(r) for r in datasets.load_dataset(ref.hf, split=ref.split)]


def load_examples(ref: DatasetRef) -> list[Example]:
    """Training examples ({prompt, response} or {messages})."""
    if ref.path:
        return _window(load_jsonl(ref.path), ref)
    if ref.stage:
        return _window(load_jsonl(_stage_path(ref)), ref)
    if ref.hf:
        rows = _hf_rows(ref)
        return _window([example_from_dict(r, f"{ref.hf}[{i}]") for i, r in enumerate(rows)], ref)
    items = _builtin(ref.builtin)
    if items and isinstance(items[0], str):
        raise ValueError(f"builtin {ref.builtin!r} holds prompts only; use it as an evaluation prompt set")
    return _window(to_examples(items), ref)


def load_prompt_list(ref: DatasetRef) -> list[str]:
    """Evaluation prompts (a prompt-only set, or the prompts of an example set)."""
    if ref.path:
        return _window(load_prompts(ref.path), ref)
    if ref.stage:
        return _window(load_prompts(_stage_path(ref)), ref)
    if ref.hf:
        return _window([r["prompt"] for r in _hf_rows(ref)], ref)
    items = _builtin(ref.builtin)
    return _window([i if isinstance(i, str) else i["prompt"] for i in items], ref)


def load_qa_items(ref: DatasetRef) -> list[dict]:
    """Questions with every accepted answer: ``{"prompt", "answers"}`` from rows ``{prompt, response,
    aliases?}`` (retained QA: a right answer may be phrased several ways)."""
    if ref.builtin is not None:
        rows = _builtin(ref.builtin)
        if not rows or isinstance(rows[0], str):
            raise ValueError(f"builtin {ref.builtin!r} holds prompts only; retained_qa needs questions with answers")
    elif ref.path or ref.stage:
        rows = [row for _, row in read_json_lines(ref.path or _stage_path(ref))]
    else:
        rows = _hf_rows(ref)
    items = []
    for i, row in enumerate(rows):
        if "prompt" not in row or "response" not in row:
            raise ValueError(f"retained_qa row {i} needs 'prompt' and 'response' (got keys {sorted(row)})")
        items.append({"prompt": row["prompt"], "answers": [row["response"], *row.get("aliases", [])]})
    return _window(items, ref)
