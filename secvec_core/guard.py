"""Guarded fine-tuning: train on customer data with security vectors switched on and frozen."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from torch import nn

from secvec_core.adapters import (
    TASK_ADAPTER,
    activate,
    active_adapters,
    adapter_state,
    attach_adapter,
    lora_config,
)
from secvec_core.artifacts import (
    ADAPTER_WEIGHTS,
    ARTIFACT_FORMAT,
    ARTIFACT_METADATA,
    VectorLeakError,
    atomic_directory,
    save_tensors,
    sha256_file,
    write_json,
)
from secvec_core.config import DEFAULT_TARGET_MODULES, TrainingConfig
from secvec_core.data import Example, dataset_hash, pad_token_id, to_examples, tokenize_examples
from secvec_core.distributed import gathered_state_dict, is_sharded, rank_and_world
from secvec_core.fingerprint import model_fingerprint
from secvec_core.folding import FoldingError, FoldingOptions, folded_vectors, why_not_foldable
from secvec_core.replay import SafetyReplay, only_adapters, replay_loss
from secvec_core.routing import VectorRouting, route_rows
from secvec_core.seeding import seeded
from secvec_core.training import TrainingHistory, TrainingHooks, train_loop
from secvec_core.vectors import SecurityVector

logger = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_METADATA",
    "GuardedFinetuneResult",
    "TaskAdapterConfig",
    "guarded_finetune",
    "reattach_for_evaluation",
]
Mode = Literal["lora", "full"]


@dataclass
class TaskAdapterConfig:
    """The fresh adapter trained in ``lora`` mode (the thing that ships)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES


