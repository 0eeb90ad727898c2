"""Trainable-parameter accounting (PEFT's ``print_trainable_parameters``, per component).

The paper's headline is how little it tunes (0.04% of CLIP); we compute the same
figure for every run, log it, store it in every checkpoint and print it as a table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

COMPONENTS = (
    ("clip.visual.", "backbone: vision tower"),
    ("clip.", "backbone: text tower + rest"),
    ("text_prompts.", "domain prompts: text"),
    ("vision_prompts.", "domain prompts: vision"),
    ("prompt_gates.", "prompt gates"),
    ("cpg.", "context prompt generator"),
    ("query_experts.", "query projection experts"),
    ("text_expert.", "text candidate expert"),
    ("image_expert.", "image candidate expert"),
    ("logit_scale", "temperature"),
)


@dataclass
class ParamReport:
    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (component, trainable, total)
    trainable: int = 0
    total: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "percent": self.percent}

    def summary_line(self) -> str:
        return f"trainable: {self.trainable:,} / {self.total:,} ({self.percent:.4f}%)"

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows) if self.rows else 10
        lines = [f"{'component':<{width}}  {'trainable':>12}  {'total':>12}", "-" * (width + 28)]
        lines += [f"{name:<{width}}  {tr:>12,}  {tot:>12,}" for name, tr, tot in self.rows]
        return "\n".join(lines + ["-" * (width + 28), self.summary_line()])


def parameter_report(model: nn.Module) -> ParamReport:
    counts: dict[str, list[int]] = {label: [0, 0] for _, label in COMPONENTS}
    counts["other"] = [0, 0]
    for name, p in model.named_parameters():
        label = next((lab for prefix, lab in COMPONENTS if name.startswith(prefix)), "other")
        counts[label][1] += p.numel()
        if p.requires_grad:
            counts[label][0] += p.numel()
    rows = [(label, tr, tot) for label, (tr, tot) in counts.items() if tot]
    return ParamReport(rows, sum(r[1] for r in rows), sum(r[2] for r in rows))
