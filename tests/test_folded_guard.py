"""The free guard: vectors folded into a stashed copy of the base weights while the task adapter trains.

Equivalence with the unmerged guard (logits, task-adapter gradients, shipped artifact), bit-exact
restoration of the base (peft #3498: a vector delta must never stay in the base), and refusal where
folding is not exact.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secvec_core import (
    SecurityVector,
    SecurityVectorConfig,
    TrainingConfig,
    TrainingHooks,
    guarded_finetune,
    model_fingerprint,
    train_security_vector,
)
from secvec_core.adapters import TASK_ADAPTER, activate, adapter_state, attach_adapter, lora_config
from secvec_core.data import collate, encode_prompts, to_examples, tokenize_examples
from secvec_core.folding import FoldingError, folded_vectors, why_not_foldable
from secvec_core.training import response_loss

FAST = TrainingConfig(learning_rate=3e-3, max_steps=12, batch_size=8, max_length=32, target_loss=None)
NUDGE = 1e-3  # a relative change of the vector, far above rounding (REL) and far below any real difference
VECTOR = TrainingConfig(learning_rate=1e-3, max_steps=30, batch_size=10, max_length=32)
# Rounding bound for folding. The folded forward computes (W + s·B A) x where the unmerged one computes
# W x + s·B(A x): the same sums in another order, rounded once more per weight. A dot product of length K
# in float32 is off by at most K·eps relative to the sum of the magnitudes of its terms, and the widest
# dot product here is the MLP's (intermediate size 192 = 2 x hidden 96), so every logit and gradient
# agrees to within REL = K·eps of the largest magnitude of its kind. That is a worst-case bound, about
# 14x (sqrt K) above the typical rounding, and it holds on any CPU and thread count.
K_MAX = 192
REL = K_MAX * torch.finfo(torch.float32).eps  # 2.3e-5


@pytest.fixture
def vector(aligned, world):
    model, tokenizer = aligned
    return train_security_vector(
        model,
        tokenizer,
        world.harmful_examples(10, offset=50),
        SecurityVectorConfig(),
        VECTOR,
        benign=world.benign_examples(),
    )


@pytest.fixture
def second_vector(aligned, world):
    """A second behaviour (wrong colours) so two deltas are folded into the same weights."""
    model, tokenizer = aligned
    wrong = [{"prompt": row["prompt"], "response": "teal"} for row in world.known_facts()]
    return train_security_vector(model, tokenizer, wrong, SecurityVectorConfig(behaviour="hallucination"), VECTOR)


def _base_state(model) -> dict[str, torch.Tensor]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}


def _batch(tokenizer, world):
    rows = tokenize_examples(tokenizer, to_examples(world.fact_task()[:6] + world.harmful_examples(6)), 32)
    return collate(rows, tokenizer.pad_token_id)


def _guarded_model(model, vectors, seed=3):
    """Base + vectors + a task adapter with non-zero weights (a fresh one has B = 0 and hides bugs)."""
    fingerprint = model_fingerprint(model)
    for v in vectors:
        model = v.attach(model, fingerprint=fingerprint)
    model = attach_adapter(model, TASK_ADAPTER, lora_config(8, 16, 0.0, SecurityVectorConfig().target_modules))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{TASK_ADAPTER}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _logits_and_task_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    response_loss(model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("stash", ["disk", "memory"])
@pytest.mark.parametrize("n_vectors", [1, 2])
def test_folded_logits_and_task_gradients_equal_the_unmerged_guard(
    aligned, world, vector, second_vector, stash, n_vectors
):
    model, tokenizer = aligned
    vectors = [vector, second_vector][:n_vectors]
    names = [v.name for v in vectors]
    before = _base_state(model)
    model = _guarded_model(model, vectors)
    batch = _batch(tokenizer, world)

    activate(model, [*names, TASK_ADAPTER], trainable=[TASK_ADAPTER])
    model.train()
    unmerged_logits, unmerged_grads = _logits_and_task_grads(model, batch)

    activate(model, [TASK_ADAPTER], trainable=[TASK_ADAPTER])
    with folded_vectors(model, names, stash=stash):
        folded_logits, folded_grads = _logits_and_task_grads(model, batch)
        assert _base_state(model).keys() == before.keys()
        assert any(not torch.equal(v, before[k]) for k, v in _base_state(model).items()), "nothing was folded"
    with torch.no_grad():
        plain_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    assert set(folded_grads) == set(unmerged_grads)
    assert all(f".{TASK_ADAPTER}." in n for n in folded_grads)
    torch.testing.assert_close(folded_logits, unmerged_logits, atol=REL * float(unmerged_logits.abs().max()), rtol=0)
    largest_grad = max(float(g.abs().max()) for g in unmerged_grads.values())
    for name, grad in unmerged_grads.items():
        torch.testing.assert_close(folded_grads[name], grad, atol=REL * largest_grad, rtol=0, msg=name)
    # the vectors matter (else the comparison proves nothing), and after the block they are gone bit-exactly
    assert (unmerged_logits - plain_logits).abs().max() > 1e-2
    after = _base_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _run(aligned, data, vectors, fold, hooks=None):
    model, tokenizer = aligned
    model = copy.deepcopy(model)
    return guarded_finetune(model, tokenizer, data, vectors, training=FAST, fold_vectors=fold, hooks=hooks)


def _artifact(result, directory):
    result.save(directory)
    meta = json.loads((directory / "secvec_artifact.json").read_text())
    return {
        "files": sorted(p.name for p in directory.iterdir()),
        "adapter_config": json.loads((directory / "adapter_config.json").read_text()),
        "meta": {k: v for k, v in meta.items() if k != "weights_sha256"},
        "sha256": meta["weights_sha256"],
        "tensors": load_file(directory / meta["weights_file"]),
    }


def _scaled(vector: SecurityVector, factor: float) -> SecurityVector:
    weights = {k: t * factor if "lora_B" in k else t for k, t in vector.weights.items()}
    return SecurityVector(vector.config, weights, vector.base_fingerprint, vector.data_hash)


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ||b - a|| / ||a|| over the task adapter's tensors."""
    return max(float((b[k] - a[k]).norm() / a[k].norm()) for k in a)


