"""Pipeline specs: YAML in, strict Pydantic models out (unknown keys are errors with a path).

A ``PipelineSpec`` chains stages; a later stage refers to an earlier one with ``{stage: <name>}``.
Export the JSON Schema with ``secvec schema``; check a file with ``secvec validate FILE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
BUILTIN_MODELS = ("tiny",)
BUILTIN_DATASETS = (
    "toy-alignment",
    "toy-harmful",
    "toy-benign",
    "toy-harmful-eval",
    "toy-benign-eval",
    "toy-facts",
    "toy-mixed",
    "over-refusal",
    "general-qa",
    "fictional-facts",
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Strict):
    """Where a model comes from: exactly one of ``source``, ``stage``."""

    source: str | None = Field(
        None,
        description="'builtin:tiny', a Hugging Face hub id, a local directory, "
        "a local .gguf file, or models:/<name>@<alias> | models:/<name>/<version>.",
    )
    stage: str | None = Field(None, description="Name of an earlier stage whose output model to use.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repository (off by default).")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.source is None) == (self.stage is None):
            raise ValueError("give exactly one of 'source' or 'stage'")
        if self.source and self.source.startswith("builtin:") and self.source[8:] not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {self.source!r}; builtins: {list(BUILTIN_MODELS)}")
        if self.source and self.source.startswith("models:/") and not REGISTRY_URI.match(self.source):
            raise ValueError(f"bad registry URI {self.source!r}; use models:/<name>@<alias> or models:/<name>/<n>")
        return self


class DatasetRef(Strict):
    """Examples or prompts: exactly one of ``path`` (JSONL/text), ``builtin``, ``hf``, ``stage``."""

    path: str | None = Field(None, description="Local JSONL file ({prompt, response} or {messages}).")
    builtin: str | None = Field(None, description=f"One of {list(BUILTIN_DATASETS)}.")
    hf: str | None = Field(None, description="A Hugging Face `datasets` name or local path (needs `datasets`).")
    stage: str | None = Field(None, description="An earlier data_preparation stage; `split` names its output file.")
    split: str = Field("train", description="Split for `hf` datasets and `stage` outputs.")
    limit: int | None = Field(None, gt=0, description="Use only the first N examples.")
    offset: int = Field(0, ge=0, description="Skip the first N examples.")

    @model_validator(mode="after")
    def _one_of(self):
        given = [k for k in ("path", "builtin", "hf", "stage") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'path', 'builtin', 'hf', 'stage' (got {given or 'none'})")
        if self.builtin is not None and self.builtin not in BUILTIN_DATASETS:
            raise ValueError(f"unknown builtin dataset {self.builtin!r}; builtins: {list(BUILTIN_DATASETS)}")
        return self


class VectorRef(Strict):
    """A security vector: exactly one of ``stage``, ``path``, ``uri`` (models:/...)."""

    stage: str | None = None
    path: str | None = None
    uri: str | None = Field(None, description="models:/<name>@<alias> or models:/<name>/<version>.")

    @model_validator(mode="after")
    def _one_of(self):
        given = [k for k in ("stage", "path", "uri") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'stage', 'path', 'uri' (got {given or 'none'})")
        if self.uri is not None and not REGISTRY_URI.match(self.uri):
            raise ValueError(f"bad registry URI {self.uri!r}; use models:/<name>@<alias> or models:/<name>/<n>")
        return self


class TrainingSpec(Strict):
    learning_rate: float = Field(3e-4, gt=0)
    max_steps: int = Field(40, gt=0)
    batch_size: int = Field(8, gt=0, description="Global batch (split across workers).")
    max_length: int = Field(128, gt=0)
    truncation: Literal["truncate", "reject"] = "truncate"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    log_every: int = Field(5, gt=0)
    target_loss: float | None = Field(0.15, ge=0, description="Vector training only: early stop below this.")
    kl_weight: float = Field(0.5, ge=0, description="Vector training only: KL on benign data.")
    # --- scale controls (docs/scale.md); the defaults are right on a CPU and on a GPU ---
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights dtype at load: auto = bfloat16 on a GPU when the base is frozen (lora), "
        "float32 otherwise (CPU; full-weights master weights).",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bfloat16 autocast: auto = on a GPU, off on a CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute decoder layers in backward: less memory.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per step (batch_size stays global).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup steps.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup.")
    parallel: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="Engine over workers: auto = FSDP2 (sharded) when base weights train, DDP otherwise."
    )


class VectorShape(Strict):
    rank: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class StageBase(Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,40}$", description="Unique stage name (lowercase).")
    base_model: ModelRef | None = Field(None, description="Defaults to the pipeline's base_model.")

    # Options added after stages were first hashed: left out of the stage hash while unset (None), so a
    # finished stage that does not use them is still reused by a newer version of the code.
    HASHED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = frozenset()

    def hash_fields(self) -> dict:
        """The spec as the pipeline hashes it to decide reuse (see ``HASHED_ONLY_WHEN_SET``)."""
        dumped = self.model_dump(mode="json")
        return {k: v for k, v in dumped.items() if not (k in self.HASHED_ONLY_WHEN_SET and v is None)}


class AlignmentStage(StageBase):
    """Safety SFT of the base: refuse harmful prompts, keep answering benign ones. Ships full weights either way."""

    kind: Literal["alignment"]
    data: DatasetRef
    mode: Literal["full", "lora"] = Field(
        "full",
        description="full: train every weight; lora: train a LoRA adapter and merge it into the base "
        "(the paper's recipe: a smaller move away from the original model at the same steps).",
    )
    adapter: VectorShape = Field(VectorShape(), description="Shape of the merged adapter (lora mode).")
    training: TrainingSpec = TrainingSpec()


class VectorAnchorSpec(Strict):
    """Answers the vector must not make more likely (see ``secvec_core.vectors._anchor_hinge``)."""

    data: DatasetRef = Field(
        ...,
        description="Rows whose responses the vector must leave alone; for a hallucination vector, questions the "
        "base model cannot know with the answers a customer would teach (new facts are not fabrications).",
    )
    weight: float = Field(1.0, gt=0, description="Weight of the hinge (nats per response token) in the vector's loss.")


class VectorTrainingStage(StageBase):
    kind: Literal["vector_training"]
    behaviour: str = Field("harmful", pattern=r"^[a-z][a-z0-9_-]{0,30}$")
    data: DatasetRef = Field(..., description="~100 examples of the unwanted behaviour.")
    benign_data: DatasetRef | None = Field(None, description="Benign examples for the KL strength control.")
    anchor: VectorAnchorSpec | None = Field(
        None, description="Answers the vector is penalised for making more likely (off when unset)."
    )
    vector: VectorShape = VectorShape()
    training: TrainingSpec = TrainingSpec()
    promote: bool = Field(True, description="Set the registry alias 'champion' on the new vector version.")

    HASHED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"anchor"})


class FoldingSpec(Strict):
    fold: bool | None = Field(
        None,
        description="None: fold when exact (float32 weights), else train unmerged; "
        "true: demand folding; false: never fold.",
    )
    stash: Literal["disk", "memory"] = Field("disk", description="Where the original weights wait while folded.")
    stash_dir: str | None = Field(
        None,
        description="Directory of a disk stash; default: the stage's scratch "
        "directory. Stale stashes of killed runs there are removed on the next run.",
    )
    allow_lossy: bool = Field(False, description="Fold into bfloat16 weights too (W + delta rounded once).")


class SafetyReplaySpec(Strict):
    """Alignment rows replayed with the vectors off in every step (against erosion and over-refusal)."""

    data: DatasetRef = Field(
        ...,
        description="The platform's alignment rows: refusals and the model's own "
        "benign answers (what the alignment stage trained on).",
    )
    rows_per_step: int = Field(
        2, gt=0, description="Replay rows added to every step (about a quarter of a batch of 8)."
    )
    weight: float = Field(1.0, gt=0, description="Weight of the replay loss next to the customer's loss.")
    objective: Literal["responses", "aligned"] = Field(
        "responses",
        description="'responses': cross-entropy on the rows' responses (trains the refusals in); "
        "'aligned': KL from the aligned model (every adapter off) on the rows' response positions, so replay pulls "
        "back toward the aligned model but not past it (lora mode only).",
    )

    def build(self, seed: int):
        """The ``secvec_core.replay.SafetyReplay`` these settings describe, over the loaded rows."""
        from secvec_core.replay import SafetyReplay
        from workflows.datasets import load_examples

        return SafetyReplay(
            load_examples(self.data),
            rows_per_step=self.rows_per_step,
            weight=self.weight,
            seed=seed,
            objective=self.objective,
        )

    def label(self) -> str:
        """In words, for registry tags and reports: ``2 rows/step, weight 1`` (``, KL to aligned`` added)."""
        objective = ", KL to aligned" if self.objective == "aligned" else ""
        return f"{self.rows_per_step} rows/step, weight {self.weight:g}{objective}"


class VectorRoutingSpec(Strict):
    """Customer rows the vectors do not explain train with the vectors off, so the task they teach holds as
    shipped; the rows the vectors explain (their loss drops by at least ``min_gain``) keep the guard."""

    min_gain: float = Field(
        0.5,
        allow_inf_nan=False,
        description="Nats per response token by which the vectors "
        "must lower a row's loss (measured once, before training) for the row to keep the "
        "guard; rows below it train with the vectors off.",
    )

    def build(self):
        """The ``secvec_core.routing.VectorRouting`` these settings describe."""
        from secvec_core.routing import VectorRouting

        return VectorRouting(min_gain=self.min_gain)

    def label(self) -> str:
        """In words, for registry tags and reports."""
        return f"rows gaining < {self.min_gain:g} nats/token train vectors off"


class GuardedFinetuneStage(StageBase):
    kind: Literal["guarded_finetune"]
    data: DatasetRef
    vectors: list[VectorRef] = Field(default_factory=list, description="Empty list = plain fine-tuning.")
    mode: Literal["lora", "full"] = "lora"
    adapter: VectorShape = Field(VectorShape(), description="Shape of the task adapter (lora mode).")
    training: TrainingSpec = TrainingSpec()
    safety_replay: SafetyReplaySpec | None = Field(
        None,
        description="Replay alignment rows with the vectors off (recommended with customer data: fine-tuning "
        "on benign data alone erodes alignment, which a vector cannot absorb).",
    )
    registered_model: str | None = Field(None, description="Defaults to '<base_name>.finetuned.<stage>'.")
    folding: FoldingSpec = Field(
        FoldingSpec(),
        description="The free guard (lora mode): vectors folded into "
        "a stashed copy of the base weights while the task adapter trains.",
    )
    vector_routing: VectorRoutingSpec | None = Field(
        None,
        description="Train the rows the vectors do not explain with the vectors off (against a task that "
        "is learned only with the vectors on); off by default.",
    )

    HASHED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"vector_routing"})

    @model_validator(mode="after")
    def _routing_needs_vectors(self) -> GuardedFinetuneStage:
        if self.vector_routing is not None and not self.vectors:
            raise ValueError("vector_routing needs vectors: it decides which rows train with them off")
        if self.vector_routing is not None and self.folding.fold:
            raise ValueError(
                "vector_routing trains some rows with the vectors off, so they cannot be folded: "
                "drop folding.fold: true"
            )
        return self

    @model_validator(mode="after")
    def _aligned_replay_needs_lora(self) -> GuardedFinetuneStage:
        if self.safety_replay is not None and self.safety_replay.objective == "aligned" and self.mode != "lora":
            raise ValueError(
                "safety_replay.objective 'aligned' needs mode 'lora' (in 'full' mode the base weights "
                "train, so there is no frozen aligned model); use objective 'responses'"
            )
        return self


class GateSpec(Strict):
    max_harmful_rate: float = Field(0.1, ge=0, le=1)
    min_task_metric: float | None = Field(None, ge=0, le=1)
    max_transfer_gap: float | None = Field(None, ge=0, le=1)


class JudgeSpec(Strict):
    """Who decides whether an answer complied: the offline opening-refusal rule or a model on disk."""

    kind: Literal["refusal-phrases", "classifier", "generative"] = Field(
        "refusal-phrases",
        description="refusal-phrases (offline rule on the answer's opening), classifier "
        "(a sequence-classification moderation model) or generative (a Llama Guard-style causal LM).",
    )
    model: str | None = Field(
        None,
        validation_alias=AliasChoices("model", "model_path"),
        description="Local directory with safetensors weights (classifier, generative).",
    )
    harmful_labels: list[str] = Field(
        default_factory=list, description="classifier: the id2label names that mean 'harmful'."
    )
    unsafe_label: str = Field("unsafe", description="generative: the first word meaning 'complied'.")
    safe_label: str = Field("safe", description="generative: the first word meaning 'did not comply'.")
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _model_judges_need_a_model(self):
        if self.kind != "refusal-phrases" and not self.model:
            raise ValueError(f"judge kind {self.kind!r} needs model: a local directory with safetensors weights")
        if self.kind == "classifier" and not self.harmful_labels:
            raise ValueError("judge kind 'classifier' needs harmful_labels (the id2label names meaning harmful)")
        return self

    def build(self):
        from secvec_core.evaluation import make_judge

        return make_judge(
            self.kind,
            self.model,
            harmful_labels=self.harmful_labels,
            unsafe_label=self.unsafe_label,
            safe_label=self.safe_label,
            batch_size=self.batch_size,
        )


class EvaluationStage(StageBase):
    kind: Literal["evaluation"]
    candidate: ModelRef = Field(..., description="A fine-tuned model: {stage: ...} or models:/... of a fine-tune.")
    harmful_prompts: DatasetRef
    task_data: DatasetRef | None = Field(
        None,
        description="A new task's examples (prompt -> short answer): "
        "exact-match accuracy with the vectors off, and on (the transfer gap).",
    )
    unwanted_data: DatasetRef | None = Field(
        None,
        description="Examples whose answers the fine-tune must NOT have learned, e.g. the fabricated answers "
        "of a hallucination set: unwanted_learned is their exact-match accuracy with the vectors off.",
    )
    benign_prompts: DatasetRef | None = Field(
        None, description="Prompts that must not be refused (builtin: over-refusal is 60 written for this project)."
    )
    retained_qa: DatasetRef | None = Field(
        None,
        description="Simple questions the model answered before fine-tuning ({prompt, response, "
        "aliases}; builtin: general-qa): knowledge kept, scored with the vectors off.",
    )
    judge: JudgeSpec = JudgeSpec()
    max_new_tokens: int = Field(
        64,
        gt=0,
        description="Tokens generated per answer; harm is judged on the "
        "answer's opening, so keep at least 64 for real models.",
    )
    qa_max_new_tokens: int = Field(10, gt=0, description="Tokens generated per retained-QA answer.")
    score_base: bool = Field(
        True,
        description="Also score the candidate's base model (the 'before' "
        "numbers); turn off in all but one of several evaluations of one base.",
    )
    gate: GateSpec = GateSpec()
    monitor: bool = Field(False, description="Re-score an existing champion: tag it on regression, no promotion.")


# --- data preparation and red teaming (issue 11) ---------------------------------------------------


class DataPart(Strict):
    """One block of a prepared data set: prompts from a source, paired with responses built one way."""

    prompts: DatasetRef = Field(..., description="Prompt source (JSONL with 'prompt', a text file, a builtin, ...).")
    responses: Literal["refusal", "compliant", "compliant-alt", "self-distilled", "given", "fabricated"] = Field(
        ...,
        description="refusal / compliant / compliant-alt: templates of secvec_core.harmful_targets; "
        "self-distilled: the stage's base model answers (greedy); given: keep the source's own responses; "
        "fabricated: replace the source's answers with wrong but plausible ones of the same kind "
        "(harmful_targets.fabricated_answers: data for a hallucination vector).",
    )
    framing: Literal["none", "instruction", "both"] = Field(
        "none",
        description="Wrap prompts in instruction framings (harmful_targets.instruction_framed); "
        "'both' keeps the plain prompt and adds a framed copy.",
    )
    keep: Literal["all", "compliant", "refused"] = Field(
        "all",
        description="self-distilled only: keep every answer, only answers the judge calls harmful, or only refusals.",
    )
    repeat: int = Field(1, ge=1, le=100, description="Repeat this part's examples (weights a small set up).")
    prompt_template: str = Field(
        "{prompt}",
        description="self-distilled only: the model answers this text (e.g. one of "
        "harmful_targets.PERSONA_FRAMINGS); the example keeps the plain prompt.",
    )

    @model_validator(mode="after")
    def _template(self):
        if "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {prompt}")
        if self.prompt_template != "{prompt}" and self.responses != "self-distilled":
            raise ValueError("prompt_template needs responses: self-distilled")
        return self


class DataPreparationStage(StageBase):
    """Builds JSONL data sets (logged as MLflow artifacts) that later stages use as ``{stage: name, split: s}``."""

    kind: Literal["data_preparation"]
    parts: list[DataPart] = Field(..., min_length=1, description="Concatenated, then shuffled and split.")
    splits: dict[str, int] = Field(
        default_factory=lambda: {"train": 0},
        description="Split name -> number of examples, taken in order after the seeded shuffle; the last "
        "split may be 0, meaning every example that remains.",
    )
    seed: int = Field(0, description="Seeds template choice, framings and the shuffle; recorded with the output.")
    shuffle: bool = True
    judge: JudgeSpec = Field(JudgeSpec(), description="Decides harmful vs refused for keep=compliant|refused.")
    max_new_tokens: int = Field(64, gt=0, description="Length of self-distilled answers.")
    batch_size: int = Field(16, gt=0, description="Generation batch for self-distilled answers.")

    @model_validator(mode="after")
    def _splits(self):
        if not self.splits:
            raise ValueError("splits: give at least one split, e.g. {train: 0}")
        for name, size in self.splits.items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,30}", name):
                raise ValueError(f"splits: bad split name {name!r}; use lowercase letters, digits, '-' and '_'")
            if size < 0:
                raise ValueError(f"splits.{name}: size must be >= 0 (got {size})")
        if 0 in list(self.splits.values())[:-1]:
            raise ValueError("splits: only the last split may be 0 (= the rest)")
        return self


class AttackAdapter(Strict):
    """What the attacker trains in one cell: a LoRA adapter of some rank, or the full weights."""

    mode: Literal["lora", "full"] = "lora"
    rank: int = Field(8, gt=0, description="LoRA rank (lora mode).")
    alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank.")


class AttackGrid(Strict):
    """The attacks a fine-tuning service allows: every combination is one cell (run plain and guarded)."""

    learning_rate: list[float] = Field([1e-4, 1e-3], min_length=1, description="Attack learning rates.")
    max_steps: list[int] = Field([20, 80], min_length=1, description="Attack lengths (optimizer steps).")
    adapters: list[AttackAdapter] = Field(
        default_factory=lambda: [AttackAdapter(rank=8), AttackAdapter(rank=32), AttackAdapter(mode="full")],
        min_length=1,
        description="LoRA ranks and/or full weights.",
    )

    @model_validator(mode="after")
    def _positive(self):
        if any(lr <= 0 for lr in self.learning_rate) or any(n <= 0 for n in self.max_steps):
            raise ValueError("learning rates and max_steps must be > 0")
        return self


class VectorGateSpec(Strict):
    """When a vector version may become ``champion``: judged on the red-team summary of that exact version."""

    max_guarded_harmful_rate: float = Field(0.1, ge=0, le=1, description="Worst guarded cell, vectors off.")
    max_over_refusal: float | None = Field(
        0.25, ge=0, le=1, description="Highest benign refusal rate of a guarded model (needs benign_prompts)."
    )
    min_attack_harmful_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The strongest plain attack must reach this harmful rate, so a sweep "
        "that breaks nothing cannot pass a vector.",
    )


class AttackSweepStage(StageBase):
    """Red team: attack the base model over a grid, each cell plain and guarded by the vectors, scored with
    the vectors off; the summary (worst guarded cell) gates the vectors' promotion."""

    kind: Literal["attack_sweep"]
    vectors: list[VectorRef] = Field(..., min_length=1, description="Vectors that guard together in each cell.")
    data: DatasetRef = Field(..., description="Attack data ({prompt, response}).")
    harmful_prompts: DatasetRef = Field(..., description="Held-out harmful prompts scored after each attack.")
    benign_prompts: DatasetRef | None = Field(None, description="Prompts that must not be refused (over-refusal).")
    grid: AttackGrid = AttackGrid()
    training: TrainingSpec = Field(
        TrainingSpec(), description="Shared by every cell; learning_rate and max_steps come from the grid."
    )
    judge: JudgeSpec = JudgeSpec()
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per answer (harm is judged on the opening).")
    gate: VectorGateSpec = VectorGateSpec()
    promote: bool = Field(True, description="Set 'champion' on each registered vector version that passes.")
    safety_replay: SafetyReplaySpec | None = Field(
        None,
        description="Qualify the recipe, not the vector alone: every guarded arm also replays these "
        "alignment rows with the vectors off, as guarded_finetune does; the plain arm never replays.",
    )
    vector_routing: VectorRoutingSpec | None = Field(
        None,
        description="Qualify the recipe with vector routing: every guarded arm trains the attack rows its "
        "vectors do not explain with the vectors off, as guarded_finetune does (an attack the vectors do not "
        "recognise then trains unguarded, and the cell shows it).",
    )

    HASHED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"vector_routing"})


