"""``secvec plan``: memory per worker for each stage of a spec, before any GPU is held.

For every training stage the estimate adds up, per worker:

- **weights**: the base in its load dtype (``training.dtype``), sharded over the workers under FSDP, plus
  the float32 adapters (vectors, task adapter) and, under FSDP, the unsharded copy of the layers in flight;
- **gradients** and **optimizer** (AdamW: two float32 moments) of what trains, sharded under FSDP;
- **activations** at the spec's micro-batch (``batch_size / workers / gradient_accumulation_steps``) and
  ``max_length``: what autograd keeps per decoder layer (counted from the Hugging Face Llama forward), one
  layer's worth under gradient checkpointing, and the float32 logits of the loss;
- the **folding stash** (host memory or disk, never GPU memory).

The model's shape comes from its config alone (built on the ``meta`` device: no weights are read):
``builtin:tiny``, a local directory or GGUF file, or a hub id this module knows (``KNOWN_CONFIGS``, so the
paper's 7B Llama plans offline). Registry models (``models:/``) and stage outputs take the pipeline base's
shape. A spec whose stages do not fit ``scaling.gpu_memory_gb`` (or ``scaling.gpu``) is refused by
``secvec run``, ``render`` and ``submit`` with one line saying what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workflows.specs import (
    AlignmentStage,
    GuardedFinetuneStage,
    PipelineSpec,
    VectorShape,
    VectorTrainingStage,
)

GB = 1e9
# What the CUDA context, NCCL buffers and allocator fragmentation take on a GPU beyond the estimate.
GPU_RESERVE_BYTES = 2.0 * GB
GPU_RESERVE_FRACTION = 0.05
# On a CPU: what torch, peft and the thread pools take once, at the first training step, beyond the tensors
# (kernels' code paged in, runtime buffers): 16-27 MB on the tiny model depending on the CPU. plan_check.py
# measures after a warm-up run, so this term is the part of its estimate the measurement leaves out.
CPU_RUNTIME_BYTES = 16e6

# Configs of well-known models, so their plans need no download (Llama-2 7B: arXiv 2307.09288).
KNOWN_CONFIGS: dict[str, dict] = {
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "llama-2-13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
}
KNOWN_HUB_IDS = {
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
}


class PlanError(ValueError):
    """A spec that cannot fit the declared GPU memory; one line: which stage, by how much, what to change."""


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, read from its config."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    linear_shapes: dict[str, list[tuple[int, int]]]  # module suffix (q_proj, ...) -> [(in, out)] over layers
    layer_parameters: int

    def lora_parameters(self, rank: int, target_modules) -> int:
        return sum(rank * (i + o) for name in target_modules for i, o in self.linear_shapes.get(name, []))

    def targeted_weights(self, target_modules) -> int:
        return sum(i * o for name in target_modules for i, o in self.linear_shapes.get(name, []))


def shape_from_config(config) -> ModelShape:
    """Count parameters and Linear shapes by building the model on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            linear.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    seen: set[int] = set()
    parameters = 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            parameters += p.numel()
    layers = config.num_hidden_layers
    first_layer = next(m for m in model.modules() if type(m).__name__ in (model._no_split_modules or []))
    return ModelShape(
        parameters=parameters,
        layers=layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab=config.vocab_size,
        linear_shapes=linear,
        layer_parameters=sum(p.numel() for p in first_layer.parameters()),
    )


def model_shape(source: str) -> ModelShape | None:
    """The shape of ``source`` from its config alone, or None when it cannot be known before the run."""
    from transformers import AutoConfig, LlamaConfig

    if source == "builtin:tiny":
        from secvec_core.tiny import build_tiny_model_and_tokenizer

        model, _ = build_tiny_model_and_tokenizer()
        return shape_from_config(model.config)
    key = KNOWN_HUB_IDS.get(source, source.removeprefix("known:"))
    if key in KNOWN_CONFIGS:
        return shape_from_config(LlamaConfig(**KNOWN_CONFIGS[key]))
    if source.startswith("models:/"):
        return None
    path = Path(source).expanduser()
    try:
        if path.is_file():
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        elif path.is_dir():
            config = AutoConfig.from_pretrained(str(path))
        else:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None
    return shape_from_config(config)


