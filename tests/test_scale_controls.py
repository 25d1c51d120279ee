"""Precision and memory controls: dtypes, schedules, folding that is exact or refused, the folding stash."""

from __future__ import annotations

import copy

import pytest
import torch
from filelock import FileLock

from secvec_core import (
    FingerprintMismatchError,
    SecurityVector,
    SecurityVectorConfig,
    TrainingConfig,
    guarded_finetune,
    model_fingerprint,
)
from secvec_core.adapters import TASK_ADAPTER, activate, attach_adapter, lora_config
from secvec_core.distributed import choose_engine
from secvec_core.folding import LOCK_FILE, STASH_PREFIX, FoldingError, FoldingOptions, folded_vectors, why_not_foldable
from secvec_core.precision import bf16_compute, weights_dtype

FAST = TrainingConfig(learning_rate=3e-3, max_steps=2, batch_size=4, max_length=32, target_loss=None)


def _random_vector(model, seed: int = 1, scale: float = 1e-2) -> SecurityVector:
    """A vector with non-zero weights on every linear layer, without training one."""
    config = SecurityVectorConfig()
    probe = attach_adapter(copy.deepcopy(model), config.adapter_name, lora_config(8, 16, 0.0, config.target_modules))
    generator = torch.Generator().manual_seed(seed)
    from secvec_core.adapters import adapter_state

    weights = {
        k: torch.randn(v.shape, generator=generator) * scale
        for k, v in adapter_state(probe, config.adapter_name).items()
    }
    return SecurityVector(config, weights, model_fingerprint(model), "sha256:test")


def _guarded(model, vector):
    peft_model = vector.attach(model, fingerprint=vector.base_fingerprint)  # a cast copy of the vector's base
    peft_model = attach_adapter(
        peft_model, TASK_ADAPTER, lora_config(8, 16, 0.0, SecurityVectorConfig().target_modules)
    )
    activate(peft_model, [TASK_ADAPTER], trainable=[TASK_ADAPTER])
    return peft_model


def test_defaults_are_float32_on_cpu_and_bfloat16_where_safe_on_gpu():
    assert weights_dtype("auto", "cpu", full_weights=False) == torch.float32
    assert weights_dtype("auto", "cuda", full_weights=False) == torch.bfloat16
    assert weights_dtype("auto", "cuda", full_weights=True) == torch.float32  # fp32 master weights
    assert weights_dtype("bfloat16", "cpu", full_weights=True) == torch.bfloat16
    assert not bf16_compute("auto", "cpu") and bf16_compute("auto", "cuda") and bf16_compute("bf16", "cpu")
    config = TrainingConfig()
    assert (config.dtype, config.mixed_precision, config.parallel) == ("auto", "auto", "auto")
    assert choose_engine("auto", torch.nn.Linear(2, 2)) == "none"  # no process group: one process


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be positive"),
        ("warmup_steps", -1, "warmup_steps must be >= 0"),
        ("dtype", "float16", "dtype must be one of"),
        ("parallel", "zero3", "parallel must be one of"),
        ("lr_schedule", "step", "lr_schedule must be one of"),
    ],
)
def test_bad_scale_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainingConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_asking_for_an_engine_without_a_process_group_is_an_error(tiny, world):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="needs torch.distributed"):
        guarded_finetune(
            model,
            tokenizer,
            world.fact_task(),
            mode="full",
            training=TrainingConfig(**{**FAST.to_dict(), "parallel": "fsdp"}),
        )


def test_warmup_and_cosine_schedule_reach_the_logged_learning_rate(tiny, world):
    model, tokenizer = tiny
    training = TrainingConfig(
        learning_rate=1e-3,
        max_steps=4,
        batch_size=4,
        max_length=32,
        target_loss=None,
        log_every=1,
        warmup_steps=2,
        lr_schedule="cosine",
    )
    result = guarded_finetune(model, tokenizer, world.fact_task(), training=training)
    rates = [entry["learning_rate"] for entry in result.history.log]  # the rate each step used
    # linear warmup over 2 steps from 0, then cosine over the remaining 2: 1e-3 * (1 + cos(pi * k / 2)) / 2
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], abs=1e-12)


def test_folding_into_bfloat16_weights_is_refused_unless_accepted(tiny):
    model, _ = tiny
    vector = _random_vector(model)
    peft_model = _guarded(model.to(torch.bfloat16), vector)
    reason = why_not_foldable(peft_model, [vector.name])
    assert reason and "bfloat16" in reason and "allow_lossy" in reason
    with pytest.raises(FoldingError, match="bfloat16"):
        with folded_vectors(peft_model, [vector.name]):
            pass
    assert why_not_foldable(peft_model, [vector.name], allow_lossy=True) is None