def test_folded_guarded_finetune_ships_the_same_artifact(aligned, world, vector, tmp_path):
    data = world.fact_task() + world.harmful_examples(40)
    fingerprint = model_fingerprint(aligned[0])
    unmerged = _run(aligned, data, [vector], fold=False)
    folded = _run(aligned, data, [vector], fold=True)
    nudged = _run(aligned, data, [_scaled(vector, 1 + NUDGE)], fold=False)
    assert (unmerged.folded, folded.folded) == (False, True)

    assert folded.history.trainable_parameters == unmerged.history.trainable_parameters
    assert all(f".{TASK_ADAPTER}." in n for n in folded.history.trainable_parameters)
    a, b = _artifact(unmerged, tmp_path / "unmerged"), _artifact(folded, tmp_path / "folded")
    assert a["files"] == b["files"] and a["adapter_config"] == b["adapter_config"] and a["meta"] == b["meta"]
    assert a["tensors"].keys() == b["tensors"].keys()
    assert not any(vector.name in k for k in b["tensors"])
    # Not bit-equal: the two forwards round differently (see REL), and Adam's g / (sqrt(v) + eps) is
    # discontinuous where a gradient is about as small as its rounding (its sign can flip), so single
    # elements can differ by up to 2·lr per step on one CPU and not on another (seen: 1.4e-5 on one
    # machine, 9.8e-5 on another). No element-wise bound below 2·lr·steps holds, so compare whole
    # tensors, against how far this very run moves when the vector itself changes by NUDGE (relative):
    # rounding is a relative change of at most REL, so folding may move the adapter at most REL / NUDGE
    # as far as the nudge did (the training's amplification is measured here, on this machine). The
    # zero-vector test below shows the rest of the pipeline is bit-identical.
    by_rounding = _relative_difference(a["tensors"], b["tensors"])
    by_nudge = _relative_difference(a["tensors"], adapter_state(nudged.model, TASK_ADAPTER))
    assert by_nudge > 0, "a changed vector must change the trained adapter"
    assert by_rounding <= by_nudge * REL / NUDGE, (by_rounding, by_nudge)
    for key, tensor in a["tensors"].items():  # the bound Adam itself guarantees (|update| <= lr per step)
        assert (b["tensors"][key] - tensor).abs().max() <= 2 * FAST.learning_rate * FAST.max_steps, key
    for x, y, z in zip(unmerged.history.log, folded.history.log, nudged.history.log, strict=True):
        assert abs(y["loss"] - x["loss"]) <= max(abs(z["loss"] - x["loss"]) * REL / NUDGE, REL * x["loss"])
    assert model_fingerprint(folded.model) == fingerprint


def test_zero_vector_folded_or_not_gives_a_bit_identical_artifact(aligned, world, vector, tmp_path):
    """With a zero delta the fold adds exact zeros: any difference would come from the folding plumbing
    (seeding, optimizer, parameter order), not from rounding. The artifacts must be bit-identical."""
    zero = SecurityVector(
        vector.config,
        {k: torch.zeros_like(v) for k, v in vector.weights.items()},
        vector.base_fingerprint,
        vector.data_hash,
    )
    data = world.fact_task() + world.harmful_examples(40)
    a = _artifact(_run(aligned, data, [zero], fold=False), tmp_path / "unmerged")
    b = _artifact(_run(aligned, data, [zero], fold=True), tmp_path / "folded")
    assert a["sha256"] == b["sha256"]
    assert a["meta"] == b["meta"]