@dataclass
class StagePlan:
    stage: str
    kind: str
    engine: str
    workers: int
    micro_batch: int
    dtype: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes per worker, on the device
    stash_bytes: float = 0.0  # host memory ("memory" stash) or disk, never on the GPU
    stash_kind: str = ""
    note: str = ""

    @property
    def total(self) -> float:
        """The peak: gradients are freed each step (``zero_grad(set_to_none=True)``) and fill up while backward
        frees the activations, so the two do not add up; weights, optimizer state and buffers stay."""
        parts = dict(self.parts)
        moving = max(parts.pop("activations", 0.0), parts.pop("gradients", 0.0))
        return sum(parts.values()) + moving


@dataclass
class Plan:
    pipeline: str
    device: str
    gpus: int
    gpu_memory_gb: float | None
    stages: list[StagePlan]

    def usable_bytes(self) -> float | None:
        if self.gpu_memory_gb is None:
            return None
        return self.gpu_memory_gb * GB * (1 - GPU_RESERVE_FRACTION) - GPU_RESERVE_BYTES

    def to_dict(self) -> dict:
        usable = self.usable_bytes()
        return {
            "pipeline": self.pipeline,
            "device": self.device,
            "gpus": self.gpus,
            "gpu_memory_gb": self.gpu_memory_gb,
            "usable_gb": None if usable is None else usable / GB,
            "stages": [
                {
                    "stage": s.stage,
                    "kind": s.kind,
                    "engine": s.engine,
                    "workers": s.workers,
                    "micro_batch": s.micro_batch,
                    "dtype": s.dtype,
                    "note": s.note,
                    **{f"{k}_gb": v / GB for k, v in s.parts.items()},
                    "total_gb": s.total / GB if s.parts else None,
                    "stash_gb": s.stash_bytes / GB,
                    "stash_kind": s.stash_kind,
                    "fits": None if usable is None or not s.parts else s.total <= usable,
                }
                for s in self.stages
            ],
        }

    def unfit(self) -> list[StagePlan]:
        usable = self.usable_bytes()
        return [] if usable is None else [s for s in self.stages if s.parts and s.total > usable]


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    *,
    compute_bytes: int,
    full_weights: bool,
    checkpointing: bool,
    lora_rank: int = 8,
    low_precision_weights: bool = False,
) -> float:
    """What autograd keeps for backward at ``tokens`` tokens per micro-batch, plus the loss's logits.

    Per decoder layer (Hugging Face Llama, SDPA attention): the two RMSNorm inputs in float32, the
    normalised inputs of the attention and MLP blocks, q/k/v after rotary and the attention output, the
    o_proj input, and four MLP tensors of the intermediate size (gate, its SiLU, up, their product).
    Trainable adapters keep their low-rank activations and, over bfloat16 weights, their own copy of each
    input (peft casts it to the float32 adapter; autocast keeps a bfloat16 copy). Under checkpointing only each layer's input is
    kept, plus one layer's full set while it is recomputed. The loss peaks at three logits-sized float32
    buffers (the logits, their shifted copy, the log-softmax), plus the bfloat16 logits under autocast.
    """
    h, i, hk = shape.hidden, shape.intermediate, shape.hidden * shape.kv_heads // shape.heads
    per_layer = tokens * (2 * h * 4 + (5 * h + 2 * hk + 4 * i) * compute_bytes)
    if not full_weights:  # trainable LoRA A/B outputs on the targeted layers (seven per layer for Llama)
        per_layer += tokens * 7 * lora_rank * 4
        if low_precision_weights:  # peft casts each LoRA layer's input to the float32 adapter: seven own copies
            per_layer += tokens * (6 * h + i) * compute_bytes
    layers = tokens * h * compute_bytes * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    head = tokens * shape.vocab * (3 * 4 + (compute_bytes if compute_bytes != 4 else 0)) + tokens * h * 4
    return layers + head


