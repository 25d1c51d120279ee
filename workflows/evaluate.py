"""The evaluation stage: score a fine-tuned candidate (vector off, as shipped, and on for the transfer
gap), log it on the candidate's run and version, and apply the promotion gate or the monitoring check."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from secvec_core import exact_match_accuracy, score_answers
from secvec_core.evaluation import refusal_rate, retained_qa_hits
from secvec_core.training import rank_and_world


def _sharded_mean(values_fn, items: list) -> float:
    """Mean of a per-item score computed on this rank's slice, combined over all ranks."""
    rank, world = rank_and_world()
    shard = items[rank::world]
    local = torch.tensor([values_fn(shard) * len(shard) if shard else 0.0, float(len(shard))], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return float(local[0] / max(local[1], 1.0))


def gate_decision(metrics: dict[str, float], gate) -> tuple[bool, str]:
    """Every threshold must hold; the reason lists each one that failed."""
    failures = []
    if metrics["harmful_rate"] > gate.max_harmful_rate:
        failures.append(f"harmful_rate {metrics['harmful_rate']:.3f} > max {gate.max_harmful_rate}")
    if gate.min_task_metric is not None:
        acc = metrics.get("task_accuracy")
        if acc is None:
            failures.append("min_task_metric set but no task_data to measure it")
        elif acc < gate.min_task_metric:
            failures.append(f"task_accuracy {acc:.3f} < min {gate.min_task_metric}")
    if gate.max_transfer_gap is not None and metrics.get("transfer_gap") is not None:
        if abs(metrics["transfer_gap"]) > gate.max_transfer_gap:
            failures.append(f"|transfer_gap| {abs(metrics['transfer_gap']):.3f} > max {gate.max_transfer_gap}")
    return not failures, "; ".join(failures) or "all thresholds hold"


def guard_label(tags: dict[str, str]) -> str:
    """How a fine-tuned version was trained, in words: "plain", or its vectors with their safety replay and
    vector routing."""
    vectors = [ref.removeprefix("models:/") for ref in json.loads(tags.get("secvec.guarded_by", "[]"))]
    replay = tags.get("secvec.safety_replay", "none")
    replay_words = None if replay == "none" else f"safety replay ({replay})"
    if not vectors:
        return "plain" if replay_words is None else f"{replay_words} only, no vector"
    routing = tags.get("secvec.vector_routing", "none")
    return (
        f"vectors {', '.join(vectors)}"
        + ("" if replay_words is None else f" + {replay_words}")
        + ("" if routing == "none" else f" + routing ({routing})")
    )


def evaluate_candidate(worker) -> dict:
    from secvec_core.guard import reattach_for_evaluation
    from workflows.datasets import load_examples, load_prompt_list, load_qa_items
    from workflows.models import download_registered, load_base_for_device, load_vector
    from workflows.registry import Registry

    spec, ctx = worker.spec, worker.ctx
    registry = Registry(ctx.tracking_uri)
    candidate = registry.resolve(ctx.candidate_uri)
    if candidate.tags.get("secvec.mode") not in ("lora", "full"):
        raise ValueError(
            f"{ctx.candidate_uri} is not a secvec fine-tuned model (no secvec.mode tag); "
            "evaluate a version registered by a guarded_finetune stage"
        )
    downloads = str(worker.scratch / "downloads")
    artifact = download_registered(candidate.uri, ctx.tracking_uri, downloads)
    # on the worker's device, in bfloat16 on a GPU (float32 on a CPU); fingerprinted as float32
    base, tokenizer, base_fingerprint = load_base_for_device(
        candidate.tags["secvec.base_model"],
        ctx.tracking_uri,
        worker._device(),
        "auto",
        full_weights=False,
        cache=downloads,
    )
    vectors = [load_vector(ref, ctx.tracking_uri, downloads) for ref in json.loads(candidate.tags["secvec.guarded_by"])]
    judge = spec.judge.build()
    prompts = load_prompt_list(spec.harmful_prompts)
    n_tokens = spec.max_new_tokens

    def harm(model) -> tuple[float, float]:
        """Harmful and degenerate shares (a degenerate answer is neither a refusal nor compliance)."""
        reports = {}

        def share(verdict):
            def fn(shard):
                key = (shard[0], len(shard))
                if key not in reports:
                    reports[key] = score_answers(model, tokenizer, shard, judge, max_new_tokens=n_tokens)
                return reports[key].share(verdict)

            return fn

        return _sharded_mean(share("complied"), prompts), _sharded_mean(share("degenerate"), prompts)

    benign = load_prompt_list(spec.benign_prompts) if spec.benign_prompts is not None else None
    questions = load_qa_items(spec.retained_qa) if spec.retained_qa is not None else None
    task = load_examples(spec.task_data) if spec.task_data is not None else None
    unwanted = load_examples(spec.unwanted_data) if spec.unwanted_data is not None else None

    def utility(model, prefix: str) -> dict[str, float]:
        """What a user keeps: benign requests answered, simple questions still right (vectors as given)."""
        out = {}
        if benign is not None:
            out[f"{prefix}benign_refusal_rate"] = _sharded_mean(
                lambda s: refusal_rate(model, tokenizer, s, max_new_tokens=n_tokens), benign
            )
        if questions is not None:
            out[f"{prefix}retained_qa"] = _sharded_mean(
                lambda s: retained_qa_hits(model, tokenizer, s, max_new_tokens=spec.qa_max_new_tokens) / len(s),
                questions,
            )
        return out

    started = time.time()
    metrics: dict[str, float] = {"harmful_n": float(len(prompts))}
    metrics.update(
        {
            f"{k}_n": float(len(v))
            for k, v in (("benign", benign), ("retained_qa", questions), ("task", task), ("unwanted", unwanted))
            if v is not None
        }
    )
    if spec.score_base:
        metrics["base_harmful_rate"], metrics["base_degenerate_rate"] = harm(base)
        metrics.update(utility(base, "base_"))
    result = reattach_for_evaluation(base, artifact, vectors, base_fingerprint=base_fingerprint)
    with result.vectors_on(False) as shipped:
        metrics["harmful_rate"], metrics["degenerate_rate"] = harm(shipped)
        if task is not None:
            metrics["task_accuracy"] = _sharded_mean(lambda s: exact_match_accuracy(shipped, tokenizer, s), task)
        if unwanted is not None:  # e.g. fabricated answers: learning them is the harm
            metrics["unwanted_learned"] = _sharded_mean(lambda s: exact_match_accuracy(shipped, tokenizer, s), unwanted)
        metrics.update(utility(shipped, ""))
    if spec.task_data is not None and vectors:
        with result.vectors_on(True) as guarded:
            metrics["task_accuracy_vector_on"] = _sharded_mean(
                lambda s: exact_match_accuracy(guarded, tokenizer, s), task
            )
        metrics["transfer_gap"] = metrics["task_accuracy_vector_on"] - metrics["task_accuracy"]
    metrics["eval_seconds"] = time.time() - started
    output = {"uri": candidate.uri, "candidate": candidate.uri, "metrics": metrics, "monitor": spec.monitor}
    if worker.rank != 0:
        return output
    worker.mlflow.log_metrics(metrics)
    worker.mlflow.set_tags({"secvec.candidate": candidate.uri, "secvec.eval.guard": guard_label(candidate.tags)})
    for k, v in metrics.items():  # also on the candidate's own run
        registry.client.log_metric(candidate.run_id, f"eval.{k}", float(v))
    eval_tags = {
        "secvec.eval.run_id": worker.run_id,
        "secvec.eval.version": candidate.version,
        **{f"secvec.eval.{k}": f"{v:.4f}" for k, v in metrics.items()},
    }
    passed, reason = gate_decision(metrics, spec.gate)
    output.update(passed=passed, reason=reason)
    if spec.monitor:
        regressed = metrics["harmful_rate"] > spec.gate.max_harmful_rate
        registry.tag(
            candidate,
            {
                **eval_tags,
                "secvec.monitor.last_run_id": worker.run_id,
                "secvec.monitor.regressed": str(regressed).lower(),
                "secvec.monitor.reason": reason if regressed else "harmful rate within threshold",
            },
        )
        output["regressed"] = regressed
        return output
    registry.tag(candidate, {**eval_tags, "secvec.gate": "passed" if passed else "held", "secvec.gate.reason": reason})
    if passed:
        registry.promote_finetuned(candidate)
        output["alias"] = "champion"
    return output
