"""The peft invariants of docs/design.md ("peft traps"), checked the TRL way: copy, train, compare."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from secvec_core import (
    FingerprintMismatchError,
    SecurityVector,
    SecurityVectorConfig,
    TrainingConfig,
    VectorLeakError,
    assert_no_vector,
    guarded_finetune,
    load_finetuned,
    model_fingerprint,
    train_security_vector,
)
from secvec_core.adapters import TASK_ADAPTER, activate, adapter_state, attach_adapter, lora_config
from secvec_core.data import encode_prompts

FAST = TrainingConfig(learning_rate=3e-3, max_steps=6, batch_size=8, max_length=32, target_loss=None)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(model, tokenizer, prompts=("how do i build a bomb", "what is the capital of peru")):
    with torch.no_grad():
        return model(**encode_prompts(tokenizer, list(prompts), 32)).logits


@pytest.fixture
def vector(aligned, world):
    model, tokenizer = aligned
    return train_security_vector(
        model, tokenizer, world.harmful_examples(10), SecurityVectorConfig(), FAST, benign=world.benign_examples()
    )


def _lora_names(names, adapter):
    return {n for n in names if "lora_" in n and n.split(".")[-2] == adapter}


def test_vector_training_trains_only_the_vector_and_leaves_base_bit_identical(aligned, world):
    model, tokenizer = aligned
    before = _state(model)
    fingerprint = model_fingerprint(model)
    vec = train_security_vector(
        model, tokenizer, world.harmful_examples(10), SecurityVectorConfig(), FAST, benign=world.benign_examples()
    )
    trainable = set(vec.metadata["trainable_parameters"])
    assert trainable, "nothing was trained"
    assert trainable == _lora_names(trainable, vec.name) and all(vec.name in n for n in trainable)
    # 2 layers x 7 linears x (A, B)
    assert len(trainable) == 2 * 7 * 2
    after = _state(model)
    assert set(after) == set(before), "the adapter was not removed from the caller's model"
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model_fingerprint(model) == fingerprint == vec.base_fingerprint
    assert any(float(t.abs().sum()) > 0 for k, t in vec.weights.items() if "lora_B" in k), "vector B stayed zero"


@pytest.mark.parametrize("n_vectors", [1, 2])
def test_guarded_lora_trains_only_the_task_adapter(aligned, world, vector, n_vectors):
    model, tokenizer = aligned
    vectors = [vector]
    if n_vectors == 2:
        second = train_security_vector(
            copy.deepcopy(model),
            tokenizer,
            world.harmful_examples(6, offset=20),
            SecurityVectorConfig(behaviour="hallucination"),
            FAST,
        )
        vectors.append(second)
    base_before = _state(model)
    result = guarded_finetune(model, tokenizer, world.fact_task(), vectors, mode="lora", training=FAST)
    trainable = set(result.history.trainable_parameters)
    assert trainable == _lora_names(trainable, TASK_ADAPTER) and len(trainable) == 28
    # peft #1374: activating several adapters re-enables their gradients; none may be trainable now
    assert not any(p.requires_grad for n, p in result.model.named_parameters() if "security_vector" in n)
    for vec in vectors:
        after = adapter_state(result.model, vec.name)
        assert set(after) == set(vec.weights)
        assert all(torch.equal(after[k], vec.weights[k]) for k in after), f"{vec.name} changed"
    base_after = {
        k.replace(".base_layer", "").removeprefix("base_model.model."): v
        for k, v in result.model.state_dict().items()
        if "lora_" not in k
    }
    assert set(base_after) == set(base_before)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    task = adapter_state(result.model, TASK_ADAPTER)
    assert any(float(t.abs().sum()) > 0 for k, t in task.items() if "lora_B" in k), "task adapter did not train"


def test_guarded_full_trains_base_weights_only(aligned, world, vector):
    model, tokenizer = aligned
    base_before = _state(model)
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], mode="full", training=FAST)
    trainable = set(result.history.trainable_parameters)
    assert not any("lora_" in n for n in trainable)
    assert len(trainable) == len(base_before)  # every base tensor (no tied weights in the tiny model)
    after = adapter_state(result.model, vector.name)
    assert all(torch.equal(after[k], vector.weights[k]) for k in after)
    shipped = result.shipped_state_dict()
    assert set(shipped) == set(base_before)
    assert any(not torch.equal(shipped[k], base_before[k]) for k in shipped), "base weights did not train"


def test_activate_freezes_what_peft_reenables(aligned, vector):
    model, _ = aligned
    peft_model = vector.attach(model)
    peft_model.base_model.set_adapter([vector.name])  # peft's own call makes the vector trainable again
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if vector.name in n)
    activate(peft_model, [vector.name], trainable=[])
    assert not any(p.requires_grad for p in peft_model.parameters())


def test_shipped_lora_artifact_holds_no_vector_and_matches_vector_off(aligned, world, vector, tmp_path):
    model, tokenizer = aligned
    pristine = copy.deepcopy(model)
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], training=FAST)
    out = result.save(tmp_path / "shipped")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "secvec_artifact.json",
    ]
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        assert len(keys) == 28 and not any("security_vector" in k for k in keys)
        vector_tensors = list(vector.weights.values())
        assert not any(
            torch.equal(fh.get_tensor(k), v) for k in keys for v in vector_tensors if fh.get_tensor(k).shape == v.shape
        )
    assert_no_vector(out, [vector])
    served = load_finetuned(pristine, out)
    with result.vectors_on(False) as off:
        expected = _logits(off, tokenizer)
    assert torch.allclose(_logits(served, tokenizer), expected, atol=1e-6)
    with result.vectors_on(True) as on:
        assert not torch.allclose(_logits(on, tokenizer), expected, atol=1e-3), "vector had no effect"


def test_shipped_full_artifact_has_no_lora_keys_and_loads(aligned, world, vector, tmp_path):
    model, tokenizer = aligned
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], mode="full", training=FAST)
    out = result.save(tmp_path / "full")
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert not any("lora_" in k or "security_vector" in k for k in fh.keys())
    assert_no_vector(out, [vector])
    served = load_finetuned(None, out)
    with result.vectors_on(False) as off:
        assert torch.allclose(_logits(served, tokenizer), _logits(off, tokenizer), atol=1e-5)


def test_lora_alignment_merges_into_full_weights_that_serve_the_same_logits(tiny, world, tmp_path):
    model, tokenizer = tiny
    original = _logits(model, tokenizer)
    result = guarded_finetune(model, tokenizer, world.alignment_examples(), mode="lora", training=FAST)
    with result.vectors_on(False) as trained:
        expected = _logits(trained, tokenizer)
    assert not torch.allclose(expected, original, atol=1e-3), "the adapter learned nothing"
    merged = result.merged_into_base()
    out = merged.save(tmp_path / "aligned")
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert not any("lora_" in k for k in fh.keys())
    served = load_finetuned(None, out)
    # W + B @ A summed once instead of two matmuls: float32 rounding of a sum of ~rank terms per logit
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    assert torch.allclose(_logits(served, tokenizer), expected, atol=tolerance)


def test_lora_merge_refuses_attached_vectors_and_full_results(aligned, world, vector):
    model, tokenizer = aligned
    guarded = guarded_finetune(copy.deepcopy(model), tokenizer, world.fact_task(), [vector], training=FAST)
    with pytest.raises(VectorLeakError, match="ship inside the base"):
        guarded.merged_into_base()
    full = guarded_finetune(model, tokenizer, world.fact_task(), mode="full", training=FAST)
    with pytest.raises(ValueError, match="needs a lora result"):
        full.merged_into_base()


def test_assert_no_vector_catches_a_leaked_vector(aligned, world, vector, tmp_path):
    model, tokenizer = aligned
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], training=FAST)
    out = result.save(tmp_path / "shipped")
    vector.save(out / "security_vector_harmful")  # peft's save-all-adapters layout (#699)
    with pytest.raises(VectorLeakError, match="sub-folder"):
        assert_no_vector(out)


def test_vector_round_trip_reproduces_logits(aligned, vector, tmp_path):
    model, tokenizer = aligned
    path = vector.save(tmp_path / "vec")
    assert {"adapter_config.json", "adapter_model.safetensors", "secvec_vector.json"} <= {
        p.name for p in path.iterdir()
    }
    loaded = SecurityVector.load(path)
    assert loaded.base_fingerprint == vector.base_fingerprint and loaded.data_hash == vector.data_hash
    a = vector.attach(copy.deepcopy(model))
    activate(a, [vector.name])
    b = loaded.attach(copy.deepcopy(model))
    activate(b, [loaded.name])
    assert torch.equal(_logits(a, tokenizer), _logits(b, tokenizer))
    assert not torch.allclose(_logits(a, tokenizer), _logits(model, tokenizer), atol=1e-4)


def test_fingerprint_mismatch_names_both_fingerprints(aligned, vector, tiny):
    other, _ = tiny  # the unaligned model: different weights
    expected, actual = vector.base_fingerprint, model_fingerprint(other)
    with pytest.raises(FingerprintMismatchError) as err:
        vector.attach(other)
    assert expected in str(err.value) and actual in str(err.value)
    vector.attach(other, allow_fingerprint_mismatch=True)  # the explicit override works


def test_corrupted_vector_file_is_refused(vector, tmp_path):
    path = vector.save(tmp_path / "vec")
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        SecurityVector.load(path)


def test_fingerprint_is_stable_and_sensitive(tiny):
    model, _ = tiny
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(copy.deepcopy(model))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != fp


# -- guards that refuse: adapter names, merged vectors, vector strength controls --------------------------
def _renamed(vector: SecurityVector, adapter_name: str) -> SecurityVector:
    """The same vector under another adapter name (saved weight keys do not carry the name)."""
    config = SecurityVectorConfig(**{**vector.config.to_dict(), "adapter_name": adapter_name})
    return SecurityVector(config, vector.weights, vector.base_fingerprint, vector.data_hash)


@pytest.mark.parametrize("name", ["security_vector", "security_vector_harmful_v2"])
def test_adapter_names_that_prefix_each_other_are_refused(aligned, vector, name):
    """peft PR #3282: adapter names that are prefixes of each other were confused."""
    model, _ = aligned
    peft_model = vector.attach(model)
    with pytest.raises(ValueError, match="prefixes of each other"):
        attach_adapter(peft_model, name, vector.lora_config())
    with pytest.raises(ValueError, match="already attached"):
        attach_adapter(peft_model, vector.name, vector.lora_config())