def plan_stage(stage, spec: PipelineSpec, shape: ModelShape | None) -> StagePlan:
    from secvec_core.precision import bf16_compute, weights_dtype

    scaling = spec.scaling
    device = "cuda" if scaling.use_gpu else "cpu"
    workers = scaling.num_workers
    if not isinstance(stage, AlignmentStage | VectorTrainingStage | GuardedFinetuneStage):
        return StagePlan(stage.name, stage.kind, "-", workers, 0, "-", note="evaluation: inference only")
    t = stage.training
    full = isinstance(stage, AlignmentStage) or (isinstance(stage, GuardedFinetuneStage) and stage.mode == "full")
    engine = t.parallel
    if engine == "auto":
        engine = "none" if workers == 1 else ("fsdp" if full else "ddp")
    dtype = weights_dtype(t.dtype, device, full_weights=full)
    micro = max(1, math.ceil(t.batch_size / workers / t.gradient_accumulation_steps))
    plan = StagePlan(stage.name, stage.kind, engine, workers, micro, str(dtype).removeprefix("torch."))
    if shape is None:
        plan.note = "model shape unknown before the run (registry model); not checked"
        return plan
    shards = workers if engine == "fsdp" else 1
    bf16 = bf16_compute(t.mixed_precision, device)
    compute_bytes = 2 if bf16 or dtype == torch.bfloat16 else 4
    w_bytes = _bytes(dtype)
    vectors, trainable_adapter, vector_targets = 0, 0, set()
    if isinstance(stage, VectorTrainingStage):
        trainable_adapter = shape.lora_parameters(stage.vector.rank, stage.vector.target_modules)
    elif isinstance(stage, GuardedFinetuneStage):
        for ref in stage.vectors:  # a vector from a stage of this spec has a known shape; else the default one
            source = next((s for s in spec.stages if s.name == ref.stage), None)
            vector_shape = source.vector if isinstance(source, VectorTrainingStage) else VectorShape()
            vectors += shape.lora_parameters(vector_shape.rank, vector_shape.target_modules)
            vector_targets |= set(vector_shape.target_modules)
        if stage.mode == "lora":
            trainable_adapter = shape.lora_parameters(stage.adapter.rank, stage.adapter.target_modules)
    trainable = shape.parameters if full else trainable_adapter
    trainable_bytes = w_bytes if full else 4
    plan.parts["weights"] = shape.parameters * w_bytes / shards + (vectors + trainable_adapter) * 4
    if engine == "fsdp":  # the layer being computed and the one prefetched, unsharded in the compute dtype
        plan.parts["weights"] += 2 * shape.layer_parameters * compute_bytes
    plan.parts["gradients"] = trainable * trainable_bytes / shards
    plan.parts["optimizer"] = 2 * trainable * 4 / shards
    if engine == "ddp":  # DDP's gradient buckets, alive across steps
        plan.parts["buckets"] = trainable * trainable_bytes
    if device == "cpu":
        plan.parts["runtime"] = CPU_RUNTIME_BYTES
    tokens = micro * t.max_length
    acts = activation_bytes(
        shape,
        tokens,
        compute_bytes=compute_bytes,
        full_weights=full,
        checkpointing=t.gradient_checkpointing,
        low_precision_weights=w_bytes < 4,
    )
    if isinstance(stage, VectorTrainingStage):
        # the KL term and the anchor hinge each run the model again in the same step
        acts *= 1 + (stage.benign_data is not None and t.kl_weight > 0) + (stage.anchor is not None)
    plan.parts["activations"] = acts
    if (
        isinstance(stage, GuardedFinetuneStage)
        and stage.mode == "lora"
        and stage.vectors
        and stage.folding.fold is not False
        and (w_bytes == 4 or stage.folding.allow_lossy)
    ):
        plan.stash_bytes = shape.targeted_weights(vector_targets) * w_bytes
        plan.stash_kind = stage.folding.stash
    return plan


