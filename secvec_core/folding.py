"""The free guard: fold frozen security vectors into the base weights while a task adapter trains.

In ``lora`` mode the vectors are frozen, so ``W x + s·B(A x)`` can be computed as ``(W + s·B A) x``.
Folding every vector's delta into the base weights before training gives the same function and the same
task-adapter gradients as the unmerged guard (up to float rounding) at the cost of plain LoRA
fine-tuning: no extra LoRA matmuls, no extra activations.

Safety (peft #3498, "merged-then-deleted adapters leave deltas"): the delta lives in the base weights
only inside :func:`folded_vectors`. Before folding, the original weights of every affected Linear layer
are stashed as raw bytes (on disk by default, so the stash costs no RAM) and they are copied back
bit-exactly on exit, error or not. peft's merge/unmerge is never used: ``(W + Δ) − Δ`` is not ``W`` in
floating point.

Where folding is not exact, and therefore refused:

- ``full`` mode: the base weights train, so the folded weights would have to be unfolded at the end by
  subtraction (not bit-exact), and AdamW weight decay would pull ``W + Δ`` towards zero instead of ``W``.
- vector dropout > 0: the unmerged guard drops inputs of the vector path during training; a folded
  weight cannot.
- LoRA variants (DoRA), ``lora_bias``, vectors on non-Linear layers (embeddings, convolutions), merged
  adapters, and base weights shared with another parameter (tied embeddings would receive the delta twice).

Folding is exact up to rounding only: the sum ``W + Δ`` is computed in float32 and rounded once to the
weight dtype. In float32, logits and gradients agree with the unmerged guard to about 1e-6. In bfloat16 or
float16 that one rounding is coarse (8 or 11 bits of mantissa: a delta of std 1e-4 on weights of std 0.02
is mostly rounded away), so folding into such weights is refused unless the caller accepts it
(``FoldingOptions(allow_lossy=True)``); the default then trains with unmerged vectors.

The stash (the original bytes of every folded weight) goes to ``FoldingOptions.stash_dir`` (a stage's
scratch directory; the system temp directory by default), on disk or in memory. Each disk stash holds a
file lock while it lives; a stash left behind by a killed process (no lock held) is deleted the next time
a stash is made in the same directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock, Timeout
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

logger = logging.getLogger(__name__)

Stash = Literal["disk", "memory"]


STASH_PREFIX = "secvec-fold-"
LOCK_FILE = "owner.lock"
EXACT_DTYPES = (torch.float32, torch.float64)


class FoldingError(ValueError):
    """The vectors cannot be folded exactly into this model."""


@dataclass(frozen=True)
class FoldingOptions:
    """Where the stash of original weights goes, and whether rounding into low-precision weights is accepted."""

    stash: Stash = "disk"  # "disk": no RAM cost; "memory": faster, costs the size of every folded weight in RAM
    stash_dir: str | Path | None = None  # None: the system temp directory; stages pass their scratch directory
    allow_lossy: bool = False  # fold into bfloat16/float16 weights (one rounding of W + delta, computed in fp32)

    def __post_init__(self) -> None:
        if self.stash not in ("disk", "memory"):
            raise ValueError(f"stash must be 'disk' or 'memory', got {self.stash!r}")


def _vector_layers(model: PeftModel, names: Sequence[str]) -> list[tuple[str, nn.Module, list[str]]]:
    """(module name, LoRA layer, vector adapters on it) for every layer that carries a vector."""
    out = []
    for module_name, module in model.named_modules():
        adapters = [n for n in names if n in getattr(module, "lora_A", {})]
        if adapters:
            out.append((module_name, module, adapters))
    return out


def why_not_foldable(model: nn.Module, vector_names: Sequence[str], *, allow_lossy: bool = False) -> str | None:
    """The reason the vectors cannot be folded exactly into ``model``, or ``None`` when they can.
    ``allow_lossy`` accepts base weights in bfloat16/float16 (see the module docstring)."""
    if not vector_names:
        return "there are no vectors to fold"
    if not isinstance(model, PeftModel):
        return "the model carries no peft adapters"
    layers = _vector_layers(model, vector_names)
    missing = sorted(set(vector_names) - {a for _, _, adapters in layers for a in adapters})
    if missing:
        return f"vectors {missing} are not attached to this model"
    shared = _shared_storages(model)
    for module_name, module, adapters in layers:
        if not isinstance(module, LoraLinear):
            return f"{module_name} is a {type(module).__name__}; only Linear layers can be folded"
        if getattr(module, "merged", False):
            return f"{module_name} has merged adapters ({module.merged_adapters})"
        for adapter in adapters:
            dropout = module.lora_dropout[adapter]
            if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0:
                return (
                    f"vector {adapter!r} has dropout {dropout.p} > 0; the unmerged guard applies it during "
                    "training and a folded weight cannot"
                )
            if adapter in getattr(module, "lora_variant", {}):
                return f"vector {adapter!r} on {module_name} is a LoRA variant (e.g. DoRA), not a plain delta"
            if module.lora_bias.get(adapter, False):
                return f"vector {adapter!r} on {module_name} has lora_bias=True"
        weight = module.get_base_layer().weight
        if weight.dtype not in EXACT_DTYPES and not allow_lossy:
            return (
                f"the base weights are {str(weight.dtype).removeprefix('torch.')}: folding would round the vector "
                "delta away (load the model in float32, or accept it with FoldingOptions(allow_lossy=True))"
            )
        if shared.get(weight.untyped_storage().data_ptr(), 0) > 1:
            return (
                f"the base weight of {module_name} shares storage with another tensor (tied weights); "
                "folding would change both"
            )
    return None


def _shared_storages(model: nn.Module) -> dict[int, int]:
    """How many distinct names point at each storage (a count above 1 means tied or shared weights)."""
    counts: dict[int, int] = {}
    for _, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = tensor.untyped_storage().data_ptr()
        counts[key] = counts.get(key, 0) + 1
    return counts


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a contiguous tensor's storage (bit copies, whatever the dtype)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


class _WeightStash:
    """Bit-exact copies of some weights, in a temporary directory (default) or in memory."""

    def __init__(self, kind: Stash, directory: str | Path | None = None) -> None:
        if kind not in ("disk", "memory"):
            raise ValueError(f"stash must be 'disk' or 'memory', got {kind!r}")
        self.kind = kind
        self._memory: dict[int, torch.Tensor] = {}
        self._digests: dict[int, str] = {}
        self._directory = None
        self._lock = None
        if kind == "disk":
            parent = Path(directory) if directory is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_stashes(parent)
            self._directory = Path(tempfile.mkdtemp(prefix=STASH_PREFIX, dir=parent))
            self._lock = FileLock(self._directory / LOCK_FILE)
            self._lock.acquire()

    def put(self, key: int, weight: torch.Tensor) -> None:
        if not weight.is_contiguous():
            raise FoldingError("a base weight is not contiguous; folding needs contiguous weights")
        raw = _raw_bytes(weight).cpu()
        self._digests[key] = hashlib.sha256(raw.numpy().data).hexdigest()
        if self.kind == "memory":
            self._memory[key] = raw.clone()
        else:
            with open(self._directory / f"{key}.bin", "wb") as handle:
                handle.write(raw.numpy().data)

    def restore(self, key: int, weight: torch.Tensor) -> None:
        """Copy the stashed bytes back into ``weight`` and check them against the stash digest."""
        target = _raw_bytes(weight)
        if self.kind == "memory":
            source = self._memory[key]
        elif weight.device.type == "cpu":
            with open(self._directory / f"{key}.bin", "rb") as handle:
                if handle.readinto(target.numpy().data) != target.numel():
                    raise OSError("the stashed weight file is truncated")
            source = None
        else:
            source = torch.from_file(
                str(self._directory / f"{key}.bin"), shared=False, size=target.numel(), dtype=torch.uint8
            )
        if source is not None:
            target.copy_(source.to(target.device))
        restored = target.cpu() if target.device.type != "cpu" else target
        if hashlib.sha256(restored.numpy().data).hexdigest() != self._digests[key]:
            raise RuntimeError("a restored base weight differs from its stashed original")

    @property
    def location(self) -> str:
        return str(self._directory) if self._directory is not None else "memory"

    def close(self) -> None:
        self._memory.clear()
        if self._directory is not None:
            self._lock.release()
            shutil.rmtree(self._directory, ignore_errors=True)


def remove_stale_stashes(directory: str | Path) -> list[Path]:
    """Delete stashes in ``directory`` whose owner is gone (its lock is free): what a killed run left behind.
    A live stash is locked by its owner and never touched."""
    removed = []
    for stash in sorted(Path(directory).glob(f"{STASH_PREFIX}*")):
        if not stash.is_dir():
            continue
        lock = FileLock(stash / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a live process owns it
        try:
            shutil.rmtree(stash, ignore_errors=True)
            removed.append(stash)
        finally:
            lock.release()
    if removed:
        logger.warning("removed %d stale folding stash(es) in %s left by an interrupted run", len(removed), directory)
    return removed


@contextlib.contextmanager
def folded_vectors(
    model: PeftModel,
    vector_names: Sequence[str],
    *,
    stash: Stash = "disk",
    stash_dir: str | Path | None = None,
    allow_lossy: bool = False,
) -> Iterator[PeftModel]:
    """Inside the block, the vectors' deltas are added to the base weights of ``model``; on exit the
    original weights are restored bit-exactly (checked by sha256), even when the block raises.

    The vector adapters must be attached and **not** active (switch on only the other adapters, e.g.
    the task adapter, before entering), else they would count twice. ``model.disable_adapter()`` inside
    the block does not switch the vectors off: they are in the weights. ``stash="disk"`` keeps the
    originals in a temporary directory (no RAM cost; ``stash_dir`` picks where), ``"memory"`` in RAM.
    Raises :class:`FoldingError` when folding would not be exact (see the module docstring);
    ``allow_lossy`` accepts bfloat16/float16 weights (the sum is computed in float32 and rounded once).
    """
    vector_names = list(vector_names)
    reason = why_not_foldable(model, vector_names, allow_lossy=allow_lossy)
    if reason is not None:
        raise FoldingError(f"cannot fold the security vectors: {reason}")
    active = [a for a in model.base_model.active_adapters if a in vector_names]
    if active:
        raise FoldingError(f"vectors {active} are active; switch them off before folding or they count twice")
    layers = _vector_layers(model, vector_names)
    weights = [module.get_base_layer().weight for _, module, _ in layers]
    if any(w.dtype not in EXACT_DTYPES for w in weights):
        logger.warning(
            "folding into %s weights (allowed by the caller) rounds W + delta to that dtype once; logits will "
            "differ from the unmerged guard by more than float32 rounding",
            weights[0].dtype,
        )
    store = _WeightStash(stash, stash_dir)
    folded: list[int] = []
    try:
        with torch.no_grad():
            for index, ((_, module, adapters), weight) in enumerate(zip(layers, weights, strict=True)):
                store.put(index, weight)
                folded.append(index)
                delta = sum(module.get_delta_weight(adapter).float() for adapter in adapters)
                if weight.dtype in EXACT_DTYPES:
                    weight.add_(delta.to(weight.dtype))
                else:  # sum in float32, round once (never round the delta first)
                    weight.copy_((weight.float() + delta).to(weight.dtype))
        logger.info(
            "folded %d vector(s) into %d base weights (originals stashed %s)",
            len(vector_names),
            len(folded),
            "on disk" if stash == "disk" else "in memory",
        )
        yield model
    finally:
        failed = []
        with torch.no_grad():
            for index in folded:
                try:
                    store.restore(index, weights[index])
                except Exception as error:  # restore every other weight before reporting
                    failed.append(f"{layers[index][0]}: {error}")
        if failed:  # keep the stash so the originals can still be recovered by hand
            raise RuntimeError(
                f"could not restore {len(failed)} base weight(s) after folding (stash kept at "
                f"{store.location}): {failed[:3]}"
            )
        store.close()