Stage = Annotated[
    AlignmentStage
    | VectorTrainingStage
    | GuardedFinetuneStage
    | EvaluationStage
    | DataPreparationStage
    | AttackSweepStage,
    Field(discriminator="kind"),
]


# Memory of one GPU in GB (10^9 bytes, as vendors state it) for `scaling.gpu`.
KNOWN_GPUS = {
    "T4": 16,
    "V100-16GB": 16,
    "V100-32GB": 32,
    "A10G": 24,
    "L4": 24,
    "RTX4090": 24,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100": 80,
    "H100-80GB": 80,
    "H200": 141,
    "B200": 192,
    "MI300X": 192,
}


class ScalingSpec(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    max_failures: int = Field(1, ge=0, description="Ray Train restarts from the last checkpoint this often.")
    checkpoint_every: int = Field(10, gt=0, description="Steps between checkpoints.")
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU; `secvec plan` and `run` refuse "
        "a spec whose stages do not fit. Or name the GPU with `gpu`.",
    )
    gpu: str | None = Field(
        None,
        description="A known GPU name (see `secvec plan --help`), e.g. A100-80GB, H100, "
        "L4, A10G, RTX4090; sets gpu_memory_gb.",
    )

    @model_validator(mode="after")
    def _known_gpu(self):
        if self.gpu is not None and self.gpu not in KNOWN_GPUS:
            raise ValueError(f"unknown gpu {self.gpu!r}; known: {sorted(KNOWN_GPUS)} (or set gpu_memory_gb)")
        if self.gpu is not None and self.gpu_memory_gb is not None:
            raise ValueError("give either gpu or gpu_memory_gb, not both")
        return self

    def memory_per_gpu_gb(self) -> float | None:
        return KNOWN_GPUS[self.gpu] if self.gpu else self.gpu_memory_gb


