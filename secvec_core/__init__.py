"""secvec_core: security vectors on torch + transformers + peft. No infrastructure imports.

Three phases: ``train_security_vector`` (base frozen, the vector learns the unwanted behaviour),
``guarded_finetune`` (vector on and frozen while the task trains), and inference with the vector off
(``GuardedFinetuneResult.save`` / ``load_finetuned`` ship only the task adapter or full weights).
"""

from secvec_core.config import SecurityVectorConfig, TrainingConfig
from secvec_core.data import Example, dataset_hash, load_jsonl, load_prompts
from secvec_core.evaluation import (
    ClassifierJudge,
    GenerativeJudge,
    RefusalPhraseJudge,
    VerdictReport,
    exact_match_accuracy,
    generate,
    harmful_rate,
    heldout_loss,
    make_judge,
    refusal_rate,
    score_answers,
    score_harmful,
    transfer_gap,
    wilson_interval,
)
from secvec_core.fingerprint import model_fingerprint
from secvec_core.guard import GuardedFinetuneResult, TaskAdapterConfig, guarded_finetune
from secvec_core.inference import VectorLeakError, assert_no_vector, load_finetuned
from secvec_core.tiny import build_tiny_model_and_tokenizer
from secvec_core.training import TrainingHooks, trainable_parameter_names
from secvec_core.vectors import FingerprintMismatchError, SecurityVector, train_security_vector

__all__ = [
    "ClassifierJudge",
    "Example",
    "GenerativeJudge",
    "VerdictReport",
    "score_answers",
    "wilson_interval",
    "FingerprintMismatchError",
    "GuardedFinetuneResult",
    "RefusalPhraseJudge",
    "SecurityVector",
    "SecurityVectorConfig",
    "TaskAdapterConfig",
    "TrainingConfig",
    "TrainingHooks",
    "VectorLeakError",
    "assert_no_vector",
    "build_tiny_model_and_tokenizer",
    "dataset_hash",
    "exact_match_accuracy",
    "generate",
    "guarded_finetune",
    "harmful_rate",
    "heldout_loss",
    "load_finetuned",
    "load_jsonl",
    "load_prompts",
    "make_judge",
    "model_fingerprint",
    "refusal_rate",
    "score_harmful",
    "train_security_vector",
    "trainable_parameter_names",
    "transfer_gap",
]
