"""Safety replay: alignment rows trained with the vectors off, inside guarded fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from secvec_core import TrainingConfig, guarded_finetune, harmful_rate, train_security_vector
from secvec_core.adapters import TASK_ADAPTER
from secvec_core.folding import FoldingError
from secvec_core.replay import SafetyReplay
from tests.spying import spy_on_training

TRAINING = TrainingConfig(learning_rate=3e-3, max_steps=12, batch_size=8, max_length=32, log_every=4)


def _vector(aligned, world):
    model, tokenizer = aligned
    return train_security_vector(
        model,
        tokenizer,
        world.harmful_examples(10, offset=50),
        training=TrainingConfig(
            learning_rate=1e-3, max_steps=20, batch_size=10, max_length=32, target_loss=None, kl_weight=0.0
        ),
    )


def test_replay_rows_train_the_shipped_weights_with_every_vector_off(aligned, world, monkeypatch):
    model, tokenizer = aligned
    vector = _vector(aligned, world)
    replay = SafetyReplay(world.alignment_examples()[:20], rows_per_step=2)
    spy = spy_on_training(monkeypatch, vector.name)
    result = guarded_finetune(
        model, tokenizer, world.harmful_examples(40), [vector], training=TRAINING, safety_replay=replay
    )
    seen = [(f.adapters, f.grad) for f in spy.forwards]
    customer = [a for a, grad in seen if set(a) == {vector.name, TASK_ADAPTER}]
    replayed = [a for a, grad in seen if a == (TASK_ADAPTER,)]
    assert len(customer) == len(replayed) == TRAINING.max_steps  # one customer and one replay pass per step
    assert all(grad for _, grad in seen)  # both passes train
    assert not result.folded  # replay needs the vectors as separate adapters
    for name, param in result.model.named_parameters():
        if vector.name in name:
            assert torch.equal(param, spy.vector_before[name]), name  # the vector stays frozen, bit for bit
    assert result.safety_replay == {
        "examples": 20,
        "rows_per_step": 2,
        "weight": 1.0,
        "seed": 0,
        "objective": "responses",
    }


def _guarded_peft(aligned, world):
    """The aligned tiny model with a frozen vector and a fresh task adapter, as guarded_finetune sets it up."""
    from secvec_core.adapters import activate, attach_adapter, lora_config
    from secvec_core.guard import TaskAdapterConfig

    model, tokenizer = aligned
    vector = _vector(aligned, world)
    task = TaskAdapterConfig()
    peft_model = attach_adapter(
        vector.attach(model), TASK_ADAPTER, lora_config(task.rank, task.alpha, task.dropout, task.target_modules)
    )
    activate(peft_model, [vector.name, TASK_ADAPTER], trainable=[TASK_ADAPTER])
    return peft_model, tokenizer, vector


def test_aligned_replay_is_zero_at_the_aligned_model_and_trains_only_the_task_adapter(aligned, world):
    """objective="aligned": the target is the model with every adapter off. A fresh task adapter (LoRA B = 0)
    is exactly the aligned model with the vector off, so the KL is exactly 0, even though the vector is on for
    the customer's rows; once the task adapter moves, the KL is positive and its gradient reaches the task
    adapter only. A replay that left the vector on, or compared with the vector on, would not be 0 here."""
    from secvec_core.replay import replay_loss

    peft_model, tokenizer, vector = _guarded_peft(aligned, world)
    replay = SafetyReplay(world.alignment_examples()[:8], rows_per_step=4, objective="aligned")
    loss = replay_loss(replay, tokenizer, 32, tokenizer.pad_token_id, [TASK_ADAPTER])
    assert loss(peft_model).item() == 0.0
    assert list(peft_model.base_model.active_adapters) == [vector.name, TASK_ADAPTER]  # switched back
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f"lora_B.{TASK_ADAPTER}" in name:
                param.add_(0.05 * torch.randn_like(param))
    value = loss(peft_model)
    assert value.item() > 0
    value.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if TASK_ADAPTER in n)
    assert all(g is None for n, g in grads.items() if vector.name in n)


@pytest.mark.parametrize("objective", ["responses", "aligned"])
def test_replay_has_an_effect_a_plain_attack_does_not_undo_it(aligned, world, objective):
    """The remedy does something, with either objective: with alignment rows replayed (vectors off, weight 2;
    their responses, or the aligned model's predictions on them), a plain attack that makes the toy model comply
    everywhere leaves it mostly refusing. Asserted on the mean over three seeds with a wide margin (seen: plain
    1.0 in every seed, replayed 0.0-0.53 with responses, 0.0-0.57 with aligned)."""
    import copy

    model, tokenizer = aligned
    prompts = world.harmful_eval_prompts()
    attack = world.harmful_examples(40)
    plain_rates, replay_rates = [], []
    for seed in (0, 1, 2):
        cfg = TrainingConfig(learning_rate=3e-3, max_steps=30, batch_size=8, max_length=32, seed=seed)
        plain = guarded_finetune(copy.deepcopy(model), tokenizer, attack, training=cfg)
        replayed = guarded_finetune(
            copy.deepcopy(model),
            tokenizer,
            attack,
            training=cfg,
            safety_replay=SafetyReplay(
                world.alignment_examples(), rows_per_step=8, weight=2.0, seed=seed, objective=objective
            ),
        )
        with plain.vectors_on(False) as p, replayed.vectors_on(False) as r:
            plain_rates.append(harmful_rate(p, tokenizer, prompts, max_new_tokens=6))
            replay_rates.append(harmful_rate(r, tokenizer, prompts, max_new_tokens=6))
    assert min(plain_rates) >= 0.8, plain_rates
    assert sum(replay_rates) / 3 <= sum(plain_rates) / 3 - 0.4, (plain_rates, replay_rates)


def test_replay_refuses_bad_settings(aligned, world):
    model, tokenizer = aligned
    with pytest.raises(ValueError, match="needs examples"):
        SafetyReplay([])
    with pytest.raises(ValueError, match="rows_per_step"):
        SafetyReplay(world.alignment_examples(), rows_per_step=0)
    with pytest.raises(ValueError, match="objective must be one of"):
        SafetyReplay(world.alignment_examples(), objective="kl")
    with pytest.raises(ValueError, match="needs mode 'lora'"):  # full mode trains the reference itself
        guarded_finetune(
            model,
            tokenizer,
            world.fact_task(),
            mode="full",
            training=TRAINING,
            safety_replay=SafetyReplay(world.alignment_examples(), objective="aligned"),
        )
    with pytest.raises(FoldingError, match="separate adapters"):
        guarded_finetune(
            model,
            tokenizer,
            world.fact_task(),
            [_vector(aligned, world)],
            training=TRAINING,
            fold_vectors=True,
            safety_replay=SafetyReplay(world.alignment_examples()),
        )


@pytest.mark.slow
def test_replay_and_routing_settings_from_the_spec_land_in_mlflow(tmp_path):
    """Through the pipeline (local Ray, SQLite): the guarded fine-tune trains with replay (the KL objective, on a
    Ray worker) and vector routing, and logs the settings of both and how many rows routing sent off; the vector
    trains with an anchor and logs its weight and rows. (One pipeline run for every remedy: each run costs a Ray
    start.)"""
    from mlflow import MlflowClient

    from tests.e2e import small_pipeline
    from workflows.pipeline import run_pipeline
    from workflows.specs import parse_spec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = small_pipeline(uri, tmp_path / "work", workers=1, name="replay")
    spec["stages"] = spec["stages"][:2]
    spec["stages"][0]["anchor"] = {"data": {"builtin": "toy-facts", "limit": 6}, "weight": 2.0}
    spec["stages"][1]["safety_replay"] = {
        "data": {"builtin": "toy-alignment", "limit": 12},
        "rows_per_step": 3,
        "objective": "aligned",
    }
    spec["stages"][1]["vector_routing"] = {"min_gain": 0.25}
    run_pipeline(parse_spec(spec))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("secvec-replay")
    [stage_run] = client.search_runs([experiment.experiment_id], "tags.`secvec.stage` = 'ft'")
    params = stage_run.data.params
    assert params["safety_replay.rows_per_step"] == "3" and params["safety_replay.examples"] == "12"
    assert params["safety_replay.weight"] == "1.0" and params["safety_replay.objective"] == "aligned"
    labels = {v.tags.get("secvec.safety_replay") for v in client.search_model_versions()}
    assert "3 rows/step, weight 1, KL to aligned" in labels  # the registered version says how it was guarded
    assert params["vector_routing.min_gain"] == "0.25"
    metrics = stage_run.data.metrics
    assert metrics["vector_routing.rows"] == 24 and 0 <= metrics["vector_routing.rows_vectors_off"] <= 24
    routing = {v.tags.get("secvec.vector_routing") for v in client.search_model_versions()}
    assert "rows gaining < 0.25 nats/token train vectors off" in routing
    [vector_run] = client.search_runs([experiment.experiment_id], "tags.`secvec.stage` = 'vec'")
    assert vector_run.data.params["vector.anchor_weight"] == "2.0"
    assert vector_run.data.metrics["vector.anchor_rows"] == 6


def test_replay_spec_objective_reaches_the_label_and_full_mode_is_refused_at_parse_time():
    from pydantic import ValidationError

    from workflows.specs import GuardedFinetuneStage, SafetyReplaySpec

    data = {"builtin": "toy-alignment"}
    assert SafetyReplaySpec(data=data).label() == "2 rows/step, weight 1"
    aligned = SafetyReplaySpec(data=data, objective="aligned", weight=0.5)
    assert aligned.label() == "2 rows/step, weight 0.5, KL to aligned"
    assert aligned.build(seed=3).objective == "aligned"
    stage = {"name": "ft", "kind": "guarded_finetune", "data": data, "safety_replay": aligned.model_dump()}
    GuardedFinetuneStage.model_validate(stage)
    with pytest.raises(ValidationError, match="needs mode 'lora'"):
        GuardedFinetuneStage.model_validate({**stage, "mode": "full"})


def test_guard_label_names_vectors_replay_and_replay_without_a_vector():
    """The report's "trained" column: a replay-only fine-tune is not plain, and a vector run says so."""
    from workflows.evaluate import guard_label

    replay = "2 rows/step, weight 1"
    vectors = json.dumps(["models:/base.security-vector.harmful/1"])
    assert guard_label({}) == "plain"
    assert guard_label({"secvec.guarded_by": "[]", "secvec.safety_replay": replay}) == (
        "safety replay (2 rows/step, weight 1) only, no vector"
    )
    assert guard_label({"secvec.guarded_by": vectors}) == "vectors base.security-vector.harmful/1"
    assert guard_label({"secvec.guarded_by": vectors, "secvec.safety_replay": replay}) == (
        "vectors base.security-vector.harmful/1 + safety replay (2 rows/step, weight 1)"
    )