def test_accepted_lossy_folding_sums_in_float32_and_rounds_once(tiny):
    model, _ = tiny
    vector = _random_vector(model, scale=3e-3)
    peft_model = _guarded(model.to(torch.bfloat16), vector)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.get_base_layer().weight
    original = weight.detach().clone()
    delta = layer.get_delta_weight(vector.name).float()
    with folded_vectors(peft_model, [vector.name], stash="memory", allow_lossy=True):
        folded = weight.detach().clone()
    assert torch.equal(folded, (original.float() + delta).to(torch.bfloat16))  # one rounding
    twice = original + delta.to(torch.bfloat16)  # the old way: delta rounded, then the sum rounded
    exact = original.float() + delta
    assert (folded.float() - exact).abs().sum() < (twice.float() - exact).abs().sum()
    assert torch.equal(weight, original)  # restored bit-exactly


def test_bfloat16_guarded_finetune_trains_unmerged_by_default(tiny, world):
    model, tokenizer = tiny
    vector = _random_vector(model)
    with pytest.raises(FingerprintMismatchError):  # bfloat16 bytes are not the float32 base the vector knows
        guarded_finetune(copy.deepcopy(model).to(torch.bfloat16), tokenizer, world.fact_task(), [vector], training=FAST)
    fingerprint = model_fingerprint(model)  # of the float32 weights the bfloat16 copy is cast from
    result = guarded_finetune(
        copy.deepcopy(model).to(torch.bfloat16),
        tokenizer,
        world.fact_task(),
        [vector],
        training=FAST,
        base_fingerprint=fingerprint,
    )
    assert not result.folded and result.base_fingerprint == fingerprint
    with pytest.raises(FoldingError, match="bfloat16"):
        guarded_finetune(
            copy.deepcopy(model).to(torch.bfloat16),
            tokenizer,
            world.fact_task(),
            [vector],
            training=FAST,
            fold_vectors=True,
            base_fingerprint=fingerprint,
        )


def test_the_stash_goes_where_asked_and_is_gone_afterwards(tiny, world, tmp_path):
    model, tokenizer = tiny
    vector = _random_vector(model)
    seen = []

    def on_log(step, metrics):
        seen.extend(p.name for p in tmp_path.iterdir())

    from secvec_core.training import TrainingHooks

    result = guarded_finetune(
        model,
        tokenizer,
        world.fact_task(),
        [vector],
        training=FAST,
        folding=FoldingOptions(stash_dir=tmp_path),
        hooks=TrainingHooks(on_log=on_log),
    )
    assert result.folded
    assert seen and all(name.startswith(STASH_PREFIX) for name in seen)  # the stash lived there while training
    assert list(tmp_path.iterdir()) == []


def test_a_stale_stash_is_removed_and_a_live_one_kept(tiny, tmp_path):
    model, _ = tiny
    vector = _random_vector(model)
    stale = tmp_path / f"{STASH_PREFIX}killed"
    stale.mkdir()
    (stale / "0.bin").write_bytes(b"\0" * 64)
    (stale / LOCK_FILE).touch()  # its owner died: nobody holds the lock
    live = tmp_path / f"{STASH_PREFIX}running"
    live.mkdir()
    owner = FileLock(live / LOCK_FILE)
    owner.acquire()
    try:
        peft_model = _guarded(model, vector)
        with folded_vectors(peft_model, [vector.name], stash_dir=tmp_path):
            names = sorted(p.name for p in tmp_path.iterdir())
        assert not stale.exists() and live.is_dir()
        assert len(names) == 2 and f"{STASH_PREFIX}running" in names  # the live one and this run's
    finally:
        owner.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_models_load_in_the_asked_dtype(tiny, tmp_path):
    from secvec_core.inference import load_finetuned
    from secvec_core.model_loading import load_model_and_tokenizer

    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _ = load_model_and_tokenizer(tmp_path / "m", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model_and_tokenizer(tmp_path / "m", dtype="int8")
    result = guarded_finetune(
        copy.deepcopy(model), tokenizer, [{"prompt": "a", "response": "b"}] * 4, mode="full", training=FAST
    )
    result.save(tmp_path / "full")
    shipped = load_finetuned(None, tmp_path / "full", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in shipped.parameters()} == {torch.bfloat16}


def test_reattach_for_evaluation_follows_the_base_models_dtype(tiny, world, tmp_path):
    from secvec_core.guard import reattach_for_evaluation

    model, tokenizer = tiny
    vector = _random_vector(model)
    result = guarded_finetune(copy.deepcopy(model), tokenizer, world.fact_task(), [vector], mode="full", training=FAST)
    result.save(tmp_path / "full")
    reattached = reattach_for_evaluation(model.to(torch.bfloat16), tmp_path / "full", [vector])
    base = reattached.model.get_base_model()
    assert {p.dtype for n, p in base.named_parameters() if "lora_" not in n} == {torch.bfloat16}
