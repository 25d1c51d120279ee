"""Training on torch's engines: 2 gloo workers (DDP for adapters, FSDP2 for full weights) against one process.

Why the tolerances: both runs see the same global batch, and every rank's loss is weighted by its share
of the global batch's response tokens, so they compute the same gradient; only the order of float32
additions differs (one batch of 8 vs two of 4, plus the all-reduce). Gradient norms then agree to a
few float32 ulps of accumulated rounding (rtol 1e-4 is ~1000x that). AdamW divides each coordinate's
update by its own gradient's magnitude, so a coordinate's update differs by that same relative rounding,
unless its gradient is within Adam's eps (1e-8) of zero; with lr 1e-3 and 3 steps the adapters agree to
atol 1e-5 (1% of one step's update). The safety replay draws the same rows on every rank (same seed), so
its averaged gradient is the single process's too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from secvec_core import SecurityVectorConfig, TrainingConfig, build_tiny_model_and_tokenizer, train_security_vector
from secvec_core.toy_world import ToyWorld

TRAINING = dict(learning_rate=1e-3, max_steps=3, batch_size=8, max_length=32, target_loss=None, log_every=1, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replay_loss(names, rows, pad):
    """A second forward in the same step with the vectors switched off by peft's adapter switching (the
    shape of the lead's safety-replay term): the task adapter must keep its gradient."""
    from secvec_core.adapters import TASK_ADAPTER, activate
    from secvec_core.data import collate
    from secvec_core.training import response_loss, to_device

    def extra(model):
        activate(model, [TASK_ADAPTER], trainable=[TASK_ADAPTER])
        try:
            return 0.5 * response_loss(model, to_device(collate(rows[:2], pad), model))
        finally:
            activate(model, [*names, TASK_ADAPTER], trainable=[TASK_ADAPTER])

    return extra


SCENARIOS = {  # name: (what trains, extra TrainingConfig options)
    "lora": ("lora", {}),
    "lora-checkpointing": ("lora", {"gradient_checkpointing": True}),
    "lora-accumulation": ("lora", {"gradient_accumulation_steps": 2}),
    "full": ("full", {}),
    "lora-safety-replay": ("replay", {"gradient_checkpointing": True}),
}


def _scenario(name: str, out: Path, vector_dir: str) -> dict:
    """Train one scenario in this process (one rank of a group, or alone); every rank returns its view."""
    from secvec_core import guarded_finetune
    from secvec_core.adapters import TASK_ADAPTER, activate, attach_adapter, lora_config
    from secvec_core.data import to_examples, tokenize_examples
    from secvec_core.distributed import gathered_state_dict
    from secvec_core.training import train_loop
    from secvec_core.vectors import SecurityVector

    kind, options = SCENARIOS[name]
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    data = ToyWorld(seed=0).harmful_examples(40)
    vector = SecurityVector.load(vector_dir)
    training = TrainingConfig(**TRAINING, **options)
    result: dict = {}
    if kind == "lora":
        torch.manual_seed(training.seed)
        peft_model = vector.attach(model)
        peft_model = attach_adapter(peft_model, TASK_ADAPTER, lora_config(8, 16, 0.0, ("q_proj", "v_proj")))
        activate(peft_model, [vector.name, TASK_ADAPTER], trainable=[TASK_ADAPTER])
        rows = tokenize_examples(tokenizer, to_examples(data), 32)
        history = train_loop(
            peft_model,
            rows,
            tokenizer.pad_token_id,
            training,
            extra_loss=_replay_loss([vector.name], rows, tokenizer.pad_token_id),
        )
        params = dict(peft_model.named_parameters())
        result["task"] = {n: p.detach().clone() for n, p in params.items() if f".{TASK_ADAPTER}." in n}
        result["vector"] = {n: p.detach().clone() for n, p in params.items() if f".{vector.name}." in n}
        result["base"] = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    elif kind == "replay":  # guarded_finetune's own safety replay (vectors off in a second forward)
        from secvec_core.replay import SafetyReplay

        replay = SafetyReplay(ToyWorld(seed=0).alignment_examples()[:20], rows_per_step=2)
        guarded = guarded_finetune(
            model, tokenizer, data, [vector], mode="lora", training=training, safety_replay=replay
        )
        history = guarded.history
        params = dict(guarded.model.named_parameters())
        result["task"] = {n: p.detach().clone() for n, p in params.items() if f".{TASK_ADAPTER}." in n}
        result["vector"] = {n: p.detach().clone() for n, p in params.items() if f".{vector.name}." in n}
        result["base"] = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    else:  # full weights, vector on and frozen
        guarded = guarded_finetune(model, tokenizer, data, [vector], mode="full", training=training)
        history = guarded.history
        result["vector"] = {
            n: p.detach().clone() for n, p in guarded.model.named_parameters() if f".{vector.name}." in n
        }
        result["full"] = gathered_state_dict(guarded.model)  # a collective under FSDP
        guarded.save(out / f"{name}.artifact")  # every rank calls it, rank 0 writes
    result["engine"] = history.engine
    result["grad_norms"] = [entry["grad_norm"] for entry in history.log]
    result["losses"] = [entry["loss"] for entry in history.log]
    return result


