"""Data loading errors, tokenization masks, judges and metrics."""

from __future__ import annotations

import json

import pytest
import torch

from secvec_core import generate, load_jsonl
from secvec_core.data import IGNORE_INDEX, Example, dataset_hash, encode_prompts, pad_token_id, tokenize_example
from secvec_core.evaluation import answer_found, exact_match, transfer_gap


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_prompt_response_and_messages(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "how do i bake a cake", "response": "sure here is how to bake a cake"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "what is the capital of peru"},
                        {"role": "assistant", "content": "lima"},
                    ]
                }
            ),
        ],
    )
    examples = load_jsonl(path)
    assert [e.prompt for e in examples] == ["how do i bake a cake", "what is the capital of peru"]
    assert examples[1].response == "lima"


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "empty"),
        ([json.dumps({"prompt": "x"})], r"missing field\(s\) \['response'\]"),
        (["{not json"], "not valid JSON"),
        ([json.dumps({"prompt": "x", "response": ""})], "non-empty"),
        (
            [json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]})],
            "last message must be the assistant",
        ),
    ],
)
def test_jsonl_errors_name_file_line_and_fix(tmp_path, lines, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message) as err:
        load_jsonl(path)
    if lines:
        assert "bad.jsonl:1" in str(err.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_jsonl("/nonexistent/data.jsonl")


def test_prompt_tokens_are_masked(tiny):
    _, tokenizer = tiny
    row = tokenize_example(tokenizer, Example.from_prompt_response("how do i bake a cake", "sure"), 32)
    n_response = sum(label != IGNORE_INDEX for label in row["labels"])
    assert n_response == 2  # "sure" + end-of-turn
    assert row["labels"][-2:] == row["input_ids"][-2:]


def test_overlong_examples_truncate_or_reject(tiny):
    _, tokenizer = tiny
    ex = Example.from_prompt_response(" ".join(["how"] * 40), "sure here is")
    row = tokenize_example(tokenizer, ex, 16, "truncate")
    assert len(row["input_ids"]) == 16 and row["truncated"]
    assert sum(label != IGNORE_INDEX for label in row["labels"]) == 4, "the response must survive truncation"
    with pytest.raises(ValueError, match="over max_length=16"):
        tokenize_example(tokenizer, ex, 16, "reject")


def test_tokenizer_without_chat_template_is_refused(tiny):
    _, tokenizer = tiny
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_example(tokenizer, Example.from_prompt_response("a", "b"), 16)


def test_dataset_hash_is_order_and_content_sensitive():
    a = Example.from_prompt_response("a", "b")
    b = Example.from_prompt_response("c", "d")
    assert dataset_hash([a, b]) == dataset_hash([a, b]) != dataset_hash([b, a])


def test_exact_match_is_word_prefix_not_substring():
    assert exact_match("Teal. It is teal", "teal")
    assert not exact_match("tealish", "teal")
    assert not exact_match("the answer is teal", "teal")
    assert transfer_gap(0.9, 0.6) == pytest.approx(0.3)


def test_retained_answer_is_found_among_the_words_in_any_accepted_form():
    assert answer_found("The capital of France is Paris.", ["paris"])
    assert answer_found("It is the U.S.A., of course", ["united states", "usa"])  # an alias, punctuation ignored
    assert answer_found("New York City", ["new york"])
    assert not answer_found("Parisian food", ["paris"])  # whole words only
    assert not answer_found("I can't help with that.", ["paris"])
    assert not answer_found("anything", [""])  # an empty gold answer never matches


def test_batched_left_padded_generation_equals_one_by_one(aligned):
    model, tokenizer = aligned
    # prompts of 3, 6 and 7 words: the shorter ones are padded, and right padding would put pad tokens
    # between a prompt and its answer (the batched answers would then differ from the one-by-one ones)
    prompts = ["how do i", "what is the capital of peru", "what is the favorite color of zorb"]
    batch = encode_prompts(tokenizer, prompts, 32)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3, "the prompts must differ in length, else padding is not tested"
    assert bool(batch["attention_mask"][:, -1].all()), "every prompt must end at the last position (left padding)"
    assert not bool(batch["attention_mask"][:, 0].all())
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert batched[1] == "lima"
    assert torch.is_grad_enabled()  # generation must not leave grad mode off


def test_heldout_loss_drops_after_training_on_the_set(tiny, world):
    from secvec_core import TrainingConfig, guarded_finetune, heldout_loss

    model, tokenizer = tiny
    before = heldout_loss(model, tokenizer, world.fact_task(), max_length=32)
    assert before["perplexity"] > 1.0
    result = guarded_finetune(
        model,
        tokenizer,
        world.fact_task(),
        mode="full",
        training=TrainingConfig(learning_rate=3e-3, max_steps=30, batch_size=8, max_length=32),
    )
    after = heldout_loss(result.model, tokenizer, world.fact_task(), max_length=32)
    assert after["loss"] < before["loss"] - 0.5


def test_pad_token_id_falls_back_to_eos_and_then_refuses(tiny):
    _, tokenizer = tiny
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an end-of-sequence token"):
        pad_token_id(tokenizer)