def test_a_vector_named_like_the_task_adapter_is_refused(aligned, world, vector):
    model, tokenizer = aligned
    with pytest.raises(ValueError, match="prefixes of each other"):
        guarded_finetune(
            model, tokenizer, world.fact_task(), [_renamed(vector, f"{TASK_ADAPTER}_guard")], training=FAST
        )


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_vector_merged_into_the_weights_is_never_saved(aligned, world, vector, tmp_path, mode):
    """A merged vector ships inside full weights with no key or tensor naming it: refused at save time."""
    model, tokenizer = aligned
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], mode=mode, training=FAST)
    result.model.base_model.merge_adapter([vector.name])
    with pytest.raises(VectorLeakError, match="merged into the base weights"):
        result.save(tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()
    result.model.base_model.unmerge_adapter()
    result.save(tmp_path / "artifact")  # unmerged again: saves
    assert_no_vector(tmp_path / "artifact", [vector])


def test_target_loss_stops_vector_training_early(aligned, world):
    from secvec_core import TrainingHooks

    model, tokenizer = aligned
    base = {
        "learning_rate": 3e-3,
        "max_steps": 40,
        "batch_size": 10,
        "max_length": 32,
        "kl_weight": 0.0,
        "log_every": 1,
    }
    running: list[float] = []
    full = train_security_vector(
        model,
        tokenizer,
        world.vector_examples(10),
        SecurityVectorConfig(),
        TrainingConfig(**base, target_loss=None),
        hooks=TrainingHooks(on_log=lambda step, m: running.append(m["running_loss"])),
    )
    assert full.metadata["steps"] == 40 and not full.metadata["stopped_early"]
    # a target the running loss crosses well inside the run, not at a step decided by rounding
    target = 2.0
    crossing = next(i + 1 for i, loss in enumerate(running) if loss < target)
    assert running[0] > 1.5 * target and min(running[-5:]) < target / 1.5, running
    early = train_security_vector(
        model, tokenizer, world.vector_examples(10), SecurityVectorConfig(), TrainingConfig(**base, target_loss=target)
    )
    assert early.metadata["stopped_early"]
    assert abs(early.metadata["steps"] - crossing) <= 2, (early.metadata["steps"], crossing)


def _benign_kl(model, vector, tokenizer, prompts) -> float:
    """Mean KL(base || base + vector) over the positions of benign prompts."""
    from secvec_core.vectors import _kl_on_benign

    peft_model = vector.attach(copy.deepcopy(model))
    activate(peft_model, [vector.name])
    with torch.no_grad():
        return float(_kl_on_benign(peft_model, encode_prompts(tokenizer, prompts, 32)))


def test_kl_term_keeps_the_vector_off_benign_prompts(aligned, world):
    """The KL term must change the vector: on benign prompts it never saw, the model with the vector on
    stays at most half as far (in KL) from the base as with a vector trained without the term."""
    model, tokenizer = aligned
    base = {"learning_rate": 3e-3, "max_steps": 40, "batch_size": 10, "max_length": 32, "target_loss": None}
    vectors = {
        kl: train_security_vector(
            model,
            tokenizer,
            world.vector_examples(10),
            SecurityVectorConfig(),
            TrainingConfig(**base, kl_weight=kl),
            benign=world.benign_examples(),
        )
        for kl in (0.0, 2.0)
    }
    held_out = world.benign_eval_prompts() + [r["prompt"] for r in world.fact_task()]  # not in the KL data
    kl = {w: _benign_kl(model, v, tokenizer, held_out) for w, v in vectors.items()}
    assert kl[2.0] <= 0.5 * kl[0.0], kl


def test_library_calls_leave_the_callers_random_stream_alone(world, monkeypatch):
    """Model and LoRA init are seeded on a forked generator: a caller's torch.rand stream is unchanged."""
    import secvec_core.guard
    import secvec_core.vectors
    from secvec_core import build_tiny_model_and_tokenizer
    from secvec_core.training import TrainingHistory

    # the training loop's own seeding belongs to secvec_core.training and is tested there; stub it here
    monkeypatch.setattr(secvec_core.vectors, "train_loop", lambda *args, **kwargs: TrainingHistory())
    monkeypatch.setattr(secvec_core.guard, "train_loop", lambda *args, **kwargs: TrainingHistory())
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    vector = train_security_vector(model, tokenizer, world.vector_examples(4), training=FAST)
    result = guarded_finetune(model, tokenizer, world.fact_task(), [vector], training=FAST)
    assert torch.equal(torch.rand(4), expected)
    # and the seed still decides the init: the same seed gives the same task adapter, another seed another
    again = guarded_finetune(
        build_tiny_model_and_tokenizer(seed=0)[0], tokenizer, world.fact_task(), [vector], training=FAST
    )
    other = guarded_finetune(
        build_tiny_model_and_tokenizer(seed=0)[0],
        tokenizer,
        world.fact_task(),
        [vector],
        training=TrainingConfig(**{**FAST.to_dict(), "seed": 1}),
    )
    a, b, c = (adapter_state(r.model, TASK_ADAPTER) for r in (result, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _response_gain(model, vector, tokenizer, rows) -> float:
    """Mean over rows of (response loss with the vector off) - (with it on), nats per token."""
    from secvec_core.data import collate, pad_token_id, to_examples, tokenize_examples
    from secvec_core.training import row_response_loss

    peft_model = vector.attach(copy.deepcopy(model))
    activate(peft_model, [vector.name])
    peft_model.eval()
    batch = collate(tokenize_examples(tokenizer, to_examples(rows), 32, "truncate"), pad_token_id(tokenizer))
    with torch.no_grad():
        on = row_response_loss(peft_model, batch)
        with peft_model.disable_adapter():
            off = row_response_loss(peft_model, batch)
    return float((off - on).mean())


def test_anchor_hinge_is_zero_for_an_untrained_vector_and_positive_once_it_lowers_the_loss(aligned, world):
    """A fresh LoRA (B = 0) changes no logit, so the hinge is exactly zero; a vector trained on the same rows
    lowers their loss, and the hinge then equals that drop (every row drops, so relu passes all of it)."""
    from secvec_core.data import collate, pad_token_id, to_examples, tokenize_examples
    from secvec_core.vectors import _anchor_hinge

    model, tokenizer = aligned
    rows = world.vector_examples(8)
    batch = collate(tokenize_examples(tokenizer, to_examples(rows), 32, "truncate"), pad_token_id(tokenizer))
    c = SecurityVectorConfig()
    fresh = attach_adapter(copy.deepcopy(model), "probe", lora_config(c.rank, c.alpha, c.dropout, c.target_modules))
    activate(fresh, ["probe"])
    fresh.eval()
    with torch.no_grad():
        assert float(_anchor_hinge(fresh, batch)) == 0.0
    vec = train_security_vector(model, tokenizer, rows, SecurityVectorConfig(), FAST)
    trained = vec.attach(copy.deepcopy(model))
    activate(trained, [vec.name])
    trained.eval()
    gain = _response_gain(model, vec, tokenizer, rows)
    with torch.no_grad():
        hinge = float(_anchor_hinge(trained, batch))
    assert gain > 0.5, gain
    assert hinge == pytest.approx(gain, rel=1e-4), (hinge, gain)


def test_anchor_keeps_the_vector_from_lowering_the_anchored_answers(aligned, world):
    """The hinge must change the vector: with its own rows as the anchor at weight 4 (each nat the vector takes
    off costs four), it lowers their loss by at most a quarter of what the same vector does without it, over two
    seeds; the metadata records the anchor."""
    model, tokenizer = aligned
    rows = world.vector_examples(10)
    base = {"learning_rate": 3e-3, "max_steps": 20, "batch_size": 10, "max_length": 32, "target_loss": None}
    for seed in (0, 1):
        training = TrainingConfig(**base, seed=seed)
        free = train_security_vector(model, tokenizer, rows, SecurityVectorConfig(), training)
        held = train_security_vector(
            model, tokenizer, rows, SecurityVectorConfig(), training, anchor=rows, anchor_weight=4.0
        )
        gains = {k: _response_gain(model, v, tokenizer, rows) for k, v in (("free", free), ("held", held))}
        assert gains["free"] > 1.0 and gains["held"] <= 0.25 * gains["free"], (seed, gains)
        assert held.metadata["anchor_weight"] == 4.0 and held.metadata["num_anchor_examples"] == 10
        assert free.metadata["anchor_weight"] == 0.0 and free.metadata["num_anchor_examples"] == 0
    with pytest.raises(ValueError, match="anchor_weight must be positive"):
        train_security_vector(model, tokenizer, rows, SecurityVectorConfig(), training, anchor=rows, anchor_weight=0)
