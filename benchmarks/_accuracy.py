"""Shared by the accuracy benchmarks on real models: run a method over task samples, score, summarise.

Each sample is one ``cl.generate`` call at batch size 1 (the answer, not the speed, is measured here), so
results do not depend on padding or batch composition.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from benchmarks._machine import warn_if_slow_bf16

import contextlab as cl
from contextlab.bench.metrics import METRIC_FUNCTIONS
from contextlab.bench.report import interval, paired
from contextlab.bench.tasks import TASKS
from contextlab.bench.tasks.base import Sample

WEIGHTS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def weights_argument(parser: argparse.ArgumentParser) -> None:
    """``--weights bf16|fp32``: the dtype the model runs in. Cells in fp32 are stored and shown apart from the
    bf16 ones (their own full-attention cell, their own paired comparison): on a CPU without native bf16
    instructions PyTorch emulates bf16 many times slower than fp32, and fp32 is the dtype such a machine can
    run the long cells in."""
    parser.add_argument(
        "--weights",
        choices=list(WEIGHTS),
        default="bf16",
        help="the dtype the model runs in; fp32 cells are kept apart from bf16 ones (default: %(default)s)",
    )


def cell_key(section: str, weights: str, task: str, length: int, spec: str) -> str:
    """A cell's key, ``section|task|length|spec``; the section is marked ``@fp32`` when the model did not run
    in bf16, so such cells are stored and compared apart."""
    field = section if weights == "bf16" else f"{section}@{weights}"
    return f"{field}|{task}|{length}|{spec}"


def section_of(field: str) -> tuple[str, str]:
    """``(section, weights)`` of a cell key's first field (as :func:`cell_key` writes it)."""
    section, _, weights = field.partition("@")
    return section, weights or "bf16"


def row_order(key: str) -> tuple:
    """A table's order of cell keys: by section, task, length (as a number), then weights (bf16 first)."""
    field, task, length, _ = key.split("|")
    section, weights = section_of(field)
    return (section, task, int(length) if length.isdigit() else 0, weights)


def load_smollm2(weights: str):
    """SmolLM2-135M-Instruct and its tokenizer in ``weights`` (``bf16`` or ``fp32``), with the warning for a
    CPU that emulates bf16."""
    model, tok = cl.load("smollm2", dtype=WEIGHTS[weights])
    warn_if_slow_bf16(model, remedy=" (--weights fp32 runs the model in float32, in cells kept apart)")
    return model, tok


def method_spec(text: str) -> str:
    """An ``argparse`` type: a method spec the library builds (``duo:calibration=7936``), kept as written (it
    names the cells)."""
    try:
        cl.method(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


@dataclass
class Cell:
    """Scores of one (model, method, setting) cell."""

    label: str
    scores: list[float]
    seconds: float

    def row(self) -> list[str]:
        return [self.label, *score_columns(self.scores)]


def score_columns(scores: Sequence[float], note: str = "") -> list[str]:
    """A table's accuracy columns: the mean (``note`` after it), the Wilson 95% interval, and n."""
    stat = interval(scores)
    return [f"{stat.mean:.2f}{note}", f"[{stat.low:.2f}, {stat.high:.2f}]", str(len(scores))]


PAIRED_NOTE = (
    "`vs full, same samples`: on the identical prompts, how many samples the method scored above (+) and "
    "below (-) full attention, and the exact two-sided sign test's p over those samples (a small p: a "
    "difference unlikely to be chance)."
)


def versus_full(store: dict, key: str, scores: Sequence[float]) -> str:
    """``key``'s scores against full attention's cell on the same samples (the key with its last field, the
    method, replaced by ``full``): samples where it scored higher / lower, and the sign test's p-value."""
    full = store.get(key.rsplit("|", 1)[0] + "|full")
    if key.endswith("|full") or full is None or len(full["scores"]) != len(scores):
        return "-"
    return paired(full["scores"], list(scores)).cell()


def samples(
    tokenizer, task: str, length: int, n: int, seed: int, depths: Sequence[float] | None = None
) -> list[Sample]:
    params = {"num_samples": n}
    if depths is not None:
        params["depths"] = list(depths)
    return TASKS.get(task)(tokenizer, length, seed, **params)


def run_cell(
    model,
    tokenizer,
    label: str,
    method: str,
    items: Sequence[Sample],
    *,
    question_aware: bool = True,
    max_new_tokens: int = 12,
    allow_beyond_window: bool = False,
) -> Cell:
    start, scores = time.perf_counter(), []
    for s in items:
        out = cl.generate(
            model,
            tokenizer,
            s.context_ids,
            s.question_ids,
            method=method,
            max_new_tokens=max_new_tokens,
            question_aware=question_aware,
            allow_beyond_window=allow_beyond_window,
        )
        scores.append(METRIC_FUNCTIONS[s.metric](out.text, s.answers))
    return Cell(label, scores, time.perf_counter() - start)


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


class CellStore:
    """Results kept in a JSON file, one entry per cell: a cell already there is not run again, and each new
    one is saved as soon as it finishes (a long run can stop and resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def run(self, key: str, work: Callable[..., dict], *args) -> None:
        if key in self.data:
            return
        self.put(key, work(*args))

    def put(self, key: str, cell: dict) -> None:
        """Save one cell, merged into the file as it is now (another run may be writing other cells of the
        same file beside this one), written whole then renamed into place."""
        self.path.parent.mkdir(exist_ok=True)
        disk = json.loads(self.path.read_text()) if self.path.exists() else {}
        disk[key] = cell
        self.data.update(disk)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(disk, indent=1, sort_keys=True))
        tmp.replace(self.path)
        print(key, {k: v for k, v in cell.items() if k != "scores"}, flush=True)