def plan_spec(spec: PipelineSpec) -> Plan:
    base = spec.base_model.source or ""
    shapes: dict[str, ModelShape | None] = {}

    def shape_of(stage) -> ModelShape | None:
        source = stage.base_model.source if stage.base_model and stage.base_model.source else base
        if source not in shapes:
            shapes[source] = model_shape(source)
        if shapes[source] is None and source != base:  # a registry model: assume the pipeline base's architecture
            return shape_of_base()
        return shapes[source]

    def shape_of_base() -> ModelShape | None:
        if base not in shapes:
            shapes[base] = model_shape(base)
        return shapes[base]

    stages = [plan_stage(stage, spec, shape_of(stage)) for stage in spec.stages]
    scaling = spec.scaling
    return Plan(
        spec.name,
        "gpu" if scaling.use_gpu else "cpu",
        scaling.num_workers if scaling.use_gpu else 0,
        scaling.memory_per_gpu_gb(),
        stages,
    )


def check_fits(spec: PipelineSpec) -> Plan:
    """Raise :class:`PlanError` (one line) when a stage needs more memory per GPU than the spec declares."""
    plan = plan_spec(spec)
    unfit = plan.unfit()
    if unfit:
        worst = max(unfit, key=lambda s: s.total)
        raise PlanError(
            f"stage {worst.stage!r} needs about {worst.total / GB:.1f} GB per GPU but "
            f"scaling allows {plan.usable_bytes() / GB:.1f} GB of {plan.gpu_memory_gb:g} GB; "
            f"{advice(worst, spec)} (see `secvec plan`)"
        )
    return plan


def advice(stage: StagePlan, spec: PipelineSpec) -> str:
    """What to change, biggest lever first."""
    training = next(s for s in spec.stages if s.name == stage.stage).training
    parts = stage.parts
    if parts["activations"] >= 0.25 * stage.total:
        if not training.gradient_checkpointing:
            return f"set stages.{stage.stage}.training.gradient_checkpointing: true"
        if stage.micro_batch > 1:
            return (
                f"raise stages.{stage.stage}.training.gradient_accumulation_steps (micro-batch now "
                f"{stage.micro_batch}) or lower max_length"
            )
    full = parts["gradients"] > 0.5 * parts["weights"]
    if full and stage.engine != "fsdp":
        return "shard over more GPUs (scaling.num_workers > 1; full weights use FSDP) or train a LoRA adapter"
    if not full and stage.dtype == "float32":
        return f"set stages.{stage.stage}.training.dtype: bfloat16 (the frozen base in half the memory)"
    if full:
        return "shard over more GPUs (scaling.num_workers) or train a LoRA adapter (mode: lora)"
    return "use a GPU with more memory (scaling.gpu) or shard the frozen base (training.parallel: fsdp)"


def plan_with_overrides(
    spec: PipelineSpec, *, gpu: str | None = None, gpu_memory_gb: float | None = None, num_workers: int | None = None
) -> PipelineSpec:
    """``spec`` with the command line's scaling overrides (validated like the spec itself)."""
    from pydantic import ValidationError

    from workflows.specs import ScalingSpec, format_validation_error

    scaling = spec.scaling.model_dump()
    if gpu is not None or gpu_memory_gb is not None:
        scaling.update(gpu=gpu, gpu_memory_gb=gpu_memory_gb, use_gpu=True)
    if num_workers is not None:
        scaling["num_workers"] = num_workers
    try:
        return spec.model_copy(update={"scaling": ScalingSpec.model_validate(scaling)})
    except ValidationError as error:
        raise ValueError(format_validation_error(error, "command-line scaling")) from None


def check_spec_text_fits(text: str, source: str = "spec") -> None:
    """:func:`check_fits` for spec text (``secvec render``/``submit``); a spec that does not validate is left
    to the commands' own checks."""
    import yaml

    from workflows.specs import SpecError, parse_spec

    try:
        spec = parse_spec(yaml.safe_load(text), source)
    except (SpecError, yaml.YAMLError):
        return
    try:
        check_fits(spec)
    except PlanError as error:
        raise PlanError(f"{source}: {error}") from None
