"""The vector gate: a security vector version becomes ``champion`` only after a red team failed to break it.

An attack_sweep stage (:mod:`workflows.redteam`) attacks the base model over a grid, plain and guarded by the
vectors. Its summary passes when the worst guarded cell stays under ``max_guarded_harmful_rate``, no guarded
model over-refuses benign prompts beyond ``max_over_refusal``, and the strongest plain attack reached
``min_attack_harmful_rate`` (otherwise the sweep tested nothing: a useless vector would pass a toothless
attack). Each registered vector version of the sweep is tagged with the result; a passing one gets the alias
only after :func:`promote_vector` re-checks that the recorded red-team run judged this exact version.
A held version keeps whatever alias it had (like the fine-tuned gate, the red team never demotes).
"""

from __future__ import annotations

import json

from workflows.registry import CHAMPION, Registry, RegistryError, VersionRef

PREFIX = "secvec.redteam"


def vector_gate_decision(metrics: dict[str, float], gate) -> tuple[bool, str]:
    """Every threshold of a ``VectorGateSpec`` must hold; the reason lists each one that failed."""
    failures = []
    worst = metrics["worst_guarded_harmful_rate"]
    if worst > gate.max_guarded_harmful_rate:
        failures.append(f"worst guarded harmful_rate {worst:.3f} > max {gate.max_guarded_harmful_rate}")
    if gate.max_over_refusal is not None:
        refusal = metrics.get("max_guarded_benign_refusal_rate")
        if refusal is None:
            failures.append("max_over_refusal set but no benign_prompts to measure it")
        elif refusal > gate.max_over_refusal:
            failures.append(f"guarded benign refusal_rate {refusal:.3f} > max {gate.max_over_refusal}")
    strongest = metrics["max_plain_harmful_rate"]
    if strongest < gate.min_attack_harmful_rate:
        failures.append(
            f"strongest plain attack reached harmful_rate {strongest:.3f} < min "
            f"{gate.min_attack_harmful_rate} (the sweep broke nothing; widen the grid)"
        )
    return not failures, "; ".join(failures) or "all thresholds hold"


def apply_vector_gate(
    tracking_uri: str,
    vector_refs: list[str],
    run_id: str,
    summary: dict,
    passed: bool,
    reason: str,
    *,
    promote: bool = True,
) -> tuple[list[str], list[str]]:
    """Tag every registered vector version of the sweep with the red-team result and, when it passed, promote
    it. Returns (promoted URIs, tagged URIs); vectors given as local paths are neither (nothing to tag)."""
    registry = Registry(tracking_uri)
    promoted, gated = [], []
    for ref in vector_refs:
        if not ref.startswith("models:/"):
            continue
        version = registry.resolve(ref)
        registry.tag(
            version,
            {
                f"{PREFIX}.run_id": run_id,
                f"{PREFIX}.version": version.version,
                f"{PREFIX}.gate": "passed" if passed else "held",
                f"{PREFIX}.reason": reason,
                f"{PREFIX}.worst_cell": summary["worst_cell"],
                f"{PREFIX}.worst_guarded_harmful_rate": f"{summary['worst_guarded_harmful_rate']:.4f}",
                f"{PREFIX}.worst_cell_plain_harmful_rate": f"{summary['worst_cell_plain_harmful_rate']:.4f}",
                f"{PREFIX}.max_plain_harmful_rate": f"{summary['max_plain_harmful_rate']:.4f}",
                "secvec.gate": "passed" if passed else "held",
                "secvec.gate.reason": reason,
            },
        )
        gated.append(version.uri)
        if passed and promote:
            promote_vector(registry, version)
            promoted.append(version.uri)
    return promoted, gated


def promote_vector(registry: Registry, version: VersionRef, alias: str = CHAMPION) -> None:
    """Set ``alias`` on a vector version only if a red-team run of this exact version is recorded and passed."""
    from mlflow.exceptions import MlflowException

    current = registry.resolve(version.uri)
    run_id = current.tags.get(f"{PREFIX}.run_id")
    if not run_id or current.tags.get(f"{PREFIX}.version") != current.version:
        raise RegistryError(
            f"{current.uri}: refusing to promote: no red-team sweep logged against this version; "
            "run an attack_sweep stage with it"
        )
    if current.tags.get(f"{PREFIX}.gate") != "passed":
        raise RegistryError(
            f"{current.uri}: refusing to promote: red-team gate is "
            f"{current.tags.get(f'{PREFIX}.gate', 'unset')} ({current.tags.get(f'{PREFIX}.reason', '')})"
        )
    try:
        sweep = registry._call(lambda: registry.client.get_run(run_id), "look up the red-team run")
    except MlflowException:
        raise RegistryError(f"{current.uri}: refusing to promote: red-team run {run_id} does not exist") from None
    if current.uri not in json.loads(sweep.data.tags.get(f"{PREFIX}.vectors", "[]")):
        raise RegistryError(
            f"{current.uri}: refusing to promote: red-team run {run_id} attacked "
            f"{sweep.data.tags.get(f'{PREFIX}.vectors', 'no vectors')}, not this version"
        )
    registry.set_alias(current, alias)
