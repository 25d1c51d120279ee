"""The GPU check of issue 12: cost of the guard at scale, in bfloat16, on one GPU, nothing downloaded.

A Llama of about 1.1B parameters (hidden 2048, 16 layers, GQA 32/8 heads, vocabulary 32000) is built from its
config with random weights, and a random security vector (rank 8 on every linear layer) is attached. Each
case trains a few steps at batch 8 x 512 tokens and reports the median step time and the peak GPU memory
(``torch.cuda.max_memory_allocated``), next to ``secvec plan``'s estimate for the same step:

- LoRA: plain (no vector) / guarded with the vector unmerged / guarded with the vector folded (into bf16
  weights: ``allow_lossy``) / guarded on float32 weights folded exactly;
- full weights: plain / guarded, unsharded (one process) and sharded (FSDP2 over a one-GPU process group:
  the sharding machinery's own cost; memory per GPU falls with more GPUs as ``secvec plan`` shows).

Targets (issue 12): guarded LoRA step <= 1.05x plain, guarded full <= 1.10x plain, peak memory within 1.05x,
plan within 15% of the measured peak. Run ``bash benchmarks/gpu_check.sh`` (under 8 minutes on one A100/H100);
``--smoke`` runs the same code on the CPU with the tiny model, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [  # name, mode, guarded, fold, sharded, weights dtype
    ("lora-plain", "lora", False, False, False, "bfloat16"),
    ("lora-guarded-unmerged", "lora", True, False, False, "bfloat16"),
    ("lora-guarded-folded", "lora", True, True, False, "bfloat16"),
    ("lora-fp32-guarded-unmerged", "lora", True, False, False, "float32"),
    ("lora-fp32-guarded-folded", "lora", True, True, False, "float32"),
    ("full-plain", "full", False, False, False, "float32"),
    ("full-guarded", "full", True, False, False, "float32"),
    ("full-plain-sharded", "full", False, False, True, "float32"),
    ("full-guarded-sharded", "full", True, False, True, "float32"),
]
VECTOR = "security_vector_harmful"


def _config(smoke: bool):
    from transformers import LlamaConfig

    from workflows.plan import KNOWN_CONFIGS

    if smoke:
        from secvec_core.tiny import build_tiny_model_and_tokenizer

        return build_tiny_model_and_tokenizer()[0].config
    return LlamaConfig(**KNOWN_CONFIGS["llama-1b"])


def run_case(case, config, device: str, batch: int, length: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    from secvec_core.adapters import TASK_ADAPTER, activate, attach_adapter, lora_config
    from secvec_core.config import DEFAULT_TARGET_MODULES, TrainingConfig
    from secvec_core.folding import folded_vectors
    from secvec_core.training import TrainingHooks, train_loop

    name, mode, guarded, fold, sharded, dtype_name = case
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, config.vocab_size, (length,), generator=generator).tolist()}
        for _ in range(batch)
    ]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if device == "cuda" else 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = []
    if guarded:
        model = attach_adapter(model, VECTOR, lora_config(8, 16, 0.0, DEFAULT_TARGET_MODULES))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{VECTOR}." in n and "lora_B" in n:
                    p.normal_(0, 1e-3)
        names = [VECTOR]
    if mode == "lora":
        model = attach_adapter(model, TASK_ADAPTER, lora_config(8, 16, 0.0, DEFAULT_TARGET_MODULES))
        activate(model, [TASK_ADAPTER] if fold else [*names, TASK_ADAPTER], trainable=[TASK_ADAPTER])
    elif guarded:
        activate(model, names, trainable=[], train_base=True)
    else:
        model.requires_grad_(True)
    stamps: list[float] = []

    def on_log(step, metrics):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    training = TrainingConfig(
        learning_rate=1e-5,
        max_steps=steps,
        batch_size=batch,
        max_length=length,
        target_loss=None,
        log_every=1,
        mixed_precision="bf16" if device == "cuda" else "no",
        parallel="fsdp" if sharded else "none",
    )
    with tempfile.TemporaryDirectory() as stash:
        if fold:
            with folded_vectors(model, names, stash="disk", stash_dir=stash, allow_lossy=dtype != torch.float32):
                train_loop(model, rows, 0, training, hooks=TrainingHooks(on_log=on_log))
        else:
            train_loop(model, rows, 0, training, hooks=TrainingHooks(on_log=on_log))
    peak = (torch.cuda.max_memory_allocated() - start) if device == "cuda" else float("nan")
    step_times = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # skip the first two (warm-up)
    del model
    return {
        "case": name,
        "step_seconds": statistics.median(step_times) if step_times else float("nan"),
        "peak_gb": peak / 1e9,
        "estimate_gb": estimate(case, config, batch, length, device) / 1e9,
    }


def estimate(case, config, batch: int, length: int, device: str) -> float:
    """``secvec plan``'s per-worker total for the same step (one worker)."""
    from workflows.plan import plan_spec
    from workflows.specs import parse_spec

    name, mode, guarded, fold, sharded, dtype_name = case
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        training = {
            "batch_size": batch,
            "max_length": length,
            "dtype": dtype_name,
            "mixed_precision": "bf16" if device == "cuda" else "no",
            "parallel": "fsdp" if sharded else "none",
        }
        stage = {
            "name": "ft",
            "kind": "guarded_finetune",
            "data": {"builtin": "toy-facts"},
            "mode": mode,
            "vectors": [{"path": "unused"}] if guarded else [],
            "training": training,
            "folding": {"fold": fold, "allow_lossy": True},
        }
        spec = parse_spec(
            {
                "name": "gpu-check",
                "base_model": {"source": directory},
                "tracking": {"base_name": "check", "tracking_uri": "sqlite:///unused.db"},
                "scaling": {"num_workers": 1, "use_gpu": device == "cuda"},
                "stages": [stage],
            }
        )
        return plan_spec(spec).stages[0].total