@dataclass
class GuardedFinetuneResult:
    """Outcome of guarded fine-tuning.

    ``model`` still holds the vectors (for the on/off transfer-gap evaluation); ``save`` writes only
    what ships: the task adapter (``lora``) or the full weights (``full``), never a vector.
    """

    mode: Mode
    model: nn.Module
    vector_names: list[str]
    base_fingerprint: str
    data_hash: str
    history: TrainingHistory
    task_config: TaskAdapterConfig | None = None
    vectors: list[dict] = field(default_factory=list)
    folded: bool = False  # trained with the vectors folded into the (since restored) base weights
    safety_replay: dict | None = None  # SafetyReplay.describe() when replay was on
    vector_routing: dict | None = None  # RoutingDecision.describe() when routing was on

    @contextlib.contextmanager
    def vectors_on(self, on: bool = True) -> Iterator[nn.Module]:
        """Run the fine-tuned model with the vectors switched on (``True``) or off (inference, ``False``)."""
        if not isinstance(self.model, PeftModel):  # plain full fine-tune without vectors
            yield self.model
            return
        if self.mode == "lora":
            names = [*self.vector_names, TASK_ADAPTER] if on else [TASK_ADAPTER]
        else:
            names = list(self.vector_names) if on else []
        with active_adapters(self.model, names) as m:
            yield m

    def merged_into_base(self) -> GuardedFinetuneResult:
        """The task adapter added into the base weights: a ``full`` result whose ``save`` writes full weights.

        For producing a new base (alignment by LoRA, as the paper's recipe does): the low-rank update moves
        the base less than full-weights training at the same steps, which keeps more of the original model.
        Refused with vectors attached: a merge would put them into the shipped weights for good.
        """
        if self.mode != "lora":
            raise ValueError("merged_into_base needs a lora result (a full result is already its base)")
        if self.vector_names:
            raise VectorLeakError(
                f"refusing to merge with vectors {self.vector_names} attached: they would ship inside the base weights"
            )
        if is_sharded(self.model):
            raise ValueError(
                "merged_into_base cannot merge a sharded (FSDP) model; train the LoRA alignment with "
                "ddp, or use full-weights alignment"
            )
        merged = self.model.merge_and_unload()
        return GuardedFinetuneResult(
            mode="full",
            model=merged,
            vector_names=[],
            base_fingerprint=self.base_fingerprint,
            data_hash=self.data_hash,
            history=self.history,
            task_config=None,
            safety_replay=self.safety_replay,
        )

    def shipped_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that ship. No vector weights, by construction and by check.

        A vector merged into the base weights (peft's ``merge_adapter``) would ship inside full weights
        with no key or tensor to betray it, and would make every "vector off" evaluation wrong: refused.
        """
        merged = sorted(
            {a for m in self.model.modules() for a in getattr(m, "merged_adapters", ()) if a in self.vector_names}
        )
        if merged:
            raise VectorLeakError(
                f"vectors {merged} are merged into the base weights; a vector must never be "
                "merged (unmerge it, or retrain from the unmerged result)"
            )
        if self.mode == "lora" and is_sharded(self.model):  # LoRA under parallel="fsdp": gather first
            from peft.utils import get_peft_model_state_dict

            gathered = gathered_state_dict(self.model)
            state = (
                get_peft_model_state_dict(self.model, state_dict=gathered, adapter_name=TASK_ADAPTER)
                if gathered
                else {}
            )
        elif self.mode == "lora":
            state = adapter_state(self.model, TASK_ADAPTER)
        else:  # gathered from the shards after FSDP training: a collective, rank 0 gets the tensors
            prefix = "base_model.model." if isinstance(self.model, PeftModel) else ""
            state = {
                k.removeprefix(prefix).replace(".base_layer", ""): v
                for k, v in gathered_state_dict(self.model).items()
                if "lora_" not in k
            }
        bad = [k for k in state if any(name in k for name in self.vector_names)]
        if bad:
            raise VectorLeakError(f"vector weights in the shipped state: {bad[:3]}")
        return state

    def save(self, directory: str | Path) -> Path:
        """Write the shipped artifact atomically (safetensors + metadata naming the guarding vectors).

        After sharded (FSDP) training every rank must call it: the weights are gathered, rank 0 writes."""
        directory = Path(directory)
        state = self.shipped_state_dict()
        if is_sharded(self.model) and rank_and_world()[0] != 0:
            return directory  # sharded: every rank gathers, rank 0 writes
        with atomic_directory(directory) as tmp:
            if self.mode == "lora":
                c = self.task_config
                lora_config(c.rank, c.alpha, c.dropout, c.target_modules).save_pretrained(str(tmp))
                save_tensors(tmp / ADAPTER_WEIGHTS, state)
                weights_file = ADAPTER_WEIGHTS
            else:
                base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
                base.config.save_pretrained(str(tmp))
                if getattr(base, "generation_config", None) is not None:
                    base.generation_config.save_pretrained(str(tmp))
                weights_file = "model.safetensors"
                save_tensors(tmp / weights_file, _untie(state, base))
            write_json(
                tmp / ARTIFACT_METADATA,
                {
                    "format": ARTIFACT_FORMAT,
                    "mode": self.mode,
                    "base_fingerprint": self.base_fingerprint,
                    "data_hash": self.data_hash,
                    "guarded_by": self.vectors,
                    "weights_file": weights_file,
                    "weights_sha256": sha256_file(tmp / weights_file),
                    "steps": self.history.steps,
                    "safety_replay": self.safety_replay,
                    "vector_routing": self.vector_routing,
                },
            )
        return directory


def _untie(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; drop tied duplicates the model re-ties on load."""
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return {k: v.clone() for k, v in state.items()}


def guarded_finetune(
    model: nn.Module,
    tokenizer,
    data: Sequence[Example | dict],
    vectors: Sequence[SecurityVector | str | Path] = (),
    mode: Mode = "lora",
    training: TrainingConfig | None = None,
    *,
    task_adapter: TaskAdapterConfig | None = None,
    hooks: TrainingHooks | None = None,
    allow_fingerprint_mismatch: bool = False,
    fold_vectors: bool | None = None,
    folding: FoldingOptions | None = None,
    parallelize=None,
    base_fingerprint: str | None = None,
    safety_replay: SafetyReplay | None = None,
    vector_routing: VectorRouting | None = None,
) -> GuardedFinetuneResult:
    """Fine-tune on ``data`` with every vector switched on and frozen.

    ``mode="lora"`` trains a fresh task adapter (the base stays frozen); ``mode="full"`` trains the
    base weights. With no vectors this is plain fine-tuning (the baseline). ``model`` is modified in
    place (peft injects adapter layers); reload the base for unrelated work. Vector-only strength
    controls (``target_loss``, ``kl_weight``) are ignored here.

    ``fold_vectors`` (``lora`` mode; the free guard, see :mod:`secvec_core.folding`): while the task
    adapter trains, the frozen vectors are added to a stashed copy of the base weights instead of running
    as extra LoRA paths: same function and task gradients up to float32 rounding, at the cost of plain
    fine-tuning. The original weights are restored bit-exactly (each checked against its sha256) before
    this function returns, so the result is the same as without folding: vectors attached,
    unmerged, and never in the base weights. ``None`` (default) folds whenever folding is exact and
    otherwise trains unmerged; ``True`` demands it (raises ``FoldingError`` in ``full`` mode, with vector
    dropout > 0, LoRA variants, tied weights, bfloat16 weights); ``False`` never folds. ``folding`` sets the
    stash (kind and directory) and whether folding into bfloat16/float16 weights is accepted.
    ``parallelize``: the DDP wrapper for :func:`~secvec_core.training.train_loop` (Ray Train's ``prepare_model``).
    ``base_fingerprint``: the fingerprint of the float32 weights ``model`` was cast from (a bfloat16 copy on a
    GPU has other bytes, but is the same base the vectors were trained against); computed when not given.

    ``safety_replay`` (:mod:`secvec_core.replay`): every step also trains the shipped weights on a few
    alignment rows with the vectors **off**, against erosion of alignment by the customer's data and
    over-refusal learned in the vector's blind spots. Replay needs the vectors as separate adapters, so
    it trains unmerged (folding off).

    ``vector_routing`` (:mod:`secvec_core.routing`): rows whose loss the vectors lower by less than
    ``min_gain`` nats per token train with the vectors off, so the task they teach holds as shipped; the
    rows the vectors explain keep the guard. Also trains unmerged.
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    if fold_vectors and mode != "lora":
        raise FoldingError(
            "fold_vectors=True needs mode='lora': in 'full' mode the base weights train, so a folded vector "
            "could only be removed by subtraction (not bit-exact) and weight decay would act on base + vector; "
            "pass fold_vectors=None or False"
        )
    if isinstance(model, PeftModel):
        raise TypeError("guarded_finetune needs the plain base model; vectors are attached here")
    if safety_replay is not None and fold_vectors:
        raise FoldingError(
            "safety_replay runs the shipped weights with the vectors off, so the vectors must stay "
            "separate adapters: pass fold_vectors=None or False"
        )
    if vector_routing is not None and fold_vectors:
        raise FoldingError(
            "vector_routing trains some rows with the vectors off, so the vectors must stay "
            "separate adapters: pass fold_vectors=None or False"
        )
    if vector_routing is not None and not vectors:
        raise ValueError("vector_routing needs vectors: it decides which rows train with them off")
    training = training or TrainingConfig()
    examples = to_examples(data)
    loaded = [v if isinstance(v, SecurityVector) else SecurityVector.load(v) for v in vectors]
    names = [v.name for v in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"two vectors share an adapter name: {names}")
    fingerprint = base_fingerprint or model_fingerprint(model)
    peft_model: nn.Module = model
    task_adapter = task_adapter or TaskAdapterConfig()
    with seeded(training.seed):  # LoRA init: same adapter for the same seed, the caller's random stream untouched
        for vector in loaded:
            peft_model = vector.attach(
                peft_model, allow_fingerprint_mismatch=allow_fingerprint_mismatch, fingerprint=fingerprint
            )
        if mode == "lora":
            peft_model = attach_adapter(
                peft_model,
                TASK_ADAPTER,
                lora_config(task_adapter.rank, task_adapter.alpha, task_adapter.dropout, task_adapter.target_modules),
            )
    if mode == "lora":
        activate(peft_model, [*names, TASK_ADAPTER], trainable=[TASK_ADAPTER])
    elif isinstance(peft_model, PeftModel):
        activate(peft_model, names, trainable=[], train_base=True)
    else:
        for p in peft_model.parameters():
            p.requires_grad_(True)
    leaked = [n for n, p in peft_model.named_parameters() if p.requires_grad and any(f".{v}." in n for v in names)]
    if leaked:
        raise AssertionError(f"vector parameters would train: {leaked[:3]}")
    rows = tokenize_examples(tokenizer, examples, training.max_length, training.truncation)
    pad = pad_token_id(tokenizer)
    folding = folding or FoldingOptions()
    unmerged = safety_replay is not None or vector_routing is not None
    fold = _decide_folding(peft_model, names, mode, False if unmerged else fold_vectors, folding.allow_lossy)
    shipped = [TASK_ADAPTER] if mode == "lora" else []
    extra_loss = None
    if safety_replay is not None:
        extra_loss = replay_loss(safety_replay, tokenizer, training.max_length, pad, shipped)
    routing = None
    if vector_routing is not None:
        routing = route_rows(peft_model, rows, pad, vector_routing, [*names, *shipped], shipped)
        rows = routing.apply(rows)
        logger.info(
            "vector routing: %d of %d rows train with the vectors off (gain < %g nats/token)",
            sum(routing.vectors_off),
            len(rows),
            vector_routing.min_gain,
        )
    if fold:
        activate(peft_model, [TASK_ADAPTER], trainable=[TASK_ADAPTER])
        try:
            with folded_vectors(
                peft_model, names, stash=folding.stash, stash_dir=folding.stash_dir, allow_lossy=folding.allow_lossy
            ):
                history = train_loop(
                    peft_model,
                    rows,
                    pad,
                    training,
                    hooks=hooks,
                    description="guarded-finetune (folded)",
                    parallelize=parallelize,
                )
        finally:  # folded_vectors restored every folded weight and checked it against its sha256
            activate(peft_model, [*names, TASK_ADAPTER], trainable=[TASK_ADAPTER])
    else:
        history = train_loop(
            peft_model,
            rows,
            pad,
            training,
            hooks=hooks,
            extra_loss=extra_loss,
            description="guarded-finetune" if names else "finetune",
            parallelize=parallelize,
            vectors_off=lambda m: only_adapters(m, shipped),
        )
    return GuardedFinetuneResult(
        mode=mode,
        model=peft_model,
        vector_names=names,
        base_fingerprint=fingerprint,
        data_hash=dataset_hash(examples),
        history=history,
        task_config=task_adapter if mode == "lora" else None,
        vectors=[{"name": v.name, "behaviour": v.config.behaviour, "data_hash": v.data_hash} for v in loaded],
        folded=fold,
        safety_replay=safety_replay.describe() if safety_replay is not None else None,
        vector_routing=routing.describe() if routing is not None else None,
    )


def _decide_folding(
    model: nn.Module, names: Sequence[str], mode: Mode, fold_vectors: bool | None, allow_lossy: bool = False
) -> bool:
    if fold_vectors is False or mode != "lora" or not names:
        return False
    reason = why_not_foldable(model, names, allow_lossy=allow_lossy)
    if reason is None:
        return True
    if fold_vectors:
        raise FoldingError(f"fold_vectors=True, but the vectors cannot be folded exactly: {reason}")
    logger.info("training with unmerged vectors (not folded): %s", reason)
    return False


def reattach_for_evaluation(
    base_model: nn.Module,
    directory: str | Path,
    vectors: Sequence[SecurityVector] = (),
    *,
    base_fingerprint: str | None = None,
) -> GuardedFinetuneResult:
    """Rebuild a guarded model from a shipped artifact plus its vectors, for on/off evaluation.

    ``lora``: base + vectors + task adapter. ``full``: the fine-tuned weights + vectors (the vectors were
    trained on the pre-fine-tuning base, so their fingerprint check is skipped on purpose), loaded in the
    dtype and on the device of ``base_model`` (the worker's GPU, bfloat16), never as float32 on the CPU.
    ``base_fingerprint``: as in :func:`guarded_finetune`, for a base cast from float32.
    """
    import json

    from peft import LoraConfig

    from secvec_core.adapters import load_adapter_weights
    from secvec_core.artifacts import load_verified_tensors
    from secvec_core.inference import load_finetuned

    directory = Path(directory)
    meta = json.loads((directory / ARTIFACT_METADATA).read_text(encoding="utf-8"))
    names = [v.name for v in vectors]
    if meta["mode"] == "lora":
        model: nn.Module = base_model
        fingerprint = base_fingerprint or model_fingerprint(base_model)
        for vector in vectors:
            model = vector.attach(model, fingerprint=fingerprint)
        config = LoraConfig.from_pretrained(str(directory))
        model = attach_adapter(model, TASK_ADAPTER, config)
        load_adapter_weights(model, TASK_ADAPTER, load_verified_tensors(directory, meta["weights_sha256"]))
        activate(model, [*names, TASK_ADAPTER])
        task = TaskAdapterConfig(config.r, config.lora_alpha, config.lora_dropout, tuple(config.target_modules))
    else:
        reference = next(base_model.parameters())
        model = load_finetuned(None, directory, dtype=reference.dtype, device=reference.device)
        for vector in vectors:
            model = vector.attach(model, allow_fingerprint_mismatch=True, fingerprint=vector.base_fingerprint)
        if names:
            activate(model, names)
        task = None
    return GuardedFinetuneResult(
        mode=meta["mode"],
        model=model,
        vector_names=names,
        base_fingerprint=meta["base_fingerprint"],
        data_hash=meta["data_hash"],
        history=TrainingHistory(steps=meta.get("steps", 0)),
        task_config=task,
        vectors=meta.get("guarded_by", []),
    )
