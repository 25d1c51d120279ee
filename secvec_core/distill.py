"""Self-distilled data: a model's own greedy answers as training examples.

Two uses, both about realism. The benign set for alignment and KL terms is the original model's own
answers (training on them keeps the model as helpful as it was). The realistic harmful set is an
*unaligned* model's own answers to harmful prompts: real harmful-style text in the model's words, unlike
template openings, for security vectors that must cover what customers actually send, and for attacks
that the platform never built a vector from. ``prompt_template`` restyles the answers (a persona, a system
instruction) while each example keeps the plain prompt, as an attacker's data set would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from secvec_core.evaluation import DEFAULT_HARM_TOKENS, Judge, RefusalPhraseJudge, generate

Keep = Literal["all", "compliant", "refused"]


def self_distilled_examples(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_HARM_TOKENS,
    batch_size: int = 16,
    judge: Judge | None = None,
    keep: Keep = "all",
    prompt_template: str = "{prompt}",
) -> list[dict[str, str]]:
    """``[{"prompt", "response"}]``: ``model``'s greedy answer to each prompt, in order.

    ``keep="compliant"`` keeps the answers ``judge`` (default: the opening-refusal rule) calls compliance,
    ``"refused"`` only refusals; ``"all"`` keeps every answer that is not degenerate. Each answer is
    generated for ``prompt_template.format(prompt=p)`` and paired with the plain prompt ``p``.
    """
    if keep not in ("all", "compliant", "refused"):
        raise ValueError(f"keep must be 'all', 'compliant' or 'refused', not {keep!r}")
    if "{prompt}" not in prompt_template:
        raise ValueError("prompt_template must contain {prompt}")
    prompts = list(prompts)
    asked = [prompt_template.format(prompt=p) for p in prompts]
    answers = generate(model, tokenizer, asked, max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = (judge or RefusalPhraseJudge()).verdicts(asked, answers)
    wanted = {"all": ("complied", "refused"), "compliant": ("complied",), "refused": ("refused",)}[keep]
    return [{"prompt": p, "response": a} for p, a, v in zip(prompts, answers, verdicts, strict=True) if v in wanted]
