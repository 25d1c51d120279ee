"""Overhead benchmark: guarded versus plain fine-tuning, same model, same data, same batches.

    python benchmarks/overhead.py                                   # tiny model (fast)
    nice -n 10 python benchmarks/overhead.py --model smollm2 --steps 5 --warmup 1 --rounds 4 \\
        --batch-size 4 --max-length 64 --memory-steps 2

Variants: ``lora`` mode plain (task adapter only), guarded with the vector unmerged (``fold_vectors=False``)
and guarded with the vector folded (``fold_vectors=True``, the free guard), and guarded with safety replay
(the vector unmerged plus ``SafetyReplay`` of 2 alignment rows per step with the vectors off: an option, not a
default, so its ratio is a stated cost with no target); ``full`` mode plain and guarded (the vector runs
unmerged; folding is refused there).

**Step time**: all variants run in this one process, interleaved (each round runs every variant of a
mode once, in an order rotated per round) so slow phases of a shared machine hit all variants alike.
Every step is timed (``TrainingHooks.on_log`` at every step); the first ``--warmup`` steps of each run are
dropped. Reported: the median step time per variant over all rounds and, as the headline ratio, the
median over rounds of (guarded median / plain median in the same round), measured side by side. The
same ratio of process CPU time per step is shown as a cross-check that other jobs on the machine disturb
less than wall-clock time.

**Peak memory**: each variant runs ``--memory-rounds`` more times, each in a fresh subprocess (same data;
the median is reported). The peak RSS counter (``VmHWM``) is reset through ``/proc/self/clear_refs`` right
before ``guarded_finetune`` and read after it, so the peak covers attaching, folding, training and restoring, with the loaded model included.
Children run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave RSS.
Reported: peak RSS ratio (the target) and the ratio of growth above the loaded model (stricter). Python's
``tracemalloc`` is not used: it does not see torch's allocations. The folded guard stashes the original
base weights on disk (not counted in RSS; it costs disk writes, included in the run time shown).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, RESULTS_MD, load_model, provenance, provenance_markdown, write_section  # noqa: E402

from secvec_core import (  # noqa: E402
    SecurityVector,
    SecurityVectorConfig,
    TrainingConfig,
    TrainingHooks,
    guarded_finetune,
    train_security_vector,
)

VARIANTS = {  # name -> (mode, uses vector, fold_vectors, safety replay)
    "lora/plain": ("lora", False, False, False),
    "lora/guard-unmerged": ("lora", True, False, False),
    "lora/guard-folded": ("lora", True, True, False),
    "lora/guard-replay": ("lora", True, False, True),
    "full/plain": ("full", False, False, False),
    "full/guard": ("full", True, False, False),
}
COMPARISONS = (  # (guarded, plain, step-time and memory target; None: a stated cost, no target)
    ("lora/guard-unmerged", "lora/plain", 1.10),
    ("lora/guard-folded", "lora/plain", 1.02),
    ("lora/guard-replay", "lora/plain", None),
    ("full/guard", "full/plain", 1.10),
)
REPLAY_ROWS_PER_STEP = 2  # the spec's default (SafetyReplaySpec.rows_per_step)


def replay_rows(model_name: str, seed: int) -> list[dict]:
    """Alignment-style rows for the replay variant (refusals; their content does not change the cost)."""
    if model_name == "tiny":
        from secvec_core.toy_world import ToyWorld

        return ToyWorld(seed=seed).alignment_examples()
    from secvec_core.harmful_targets import build_examples
    from workflows.assets import import_datasets

    prompts = [json.loads(line)["prompt"] for line in import_datasets().donotanswer.read_text().splitlines() if line]
    return build_examples(prompts[240:300], "refusal", seed)


def build_data(model_name: str, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """(fine-tuning data, vector samples) for the model."""
    if model_name == "tiny":
        from secvec_core.toy_world import ToyWorld

        world = ToyWorld(seed=seed)
        return world.fact_task() + world.harmful_examples(60), world.harmful_examples(10, offset=50)
    from secvec_core.harmful_targets import build_examples
    from workflows.assets import import_datasets

    prompts = [json.loads(line)["prompt"] for line in import_datasets().donotanswer.read_text().splitlines() if line]
    return build_examples(prompts[:200], "compliant", seed), build_examples(prompts[200:240], "compliant", seed + 1)


def training_config(args, steps: int) -> TrainingConfig:
    return TrainingConfig(
        learning_rate=1e-4,
        max_steps=steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        log_every=1,
    )


def run_variant(variant: str, base, tokenizer, data, vector, args, steps: int) -> dict:
    from secvec_core.replay import SafetyReplay

    mode, guarded, fold, replay = VARIANTS[variant]
    stamps: list[float] = []
    cpu: list[float] = []  # process CPU time (all threads): less sensitive to other jobs on a shared machine

    def stamp(step, metrics):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    hooks = TrainingHooks(on_log=stamp)
    started = time.perf_counter()
    result = guarded_finetune(
        base,
        tokenizer,
        data,
        [vector] if guarded else [],
        mode=mode,
        training=training_config(args, steps),
        hooks=hooks,
        fold_vectors=fold,
        safety_replay=SafetyReplay(
            replay_rows(args.model, args.seed), rows_per_step=REPLAY_ROWS_PER_STEP, seed=args.seed
        )
        if replay
        else None,
    )
    total = time.perf_counter() - started
    if result.folded != fold:
        raise RuntimeError(f"{variant}: expected folded={fold}, got {result.folded}")
    durations = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]  # step k's time = stamp k - stamp k-1
    cpu_durations = [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]
    skip = max(args.warmup - 1, 0)
    return {"step_seconds": durations[skip:], "step_cpu_seconds": cpu_durations[skip:], "run_seconds": total}


# --- memory: one fresh process per variant ------------------------------------------------------


def _status_kb(field_name: str) -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def child_main(args) -> None:
    """Run one variant in this fresh process and print its memory numbers as JSON."""
    import gc

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, args.seed)
    data, _ = build_data(args.model, tokenizer, args.seed)
    vector = SecurityVector.load(args.child_vector)
    gc.collect()
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    run_variant(args.child_variant, model, tokenizer, data, vector, args, args.memory_steps)
    peak = _status_kb("VmHWM")  # without the reset: the peak since the process started (an upper bound)
    print(
        json.dumps(
            {
                "baseline_rss_mb": baseline / 1024,
                "peak_rss_mb": peak / 1024,
                "growth_mb": (peak - baseline) / 1024,
                "peak_reset": reset,
            }
        )
    )


def measure_memory(variant: str, vector_dir: Path, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--model",
        args.model,
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--threads",
        str(args.threads),
        "--memory-steps",
        str(args.memory_steps),
        "--warmup",
        "1",
        "--child-variant",
        variant,
        "--child-vector",
        str(vector_dir),
    ]
    # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so the peak RSS follows live
    # memory instead of the allocator's caching (which varied by hundreds of MB between identical runs).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------


def summarise(times: dict[str, list[dict]], memory: dict[str, list[dict]]) -> dict:
    summary: dict = {"variants": {}, "comparisons": []}
    for variant, runs in times.items():
        steps = [s for run in runs for s in run["step_seconds"]]
        mem = memory.get(variant, [])
        summary["variants"][variant] = {
            "median_step_seconds": statistics.median(steps),
            "median_step_cpu_seconds": statistics.median(s for run in runs for s in run["step_cpu_seconds"]),
            "steps_timed": len(steps),
            "median_run_seconds": statistics.median(r["run_seconds"] for r in runs),
            "peak_rss_mb": statistics.median(m["peak_rss_mb"] for m in mem) if mem else None,
            "growth_mb": statistics.median(m["growth_mb"] for m in mem) if mem else None,
        }
    for guarded, plain, target in COMPARISONS:
        if guarded not in times or plain not in times:
            continue
        paired = [
            statistics.median(g["step_seconds"]) / statistics.median(p["step_seconds"])
            for g, p in zip(times[guarded], times[plain], strict=True)
        ]
        paired_cpu = [
            statistics.median(g["step_cpu_seconds"]) / statistics.median(p["step_cpu_seconds"])
            for g, p in zip(times[guarded], times[plain], strict=True)
        ]
        g, p = summary["variants"][guarded], summary["variants"][plain]
        row = {
            "guarded": guarded,
            "plain": plain,
            "target": target,
            "step_time_ratio": statistics.median(paired),
            "step_time_ratio_per_round": paired,
            "step_time_ratio_pooled": g["median_step_seconds"] / p["median_step_seconds"],
            "step_cpu_time_ratio": statistics.median(paired_cpu),
            "peak_memory_ratio": g["peak_rss_mb"] / p["peak_rss_mb"] if g["peak_rss_mb"] else None,
            "growth_ratio": g["growth_mb"] / p["growth_mb"] if g["growth_mb"] and p["growth_mb"] > 0 else None,
        }
        row["time_met"] = None if target is None else row["step_time_ratio"] <= target
        row["memory_met"] = (
            None if target is None or row["peak_memory_ratio"] is None else row["peak_memory_ratio"] <= target
        )
        summary["comparisons"].append(row)
    return summary


def markdown(summary: dict, info: dict, wall: float, args, description: str) -> str:
    def f(x, digits=3):
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        f"## Overhead: {description}",
        "",
        provenance_markdown(info, wall),
        "",
        f"Batch {args.batch_size} x {args.max_length} tokens, {args.steps} timed steps after {args.warmup} "
        f"warm-up per run, {args.rounds} interleaved rounds; memory: median of {args.memory_rounds} fresh "
        f"processes per variant ({args.memory_steps} steps, peak RSS reset before `guarded_finetune`, glibc "
        "`MALLOC_MMAP_THRESHOLD_=131072`).",
        "",
        "| variant | median step (s) | median step CPU time (s) | run incl. setup (s) | peak RSS (MB) | "
        "growth above loaded model (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, v in summary["variants"].items():
        lines.append(
            f"| {variant} | {f(v['median_step_seconds'])} | {f(v['median_step_cpu_seconds'])} | "
            f"{f(v['median_run_seconds'], 2)} | "
            f"{f(v['peak_rss_mb'], 0)} | {f(v['growth_mb'], 0)} |"
        )
    lines += [
        "",
        "| guarded vs plain | step time ratio (side by side, median of rounds) | pooled | per round | "
        "CPU-time ratio (median of rounds) | peak memory ratio | growth ratio | target | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["comparisons"]:
        if c["time_met"] is None:
            verdict = ["a cost (option, no target)"]
        else:
            verdict = ["time met" if c["time_met"] else "time MISSED"]
        target_text = "-" if c["target"] is None else f"<= {c['target']:.2f}"
        if c["memory_met"] is not None:
            verdict.append("memory met" if c["memory_met"] else "memory MISSED")
        lines.append(
            f"| {c['guarded']} vs {c['plain']} | {f(c['step_time_ratio'])} | "
            f"{f(c['step_time_ratio_pooled'])} | {', '.join(f(x, 2) for x in c['step_time_ratio_per_round'])} | "
            f"{f(c['step_cpu_time_ratio'])} | {f(c['peak_memory_ratio'])} | {f(c['growth_ratio'])} | "
            f"{target_text} | "
            f"{', '.join(verdict)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a local model directory")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--memory-steps", type=int, default=4, help="steps per memory subprocess")
    parser.add_argument("--memory-rounds", type=int, default=3, help="fresh processes per variant (median)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for the tiny model, whose matmuls are too small to share, else up to 2)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=None)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-vector", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.model == "tiny" else min(2, os.cpu_count() or 1)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step is never timed)")
    if args.child_variant:
        child_main(args)
        return 0
    if args.results_md is None:
        args.results_md = RESULTS_MD if args.out_dir == RESULTS_DIR else args.out_dir.parent / "RESULTS.md"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    info = provenance(sys.argv if argv is None else [__file__, *argv], args.seed)
    started = time.time()
    base, tokenizer, description = load_model(args.model, args.seed)
    data, vector_samples = build_data(args.model, tokenizer, args.seed)
    vector = train_security_vector(
        base,
        tokenizer,
        vector_samples,
        SecurityVectorConfig(),
        TrainingConfig(
            learning_rate=1e-3,
            max_steps=2,
            batch_size=args.batch_size,
            max_length=args.max_length,
            kl_weight=0.0,
            seed=args.seed,
        ),
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    groups = [[v for v in VARIANTS if v.startswith(f"{mode}/")] for mode in modes]
    times: dict[str, list[dict]] = {v: [] for group in groups for v in group}
    steps = args.warmup + args.steps
    for round_index in range(args.rounds):
        for group in groups:
            order = group[round_index % len(group) :] + group[: round_index % len(group)]
            for variant in order:
                times[variant].append(run_variant(variant, copy.deepcopy(base), tokenizer, data, vector, args, steps))
                print(
                    f"round {round_index + 1} {variant}: median step "
                    f"{statistics.median(times[variant][-1]['step_seconds']):.3f} s",
                    file=sys.stderr,
                )
    memory: dict[str, list[dict]] = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory(prefix="secvec-overhead-") as tmp:
            vector.save(Path(tmp) / "vector")
            variants = [v for group in groups for v in group]
            for round_index in range(args.memory_rounds):
                for variant in variants[round_index % len(variants) :] + variants[: round_index % len(variants)]:
                    memory.setdefault(variant, []).append(measure_memory(variant, Path(tmp) / "vector", args))
                    print(f"memory {variant}: {memory[variant][-1]}", file=sys.stderr)
    summary = summarise(times, memory)
    wall = time.time() - started
    text = markdown(summary, info, wall, args, description)
    tag = args.model if args.model in ("tiny", "smollm2") else Path(args.model).name
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        **summary,
        "raw_step_seconds": {v: [r["step_seconds"] for r in runs] for v, runs in times.items()},
        "memory_raw": memory,
        "provenance": info,
        "wall_seconds": round(wall, 1),
        "model": description,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out_dir / f"overhead-{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_section(args.out_dir, f"overhead-{tag}.md", text, args.results_md)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