def verdicts(rows: dict) -> list[str]:
    def ratio(a, b, key):
        return rows[a][key] / rows[b][key]

    out = []
    for guarded, plain, limit in (
        ("lora-guarded-folded", "lora-plain", 1.05),
        ("lora-fp32-guarded-folded", "lora-plain", None),
        ("lora-guarded-unmerged", "lora-plain", 1.05),
        ("full-guarded", "full-plain", 1.10),
        ("full-guarded-sharded", "full-plain-sharded", 1.10),
    ):
        t, m = ratio(guarded, plain, "step_seconds"), ratio(guarded, plain, "peak_gb")
        target = (
            ""
            if limit is None
            else (
                f" target <= {limit}: {'PASS' if t <= limit else 'FAIL'};"
                f" memory target <= 1.05: {'PASS' if m <= 1.05 else 'FAIL'}"
            )
        )
        out.append(f"{guarded} / {plain}: step {t:.3f}x, peak memory {m:.3f}x;{target}")
    for name, row in rows.items():
        r = row["estimate_gb"] / row["peak_gb"] if row["peak_gb"] == row["peak_gb"] and row["peak_gb"] else float("nan")
        out.append(f"plan / measured peak, {name}: {r:.2f} ({'PASS' if 0.85 <= r <= 1.15 else 'FAIL'})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny model on the CPU, 3 steps (tests the code).")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--out", type=Path, help="Write the rows and verdicts as JSON here.")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    batch, length, steps = (4, 16, 3) if args.smoke else (args.batch, args.length, args.steps)
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    config = _config(args.smoke)
    rows = {}
    print(f"{'case':30} {'step s':>8} {'peak GB':>8} {'plan GB':>8}", flush=True)
    try:
        for case in CASES:
            row = run_case(case, config, device, batch, length, steps)
            rows[row["case"]] = row
            print(
                f"{row['case']:30} {row['step_seconds']:8.3f} {row['peak_gb']:8.2f} {row['estimate_gb']:8.2f}",
                flush=True,
            )
    finally:
        dist.destroy_process_group()
    lines = verdicts(rows) if device == "cuda" else []
    for line in lines:
        print(line)
    if args.out:
        gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)"
        args.out.write_text(
            json.dumps(
                {
                    "device": gpu,
                    "date": time.strftime("%Y-%m-%d"),
                    "batch": batch,
                    "length": length,
                    "rows": rows,
                    "verdicts": lines,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