def _worker(rank: int, world: int, port: int, out: str, vector_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _scenario(name, Path(out), vector_dir) for name in SCENARIOS}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory) -> str:
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    vector = train_security_vector(
        model,
        tokenizer,
        ToyWorld(seed=0).harmful_examples(10),
        SecurityVectorConfig(),
        TrainingConfig(learning_rate=1e-3, max_steps=3, batch_size=8, max_length=32, target_loss=None),
    )
    return str(vector.save(tmp_path_factory.mktemp("vec") / "vector"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, vector_dir) -> tuple[dict, list[dict], Path]:
    """(single-process results, the 2 ranks' results, output folder), every scenario trained once."""
    out = tmp_path_factory.mktemp("ddp")
    single_out = out / "single"
    single_out.mkdir()
    single = {name: _scenario(name, single_out, vector_dir) for name in SCENARIOS}
    mp.start_processes(_worker, args=(2, _free_port(), str(out), vector_dir), nprocs=2, start_method="spawn")
    return single, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


def _assert_same_training(single: dict, ranks: list[dict]) -> None:
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(single["grad_norms"]), rtol=1e-4, atol=0)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["lora", "lora-checkpointing", "lora-accumulation", "lora-safety-replay"])
def test_ddp_two_workers_train_the_same_adapter_as_one_process(runs, scenario):
    all_single, all_ranks, _ = runs
    single, ranks = all_single[scenario], [r[scenario] for r in all_ranks]
    assert single["engine"] == "none" and all(r["engine"] == "ddp" for r in ranks)
    _assert_same_training(single, ranks)
    for r in ranks:
        for name, tensor in single["task"].items():
            torch.testing.assert_close(r["task"][name], tensor, rtol=0, atol=1e-5)
        # frozen parts bit-identical to the single run, which never trained them
        assert r["vector"].keys() == single["vector"].keys() and r["vector"]
        assert all(torch.equal(r["vector"][n], t) for n, t in single["vector"].items())
        assert all(torch.equal(r["base"][n], t) for n, t in single["base"].items())
    # the replicas agree exactly with each other (DDP keeps them in sync)
    assert all(torch.equal(ranks[0]["task"][n], ranks[1]["task"][n]) for n in ranks[0]["task"])


@pytest.mark.slow
def test_gradient_accumulation_and_checkpointing_match_the_plain_step(runs):
    single = runs[0]
    for variant in ("lora-checkpointing", "lora-accumulation"):
        _assert_same_training(single["lora"], [single[variant]])
        for name, tensor in single["lora"]["task"].items():
            torch.testing.assert_close(single[variant]["task"][name], tensor, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fsdp_two_workers_full_weights_match_one_process_and_keep_vectors_whole(runs, vector_dir):
    from safetensors.torch import load_file

    from secvec_core.inference import assert_no_vector
    from secvec_core.vectors import SecurityVector

    all_single, all_ranks, out = runs
    single, ranks = all_single["full"], [r["full"] for r in all_ranks]
    assert single["engine"] == "none" and all(r["engine"] == "fsdp" for r in ranks)
    _assert_same_training(single, ranks)
    assert ranks[1]["full"] == {}  # gathered to rank 0 only
    gathered = ranks[0]["full"]
    assert gathered.keys() == single["full"].keys()
    for name, tensor in single["full"].items():
        torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=1e-5)
    for r in ranks:  # the vectors were neither sharded nor trained
        assert r["vector"].keys() == single["vector"].keys() and r["vector"]
        assert all(torch.equal(r["vector"][n], t) for n, t in single["vector"].items())
    artifact = out / "full.artifact"
    assert_no_vector(artifact, [SecurityVector.load(vector_dir)])
    shipped = load_file(str(artifact / "model.safetensors"))
    expected = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in gathered.items()
        if "lora_" not in k
    }
    assert shipped and all(torch.equal(shipped[k], expected[k]) for k in shipped)
