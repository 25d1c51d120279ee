"""Examples, JSONL loading and tokenization with the loss on response tokens only."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROUTE_FLAG = "vectors_off"  # row key: True = the row trains with the vectors off (secvec_core.routing)


@dataclass(frozen=True)
class Example:
    """One training example: a conversation whose last assistant turn is the target."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, last one is the assistant response

    @classmethod
    def from_prompt_response(cls, prompt: str, response: str) -> Example:
        return cls(messages=(("user", prompt), ("assistant", response)))

    @property
    def prompt(self) -> str:
        """Text of the last user turn (what a judge or a generation call needs)."""
        return next(c for r, c in reversed(self.messages[:-1]) if r == "user")

    @property
    def response(self) -> str:
        return self.messages[-1][1]

    def to_dict(self) -> dict:
        if len(self.messages) == 2 and self.messages[0][0] == "user":
            return {"prompt": self.prompt, "response": self.response}
        return {"messages": [{"role": r, "content": c} for r, c in self.messages]}


def example_from_dict(record: dict, where: str = "record") -> Example:
    """Parse ``{"prompt", "response"}`` or ``{"messages": [...]}`` (last message from the assistant)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise ValueError(f"{where}: 'messages' must be a list of at least a user and an assistant turn")
        pairs = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: messages[{i}] needs 'role' and 'content'")
            pairs.append((str(m["role"]), str(m["content"])))
        if pairs[-1][0] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant response (the training target)")
        if not any(r == "user" for r, _ in pairs[:-1]):
            raise ValueError(f"{where}: no user turn before the assistant response")
        return Example(messages=tuple(pairs))
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing}; each line needs 'prompt' and 'response' "
            f"(or a chat 'messages' list). Keys found: {sorted(record)}"
        )
    prompt, response = record["prompt"], record["response"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"{where}: 'response' must be a non-empty string")
    return Example.from_prompt_response(prompt, response)


def to_examples(items: Iterable[Example | dict]) -> list[Example]:
    out = [it if isinstance(it, Example) else example_from_dict(it, f"example {i}") for i, it in enumerate(items)]
    if not out:
        raise ValueError("no examples given: the dataset is empty")
    return out


def read_json_lines(path: str | Path, what: str = "dataset") -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line.rstrip("\r\n"))))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    return rows


def load_jsonl(path: str | Path) -> list[Example]:
    """Read examples from a JSONL file. Errors name the file and line."""
    examples = [example_from_dict(record, f"{path}:{lineno}") for lineno, record in read_json_lines(path)]
    if not examples:
        raise ValueError(f"{path}: the dataset is empty; add one JSON object per line with 'prompt' and 'response'")
    return examples


def load_prompts(path: str | Path) -> list[str]:
    """Read evaluation prompts: JSONL with a 'prompt' field, or plain text with one prompt per line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        prompts = []
        for lineno, record in read_json_lines(path, "prompt"):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a JSON object with a string field 'prompt'")
            prompts.append(record["prompt"])
    elif not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def dataset_hash(examples: Sequence[Example]) -> str:
    """SHA-256 over the canonical JSON of the examples, in order. Recorded as lineage."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template (a Jinja template) "
            "or use an instruct model that ships one"
        )


def render_prompt(tokenizer, messages: Sequence[tuple[str, str]]) -> str:
    """Chat-template text of a conversation up to (and including) the assistant header."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False
    )


def pad_token_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its end-of-sequence token.

    Many chat models ship without a pad token; padding with EOS is safe here because padded positions
    are masked out of attention and of the loss. Every batch in secvec is padded with this one id.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token; set tokenizer.pad_token")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer, example: Example, max_length: int, truncation: str = "truncate") -> dict:
    """Token ids and labels; labels are IGNORE_INDEX on every prompt token.

    Over-long examples: ``truncation="truncate"`` drops prompt tokens from the left (then the
    response's tail if the response alone is too long) and flags ``truncated``; ``"reject"`` raises.
    """
    prompt_text = render_prompt(tokenizer, example.messages[:-1])
    prompt_ids = _ids(tokenizer, prompt_text)
    response_ids = _ids(tokenizer, example.response)
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    truncated = False
    total = len(prompt_ids) + len(response_ids)
    if total > max_length:
        if truncation == "reject":
            raise ValueError(
                f"example is {total} tokens, over max_length={max_length} (prompt {len(prompt_ids)}, "
                f"response {len(response_ids)}); shorten it, raise max_length, or use truncation='truncate'"
            )
        truncated = True
        keep_prompt = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def tokenize_examples(tokenizer, examples: Sequence[Example], max_length: int, truncation: str = "truncate"):
    rows = [tokenize_example(tokenizer, ex, max_length, truncation) for ex in examples]
    n_trunc = sum(r["truncated"] for r in rows)
    if n_trunc:
        logger.warning(
            "%d of %d examples were longer than max_length=%d and were truncated (prompt tokens dropped from the left)",
            n_trunc,
            len(rows),
            max_length,
        )
    if all(all(label == IGNORE_INDEX for label in r["labels"]) for r in rows):
        raise ValueError("no response tokens left after truncation; raise max_length")
    return rows


def collate(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for training (labels padded with IGNORE_INDEX). Rows routed to train with the
    vectors off (:mod:`secvec_core.routing`) add a boolean ``vectors_off`` tensor, one flag per row."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(ROUTE_FLAG in r for r in rows):
        batch[ROUTE_FLAG] = torch.tensor([bool(r.get(ROUTE_FLAG, False)) for r in rows])
    return batch


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (chat template + generation header) for generation or KL terms."""
    seqs = [_ids(tokenizer, render_prompt(tokenizer, [("user", p)]))[-max_length:] for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