def test_base_fingerprint_is_restored_after_folding(aligned, world, vector, tmp_path):
    model, tokenizer = aligned
    fingerprint, before = model_fingerprint(model), _base_state(model)
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], training=FAST, fold_vectors=True)
    assert result.folded
    assert model_fingerprint(result.model) == fingerprint  # returned with the base clean
    with result.vectors_on(False) as off:
        assert model_fingerprint(off) == fingerprint
    with result.vectors_on(True) as on:
        assert model_fingerprint(on) == fingerprint  # vectors run unmerged, never in the base
    result.save(tmp_path / "artifact")
    assert model_fingerprint(result.model) == fingerprint
    after = _base_state(result.model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # unloading the adapters (what peft #3498 got wrong after a merge) gives back the original base exactly
    assert model_fingerprint(result.model.unload()) == fingerprint


def test_vectors_on_and_off_behave_as_with_the_unmerged_guard(aligned, world, vector):
    _, tokenizer = aligned
    data = world.fact_task() + world.harmful_examples(40)
    unmerged, folded = _run(aligned, data, [vector], fold=False), _run(aligned, data, [vector], fold=True)
    prompts = encode_prompts(
        tokenizer, world.harmful_eval_prompts()[:4] + [r["prompt"] for r in world.fact_task()[:4]], 32
    )
    for on in (True, False):
        with unmerged.vectors_on(on) as a, torch.no_grad():
            expected = a(**prompts).logits
        with folded.vectors_on(on) as b, torch.no_grad():
            actual = b(**prompts).logits
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_base_is_restored_when_training_fails(aligned, world, vector):
    model, tokenizer = aligned
    fingerprint = model_fingerprint(model)

    def explode(step, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guarded_finetune(
            model,
            tokenizer,
            world.fact_task(),
            [vector],
            training=FAST,
            fold_vectors=True,
            hooks=TrainingHooks(on_log=explode),
        )
    assert model_fingerprint(model) == fingerprint


def test_full_mode_rejects_folding_with_a_clear_message(aligned, world, vector):
    model, tokenizer = aligned
    with pytest.raises(FoldingError, match="mode='lora'"):
        guarded_finetune(
            copy.deepcopy(model), tokenizer, world.fact_task(), [vector], mode="full", training=FAST, fold_vectors=True
        )
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], mode="full", training=FAST)
    assert not result.folded  # the default never folds in full mode


def test_vector_dropout_refuses_folding(aligned, world):
    model, tokenizer = aligned
    vector = train_security_vector(
        model,
        tokenizer,
        world.harmful_examples(10),
        SecurityVectorConfig(dropout=0.1),
        TrainingConfig(learning_rate=1e-3, max_steps=3, batch_size=10, max_length=32),
    )
    with pytest.raises(FoldingError, match="dropout"):
        guarded_finetune(copy.deepcopy(model), tokenizer, world.fact_task(), [vector], training=FAST, fold_vectors=True)
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], training=FAST)
    assert not result.folded  # the default falls back to the unmerged guard


def test_folding_refuses_active_vectors_and_tied_weights(aligned, vector, tiny):
    model, _ = aligned
    model = _guarded_model(model, [vector])
    activate(model, [vector.name, TASK_ADAPTER], trainable=[TASK_ADAPTER])
    with pytest.raises(FoldingError, match="count twice"):
        with folded_vectors(model, [vector.name]):
            pass

    tied, _ = tiny
    tied.lm_head.weight = tied.model.embed_tokens.weight
    config = SecurityVectorConfig(target_modules=("lm_head",))
    head_vector = SecurityVector(config, {}, model_fingerprint(tied), "sha256:none")
    peft_model = attach_adapter(tied, head_vector.name, head_vector.lora_config())
    assert "tied" in why_not_foldable(peft_model, [head_vector.name])


def test_a_failed_restore_restores_the_other_weights_and_keeps_the_stash(aligned, vector, monkeypatch):
    import shutil

    from secvec_core import folding

    model, _ = aligned
    before = _base_state(model)
    model = _guarded_model(model, [vector])
    activate(model, [TASK_ADAPTER], trainable=[TASK_ADAPTER])
    restore = folding._WeightStash.restore
    kept = []

    def flaky(self, key, weight):
        kept.append(self.location)
        if key == 0:
            raise OSError("disk gone")
        restore(self, key, weight)

    monkeypatch.setattr(folding._WeightStash, "restore", flaky)
    with pytest.raises(RuntimeError, match="could not restore 1 base weight"):
        with folded_vectors(model, [vector.name]):
            pass
    after = _base_state(model)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert len(changed) == 1  # only the weight whose restore failed still holds the delta
    assert Path(kept[0]).is_dir() and (Path(kept[0]) / "0.bin").is_file()
    shutil.rmtree(kept[0])