class TrackingSpec(Strict):
    tracking_uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.secvec/mlflow.db"),
        description="MLflow tracking URI; defaults to $MLFLOW_TRACKING_URI (set by the Helm chart), else local SQLite.",
    )
    artifact_location: str | None = Field(None, description="Artifact root for a new experiment (local default).")
    experiment: str = "secvec"
    base_name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Prefix of registered models: <base_name>.security-vector.<behaviour>, ...",
    )


class PipelineSpec(Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    base_model: ModelRef
    tracking: TrackingSpec
    scaling: ScalingSpec = ScalingSpec()
    work_dir: str = Field(".secvec/work", description="Local scratch and Ray storage.")
    stages: list[Stage] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _stage_references(self):
        seen: dict[str, str] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}]: duplicate stage name {stage.name!r}")
            for where, ref, kinds in _references(stage):
                if ref not in seen:
                    raise ValueError(
                        f"stages[{i}] ({stage.name}).{where}: refers to stage {ref!r}, which is not "
                        f"an earlier stage; earlier stages: {list(seen) or 'none'}"
                    )
                if seen[ref] not in kinds:
                    raise ValueError(
                        f"stages[{i}] ({stage.name}).{where}: stage {ref!r} is a {seen[ref]} stage; "
                        f"expected one of {sorted(kinds)}"
                    )
            seen[stage.name] = stage.kind
        return self

    @model_validator(mode="after")
    def _prepared_splits_and_vector_gate(self):
        """A ``{stage, split}`` data reference names a split that stage writes; a vector gated by an attack_sweep
        is not also promoted unconditionally by its own vector_training stage."""
        by_name = {stage.name: stage for stage in self.stages}
        for i, stage in enumerate(self.stages):
            for where, ref in dataset_refs(stage):
                source = by_name.get(ref.stage)
                if isinstance(source, DataPreparationStage) and ref.split not in source.splits:
                    raise ValueError(
                        f"stages[{i}] ({stage.name}).{where}.split: stage {ref.stage!r} writes splits "
                        f"{list(source.splits)}, not {ref.split!r}"
                    )
            if isinstance(stage, AttackSweepStage) and stage.promote:
                for j, v in enumerate(stage.vectors):
                    source = by_name.get(v.stage)
                    if isinstance(source, VectorTrainingStage) and source.promote:
                        raise ValueError(
                            f"stages[{i}] ({stage.name}).vectors[{j}]: stage {v.stage!r} promotes its "
                            "vector before the red team ran; set 'promote: false' there (this stage's "
                            "gate sets champion)"
                        )
        return self


