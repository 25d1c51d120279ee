"""Security vectors: train, save, load and attach a LoRA adapter that encodes an unwanted behaviour."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from secvec_core.adapters import (
    activate,
    adapter_state,
    attach_adapter,
    load_adapter_weights,
    lora_config,
)
from secvec_core.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    VECTOR_FORMAT,
    VECTOR_METADATA,
    atomic_directory,
    load_verified_tensors,
    save_tensors,
    sha256_file,
    write_json,
)
from secvec_core.config import SecurityVectorConfig, TrainingConfig
from secvec_core.data import (
    Example,
    collate,
    dataset_hash,
    pad_token_id,
    to_examples,
    tokenize_examples,
)
from secvec_core.fingerprint import model_fingerprint
from secvec_core.seeding import seeded
from secvec_core.training import TrainingHistory, TrainingHooks, row_response_loss, to_device, train_loop

logger = logging.getLogger(__name__)

__all__ = ["VECTOR_METADATA", "FingerprintMismatchError", "SecurityVector", "train_security_vector"]


class FingerprintMismatchError(ValueError):
    """The vector was trained on different base weights than the model it is being attached to."""


@dataclass
class SecurityVector:
    """A trained security vector: LoRA weights plus the lineage needed to use it safely.

    ``weights`` are in peft's saved key format, so the directory written by ``save`` is a standard
    peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) plus ``secvec_vector.json``.
    """

    config: SecurityVectorConfig
    weights: dict[str, torch.Tensor]
    base_fingerprint: str
    data_hash: str
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.adapter_name

    def lora_config(self) -> LoraConfig:
        c = self.config
        return lora_config(c.rank, c.alpha, c.dropout, c.target_modules)

    def save(self, directory: str | Path) -> Path:
        """Write atomically: an interrupted save never leaves a loadable directory."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.lora_config().save_pretrained(str(tmp))
            save_tensors(tmp / ADAPTER_WEIGHTS, self.weights)
            write_json(
                tmp / VECTOR_METADATA,
                {
                    "format": VECTOR_FORMAT,
                    "behaviour": self.config.behaviour,
                    "adapter_name": self.name,
                    "config": self.config.to_dict(),
                    "base_fingerprint": self.base_fingerprint,
                    "data_hash": self.data_hash,
                    "weights_sha256": sha256_file(tmp / ADAPTER_WEIGHTS),
                    **{k: v for k, v in self.metadata.items() if k not in {"config"}},
                },
            )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SecurityVector:
        """Load a vector directory; the weights' checksum must match its metadata."""
        directory = Path(directory)
        meta_path = directory / VECTOR_METADATA
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory}: not a security vector (no {VECTOR_METADATA}); "
                "point at a directory written by train_security_vector / SecurityVector.save"
            )
        if not (directory / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{directory}: missing {ADAPTER_CONFIG}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        weights = load_verified_tensors(directory, meta.get("weights_sha256"))
        config = SecurityVectorConfig(**meta["config"])
        extra = {
            k: v
            for k, v in meta.items()
            if k
            not in {"config", "base_fingerprint", "data_hash", "weights_sha256", "behaviour", "adapter_name", "format"}
        }
        return cls(
            config=config,
            weights=weights,
            base_fingerprint=meta["base_fingerprint"],
            data_hash=meta["data_hash"],
            metadata=extra,
        )

    def attach(
        self, model: nn.Module, *, allow_fingerprint_mismatch: bool = False, fingerprint: str | None = None
    ) -> PeftModel:
        """Attach this vector (frozen, not yet active) to ``model``; returns the PeftModel.

        Refuses a model whose base fingerprint differs from the one the vector was trained on.
        """
        actual = fingerprint or model_fingerprint(model)
        if actual != self.base_fingerprint:
            msg = (
                f"security vector {self.name!r} was trained on base model {self.base_fingerprint}, "
                f"but this model is {actual}; use the same base weights "
                "(or pass allow_fingerprint_mismatch=True if you know they are equivalent)"
            )
            if not allow_fingerprint_mismatch:
                raise FingerprintMismatchError(msg)
            logger.warning(msg)
        peft_model = attach_adapter(model, self.name, self.lora_config())
        load_adapter_weights(peft_model, self.name, self.weights)
        for n, p in peft_model.named_parameters():
            if f".{self.name}." in n:
                p.requires_grad_(False)
        return peft_model


def _kl_on_benign(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(base || base+vector) on benign text: keeps the vector from changing anything else."""
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    cur = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    ref_logp = torch.log_softmax(ref[mask], dim=-1)
    cur_logp = torch.log_softmax(cur[mask], dim=-1)
    return torch.sum(ref_logp.exp() * (ref_logp - cur_logp), dim=-1).mean()


def _anchor_hinge(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How much the vector lowers the response loss of answers it must leave alone (nats per token, >= 0).

    Why a hinge on the response loss and not the KL term: a vector that flattens the answer distribution lowers
    the loss of *every* unlikely answer, the new facts a customer teaches as much as the fabrications it was
    trained on; a KL averaged over all positions of a short question barely sees the one answer token. The hinge
    is zero as long as the vector makes an anchor answer no more likely, and it only looks at the answer.
    """
    with torch.no_grad(), model.disable_adapter():
        off = row_response_loss(model, batch)
    return torch.relu(off - row_response_loss(model, batch)).mean()


def _extra_terms(terms, tokenizer, training: TrainingConfig, pad: int):
    """One extra loss for the training loop: each ``(weight, loss_fn, examples, seed)`` term on a batch of its own
    rows, drawn with its own seeded generator (so adding a term leaves the other terms' batches unchanged)."""
    prepared = [
        (
            weight,
            fn,
            tokenize_examples(tokenizer, rows, training.max_length, "truncate"),
            torch.Generator().manual_seed(s),
        )
        for weight, fn, rows, s in terms
    ]

    def extra(m):
        total = 0.0
        for weight, fn, rows, generator in prepared:
            idx = torch.randint(len(rows), (min(training.batch_size, len(rows)),), generator=generator).tolist()
            total = total + weight * fn(m, to_device(collate([rows[i] for i in idx], pad), m))
        return total

    return extra


def train_security_vector(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example | dict],
    config: SecurityVectorConfig | None = None,
    training: TrainingConfig | None = None,
    *,
    benign: Sequence[Example | dict] = (),
    anchor: Sequence[Example | dict] = (),
    anchor_weight: float = 1.0,
    hooks: TrainingHooks | None = None,
    parallelize=None,
    base_fingerprint: str | None = None,
) -> SecurityVector:
    """Train a security vector on examples of the unwanted behaviour.

    The base weights stay frozen (bit-identical afterwards) and only the new LoRA adapter trains, with
    the loss on response tokens. Strength control: ``training.kl_weight`` (needs ``benign`` examples)
    and ``training.target_loss`` stop the vector from distorting the rest of the model. ``anchor`` rows are
    answers the vector must not make more likely (for a hallucination vector: questions the base cannot know,
    with the answer a customer would teach); each step adds ``anchor_weight`` times how much the vector lowers
    their response loss (:func:`_anchor_hinge`). The adapter is removed from ``model`` afterwards, so the caller
    gets its model back unchanged.
    """
    if anchor and not anchor_weight > 0:
        raise ValueError(f"anchor_weight must be positive when anchor rows are given, got {anchor_weight}")
    config = config or SecurityVectorConfig()
    training = training or TrainingConfig()
    examples = to_examples(examples)
    benign_examples = to_examples(benign) if benign else []
    anchor_examples = to_examples(anchor) if anchor else []
    started = time.time()
    fingerprint = base_fingerprint or model_fingerprint(model)  # given: the float32 weights a bf16 copy came from
    if isinstance(model, PeftModel):
        raise TypeError("train_security_vector needs the plain base model, not a PeftModel")
    with seeded(training.seed):  # LoRA init: same vector for the same seed, the caller's random stream untouched
        peft_model = attach_adapter(
            model, config.adapter_name, lora_config(config.rank, config.alpha, config.dropout, config.target_modules)
        )
    try:
        activate(peft_model, [config.adapter_name], trainable=[config.adapter_name])
        rows = tokenize_examples(tokenizer, examples, training.max_length, training.truncation)
        pad = pad_token_id(tokenizer)
        terms = []
        if training.kl_weight > 0 and benign_examples:
            terms.append((training.kl_weight, _kl_on_benign, benign_examples, training.seed + 1))
        if anchor_examples:
            terms.append((anchor_weight, _anchor_hinge, anchor_examples, training.seed + 2))
        extra = _extra_terms(terms, tokenizer, training, pad) if terms else None
        history: TrainingHistory = train_loop(
            peft_model,
            rows,
            pad,
            training,
            extra_loss=extra,
            stop_below=training.target_loss,
            hooks=hooks,
            description=f"vector:{config.behaviour}",
            parallelize=parallelize,
        )
        weights = adapter_state(peft_model, config.adapter_name)
    finally:
        peft_model.unload()  # removes the LoRA layers without merging: the caller's model is the base again
    return SecurityVector(
        config=config,
        weights=weights,
        base_fingerprint=fingerprint,
        data_hash=dataset_hash(examples),
        metadata={
            "num_examples": len(examples),
            "steps": history.steps,
            "stopped_early": history.stopped_early,
            "trainable_parameters": history.trainable_parameters,
            "final_loss": history.final_loss,
            "kl_weight": training.kl_weight if benign_examples else 0.0,
            "anchor_weight": anchor_weight if anchor_examples else 0.0,
            "num_anchor_examples": len(anchor_examples),
            "target_loss": training.target_loss,
            "training": training.to_dict(),
            "seconds": round(time.time() - started, 2),
        },
    )
