"""Check `secvec plan`'s memory estimate against the measured peak of the same training step.

Each case runs in a fresh subprocess: the model is built from its config with random weights (nothing is
downloaded), a frozen random security vector and a task adapter are attached (``lora``) or the base trains
with the vector on (``full``), and a few steps run at the case's batch and length. Measured: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the growth of peak RSS over the RSS before the model was
built (the Python runtime and libraries are not part of the estimate), with glibc told to return large
blocks at once (``MALLOC_MMAP_THRESHOLD_``) so that the RSS follows the memory in use. The case runs twice
and only the second run is measured (the peak is reset in between through ``/proc/self/clear_refs``): the
first run pages in the kernels' machine code and the runtime's one-off buffers, which differ between CPUs
(AVX-512 or not) and are no part of what the model needs. The estimate is ``secvec plan``'s
own per-worker total for an equivalent one-stage spec.

    nice -n 19 python benchmarks/plan_check.py --quick            # the 60M Llama's two cases (the test's)
    nice -n 19 python benchmarks/plan_check.py                    # + checkpointing, + SmolLM2 if cached
    python benchmarks/plan_check.py --cases tiny-lora tiny-full   # the tiny model: a few MB, below the
                                                                  # plan's 16 MB CPU runtime term (no check)
    python benchmarks/plan_check.py --device cuda --cases llama-1b  # on a GPU (gpu_check.sh does this)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(os.environ.get("SECVEC_CACHE", Path.home() / ".cache" / "secvec")) / "models" / "smollm2-135m-instruct"

CASES = {  # name: (model config or "smollm2", mode, batch, length, checkpointing)
    "tiny-lora": ("tiny", "lora", 8, 32, False),
    "tiny-full": ("tiny", "full", 8, 32, False),
    "llama-60m-lora": ("llama-60m", "lora", 4, 128, False),
    "llama-60m-full": ("llama-60m", "full", 4, 128, False),
    "llama-60m-lora-ckpt": ("llama-60m", "lora", 4, 128, True),
    "smollm2-lora": ("smollm2", "lora", 4, 128, False),
    "smollm2-full": ("smollm2", "full", 2, 128, False),
    "llama-1b-lora": ("llama-1b", "lora", 8, 512, True),
    "llama-1b-full": ("llama-1b", "full", 4, 512, True),
}
CONFIGS = {
    "llama-60m": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _config(model: str):
    from transformers import AutoConfig, LlamaConfig

    from workflows.plan import KNOWN_CONFIGS

    if model == "tiny":
        from secvec_core.tiny import build_tiny_model_and_tokenizer

        return build_tiny_model_and_tokenizer()[0].config
    if model == "smollm2":
        return AutoConfig.from_pretrained(str(SMOLLM2))
    return LlamaConfig(**(CONFIGS.get(model) or KNOWN_CONFIGS[model]))


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # Linux >= 4.0: resets VmHWM to the current RSS


def measure(case: str, device: str, steps: int = 2) -> dict:
    """Run one case in this process and return the measured peak (bytes above the starting point), after a
    warm-up run of the same case whose one-off costs (code pages, runtime buffers) are not measured."""
    import gc

    _run_case(case, device, steps)
    gc.collect()
    if device == "cpu":
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back, so it is not reused unseen
    return _run_case(case, device, steps)


def _run_case(case: str, device: str, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from secvec_core.adapters import TASK_ADAPTER, activate, attach_adapter, lora_config
    from secvec_core.config import DEFAULT_TARGET_MODULES, TrainingConfig
    from secvec_core.precision import weights_dtype
    from secvec_core.training import train_loop

    model_name, mode, batch, length, checkpointing = CASES[case]
    config = _config(model_name)
    dtype = weights_dtype("auto", device, full_weights=mode == "full")
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, config.vocab_size, (length,), generator=generator).tolist()}
        for _ in range(batch)
    ]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    training = TrainingConfig(
        max_steps=steps,
        batch_size=batch,
        max_length=length,
        target_loss=None,
        gradient_checkpointing=checkpointing,
        log_every=steps,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _rss_bytes()
        _reset_peak_rss()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    vector = lora_config(8, 16, 0.0, DEFAULT_TARGET_MODULES)
    model = attach_adapter(model, "security_vector_harmful", vector)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    if mode == "lora":
        model = attach_adapter(model, TASK_ADAPTER, lora_config(8, 16, 0.0, DEFAULT_TARGET_MODULES))
        activate(model, ["security_vector_harmful", TASK_ADAPTER], trainable=[TASK_ADAPTER])
    else:
        activate(model, ["security_vector_harmful"], trainable=[], train_base=True)
    train_loop(model, rows, 0, training)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = _peak_rss_bytes() - start
    return {"case": case, "measured_bytes": peak}


def estimate(case: str, device: str) -> float:
    """``secvec plan``'s per-worker total for a one-stage spec equivalent to ``case``."""
    from workflows.plan import plan_spec
    from workflows.specs import parse_spec

    model_name, mode, batch, length, checkpointing = CASES[case]
    with tempfile.TemporaryDirectory() as directory:
        _config(model_name).save_pretrained(directory)
        training = {"batch_size": batch, "max_length": length, "gradient_checkpointing": checkpointing}
        stage = {
            "name": "ft",
            "kind": "guarded_finetune",
            "data": {"builtin": "toy-facts"},
            "mode": mode,
            "vectors": [{"path": "unused"}],
            "training": training,
            "folding": {"fold": False},
        }
        spec = parse_spec(
            {
                "name": "check",
                "base_model": {"source": directory},
                "tracking": {"base_name": "check", "tracking_uri": "sqlite:///unused.db"},
                "scaling": {"num_workers": 1, "use_gpu": device == "cuda"},
                "stages": [stage],
            }
        )
        return plan_spec(spec).stages[0].total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="*", help=f"Some of {list(CASES)}.")
    parser.add_argument("--quick", action="store_true", help="Only the 60M Llama's LoRA and full cases.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device)))
        return
    cases = args.cases or (
        ["llama-60m-lora", "llama-60m-full"]
        if args.quick
        else [
            c
            for c in CASES
            if not c.startswith(("llama-1b", "tiny")) and (not c.startswith("smollm2") or SMOLLM2.is_dir())
        ]
    )
    rows = []
    print(f"{'case':24} {'estimate MB':>12} {'measured MB':>12} {'ratio':>7}")
    for case in cases:
        # Large blocks through mmap, so freed memory leaves the RSS at once and the peak RSS is the peak in use.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(
            [sys.executable, __file__, "--one", case, "--device", args.device],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        measured = json.loads(done.stdout.strip().splitlines()[-1])["measured_bytes"]
        planned = estimate(case, args.device)
        rows.append(
            {"case": case, "estimate_mb": planned / 1e6, "measured_mb": measured / 1e6, "ratio": planned / measured}
        )
        print(f"{case:24} {planned / 1e6:12.1f} {measured / 1e6:12.1f} {planned / measured:7.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