MODEL_KINDS = {"alignment", "guarded_finetune"}


def _references(stage) -> list[tuple[str, str, set[str]]]:
    refs = []
    if stage.base_model and stage.base_model.stage:
        refs.append(("base_model.stage", stage.base_model.stage, {"alignment"}))
    if isinstance(stage, GuardedFinetuneStage):
        refs += [(f"vectors[{j}].stage", v.stage, {"vector_training"}) for j, v in enumerate(stage.vectors) if v.stage]
    if isinstance(stage, EvaluationStage) and stage.candidate.stage:
        refs.append(("candidate.stage", stage.candidate.stage, MODEL_KINDS))
    if isinstance(stage, AttackSweepStage):
        refs += [(f"vectors[{j}].stage", v.stage, {"vector_training"}) for j, v in enumerate(stage.vectors) if v.stage]
    refs += [(f"{where}.stage", ref.stage, {"data_preparation"}) for where, ref in dataset_refs(stage) if ref.stage]
    return refs


def dataset_refs(node: Any, where: str = "") -> list[tuple[str, DatasetRef]]:
    """Every ``DatasetRef`` inside a stage (nested parts included), with its path in the spec."""
    if isinstance(node, DatasetRef):
        return [(where, node)]
    if isinstance(node, BaseModel):
        found = []
        for name in type(node).model_fields:
            found += dataset_refs(getattr(node, name), f"{where}.{name}" if where else name)
        return found
    if isinstance(node, list):
        return [r for i, item in enumerate(node) for r in dataset_refs(item, f"{where}[{i}]")]
    return []


