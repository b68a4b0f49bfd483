"""Accuracy table of the reference model (or any model): tasks x lengths, greedy, full attention by default.

This produces the model card's table; ``contextlab eval-reference`` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from contextlab.bench.metrics import score
from contextlab.bench.tasks import TASKS
from contextlab.engine.generate import generate

# The quality bar of the reference model: (label, task, params, lengths).
CARD_CELLS = (
    ("single needle", "niah_single_2", {}, (1024, 2048, 4096, 8192, 16384)),
    ("multi-key (4 keys)", "niah_multikey_1", {}, (1024, 2048, 4096, 8192)),
    ("variable tracking (4 hops)", "vt", {"num_hops": 4}, (1024, 2048, 4096, 8192)),
)

# The project's target for the reference model (full attention, >= 50 samples): (label, length) -> accuracy.
QUALITY_BAR = {
    ("single needle", 1024): 0.95,
    ("single needle", 2048): 0.95,
    ("single needle", 4096): 0.95,
    ("multi-key (4 keys)", 4096): 0.85,
    ("variable tracking (4 hops)", 4096): 0.80,
}


@dataclass(frozen=True)
class Cell:
    label: str
    task: str
    length: int
    accuracy: float
    samples: int

    @property
    def ci95(self) -> tuple[float, float]:
        """Wilson 95% interval of the accuracy (scores of these tasks are 0/1 per sample or close to it)."""
        z, n, p = 1.96, self.samples, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_cell(
    model,
    tokenizer,
    task: str,
    length: int,
    *,
    samples: int = 50,
    seed: int = 1234,
    method: str = "full",
    batch_size: int = 8,
    params: dict | None = None,
    max_new_tokens: int = 40,
    label: str | None = None,
) -> Cell:
    """Mean score of ``samples`` samples (depths swept 0..100%) of ``task`` at ``length`` tokens."""
    generated = TASKS.get(task)(tokenizer, length, seed, num_samples=samples, **(params or {}))
    window = getattr(model.config, "max_position_embeddings", None) or 0
    total = 0.0
    for start in range(0, len(generated), batch_size):
        batch = generated[start : start + batch_size]
        out = generate(
            model,
            tokenizer,
            [s.context_ids for s in batch],
            [s.question_ids for s in batch],
            method=method,
            max_new_tokens=max_new_tokens,
            allow_beyond_window=length + max_new_tokens > window,
        )
        total += sum(score(s.metric, text, s.answers) for s, text in zip(batch, out.texts, strict=True))
    return Cell(label=label or task, task=task, length=length, accuracy=total / len(generated), samples=len(generated))


def perplexity(model, tokenizer, text: str, *, window: int = 1024, max_windows: int = 64) -> float:
    """Byte-level perplexity of ``text`` in non-overlapping windows (full attention)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, min(len(ids) - 1, window * max_windows), window):
            chunk = ids[start : start + window]
            inputs = torch.tensor([[bos, *chunk] if bos is not None else chunk], device=device)
            logits = model(input_ids=inputs).logits[0, :-1].float()
            targets = inputs[0, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
    return math.exp(nll / count)


def card_table(cells: list[Cell]) -> str:
    """Markdown table: one row per task, one column per length."""
    lengths = sorted({c.length for c in cells})
    labels = list(dict.fromkeys(c.label for c in cells))
    head = "| task | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |"
    rows = [head, "|---|" + "---|" * len(lengths)]
    for label in labels:
        by_len = {c.length: c for c in cells if c.label == label}
        row = [_cell_text(by_len[n]) if n in by_len else "" for n in lengths]
        rows.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(rows)


def quality_bar_lines(cells: list[Cell]) -> str:
    """One markdown line per target of ``QUALITY_BAR``: met, missed, or not evaluated."""
    found = {(c.label, c.length): c for c in cells}
    lines = []
    for (label, length), target in QUALITY_BAR.items():
        cell = found.get((label, length))
        status = "not evaluated" if cell is None else ("met" if cell.accuracy >= target else "missed")
        got = "" if cell is None else f" ({100 * cell.accuracy:.0f}%)"
        lines.append(f"- {label} at {length // 1024}K >= {100 * target:.0f}%: {status}{got}")
    return "\n".join(lines)


def _cell_text(cell: Cell) -> str:
    low, high = cell.ci95
    return f"{100 * cell.accuracy:.0f}% [{100 * low:.0f}-{100 * high:.0f}]"
