"""Turn a ``DatasetRef`` into examples or prompts: JSONL files, built-in toy sets, Hugging Face datasets."""

from __future__ import annotations

from secvec_core.data import Example, example_from_dict, load_jsonl, load_prompts, to_examples
from secvec_core.toy_world import ToyWorld
from workflows.specs import DatasetRef


def _builtin(name: str) -> list[dict] | list[str]:
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
    if ref.hf:
        return _window([r["prompt"] for r in _hf_rows(ref)], ref)
    items = _builtin(ref.builtin)
    return _window([i if isinstance(i, str) else i["prompt"] for i in items], ref)