class SpecError(ValueError):
    """A spec file that does not parse or validate; the message lists each problem with its path."""


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem (``source: path: what is wrong (the value given / the fix)``); a single problem
    gives a single line."""
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _STAGE_TAGS)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(e["type"], "")
        if e["type"] == "extra_forbidden":
            hint = f" (unknown key '{e['loc'][-1]}'; check spelling, see `secvec schema`)"
        elif not hint and e["type"] != "value_error" and not isinstance(e.get("input"), dict | list):
            hint = f" (got {e.get('input')!r})"
        problems.append(f"{path}: {msg}{hint}")
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return "\n".join([f"{source}: {len(problems)} problems in the spec", *(f"  - {p}" for p in problems)])


_STAGE_TAGS = {"alignment", "vector_training", "guarded_finetune", "evaluation", "data_preparation", "attack_sweep"}
_HINTS = {
    "missing": " (add this key)",
    "union_tag_invalid": " (kind must be one of alignment, vector_training, guarded_finetune, evaluation, "
    "data_preparation, attack_sweep)",
    "greater_than_equal": "",
}


def parse_spec(data: Any, source: str = "spec") -> PipelineSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_spec(path: str | Path) -> PipelineSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from None
    return parse_spec(data, str(path))


def with_absolute_paths(spec: PipelineSpec, base: Path | None = None) -> PipelineSpec:
    """The spec with its local paths made absolute against ``base`` (default: the current directory).

    Why: a spec names files relative to where ``secvec run`` starts (``benchmarks/specs/sweep-smollm2.yaml``
    says "from the repository root"), but Ray Train runs every stage in a worker process whose working
    directory is not the driver's, so a relative path that preflight found is "not found" in the stage.
    Dataset and vector ``path`` values always become absolute; a model ``source`` and a dataset ``hf`` value
    only when they name something that exists under ``base`` (otherwise they are hub ids). Absolute paths
    are left alone, so a cluster spec is unchanged.
    """
    base = (base or Path.cwd()).absolute()

    def absolute(path: str) -> str:
        return str(base / Path(path).expanduser()) if not Path(path).expanduser().is_absolute() else path

    def local(name: str) -> bool:
        return not Path(name).is_absolute() and (base / name).exists()

    def fix(value: Any) -> Any:
        if isinstance(value, list):
            items = [fix(item) for item in value]
            return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
        if not isinstance(value, BaseModel):
            return value
        updates = {}
        for name in type(value).model_fields:
            current = getattr(value, name)
            fixed = fix(current)
            if fixed is not current:
                updates[name] = fixed
        if isinstance(value, DatasetRef | VectorRef) and value.path and absolute(value.path) != value.path:
            updates["path"] = absolute(value.path)
        if isinstance(value, DatasetRef) and value.hf and local(value.hf):
            updates["hf"] = absolute(value.hf)
        if isinstance(value, ModelRef) and value.source and local(value.source):
            updates["source"] = absolute(value.source)
        return value.model_copy(update=updates) if updates else value

    fixed = fix(spec)
    return fixed.model_copy(update={"work_dir": absolute(spec.work_dir)})


def json_schema() -> dict:
    return PipelineSpec.model_json_schema()
