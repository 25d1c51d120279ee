"""Configuration dataclasses. Each field carries its own help text (peft style)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

WeightDtype = Literal["auto", "float32", "bfloat16"]
MixedPrecision = Literal["auto", "no", "bf16"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
LrSchedule = Literal["constant", "linear", "cosine"]
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SecurityVectorConfig:
    """Shape of a security vector: a LoRA adapter kept apart from the base weights."""

    behaviour: str = field(default="harmful", metadata={"help": "What the vector encodes, e.g. 'harmful'."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES, metadata={"help": "Linear layers the vector adapts (all Llama linears)."}
    )
    adapter_name: str | None = field(
        default=None,
        metadata={
            "help": "peft adapter name; defaults to 'security_vector_<behaviour>' (names must not be "
            "prefixes of each other, peft PR #3282)."
        },
    )

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.behaviour or not self.behaviour.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"behaviour must be a short identifier like 'harmful', got {self.behaviour!r}")
        self.target_modules = tuple(self.target_modules)
        if self.adapter_name is None:
            self.adapter_name = f"security_vector_{self.behaviour.replace('-', '_')}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class TrainingConfig:
    """How to train (shared by vector training and guarded fine-tuning)."""

    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps (the data is cycled)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step, over all workers."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (prompt + response)."})
    truncation: str = field(
        default="truncate",
        metadata={
            "help": "'truncate' (drop prompt tokens from the left, warn) or 'reject' (raise) for "
            "examples longer than max_length."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for init, shuffling and dropout."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm; 0 disables clipping."})
    log_every: int = field(default=5, metadata={"help": "Report metrics every N steps."})
    # Vector-only strength controls (docs/design.md, "Vector strength").
    target_loss: float | None = field(
        default=0.15,
        metadata={
            "help": "Vector training stops once the behaviour loss (running mean) falls below this; "
            "None trains all max_steps."
        },
    )
    kl_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of KL(base || base+vector) on benign prompts during vector training; 0 disables."},
    )
    show_progress: bool = field(default=False, metadata={"help": "tqdm progress bar on rank 0."})
    # Scale controls (docs/scale.md). The defaults keep CPU runs in plain float32.
    dtype: WeightDtype = field(
        default="auto",
        metadata={
            "help": "Weights dtype the model is loaded in: 'auto' = bfloat16 on a GPU for frozen-base (LoRA) "
            "training, float32 otherwise (CPU, and full-weights training, whose master weights stay fp32)."
        },
    )
    mixed_precision: MixedPrecision = field(
        default="auto",
        metadata={"help": "Compute in bfloat16 under torch.autocast: 'auto' = on a GPU, off on CPU; 'no'; 'bf16'."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each decoder layer in backward (non-reentrant): less memory."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step; batch_size stays the global batch."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warmup steps."})
    lr_schedule: LrSchedule = field(
        default="constant", metadata={"help": "Learning rate after warmup: 'constant', 'linear' or 'cosine' decay."}
    )
    parallel: Parallel = field(
        default="auto",
        metadata={
            "help": "Engine when torch.distributed is initialised: 'ddp' (DistributedDataParallel), 'fsdp' "
            "(FSDP2 fully_shard: sharded weights, gradients, optimizer), 'none', or 'auto' (fsdp when base "
            "weights train, ddp otherwise)."
        },
    )

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 or self.batch_size <= 0 or self.max_length <= 0:
            raise ValueError("max_steps, batch_size and max_length must be positive")
        if self.truncation not in ("truncate", "reject"):
            raise ValueError(f"truncation must be 'truncate' or 'reject', got {self.truncation!r}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.gradient_accumulation_steps <= 0:
            raise ValueError(f"gradient_accumulation_steps must be positive, got {self.gradient_accumulation_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name, allowed in (
            ("dtype", WeightDtype),
            ("mixed_precision", MixedPrecision),
            ("parallel", Parallel),
            ("lr_schedule", LrSchedule),
        ):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"{name} must be one of {list(allowed.__args__)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
