"""Write the reference model's folder: weights, tokenizer, model card, loss curve.

``contextlab train-reference --export DIR`` writes the weights; ``publish`` then adds the card, whose
numbers all come from files: the training log, the training config and an ``eval-reference`` JSON.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from contextlab.reference.evaluate import Cell, card_table, quality_bar_lines

WEIGHTS = "model.safetensors"


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_hash(card: str | Path) -> str:
    """The weights hash recorded in a model card (the line ``weights sha256: <hex>``)."""
    for line in Path(card).read_text().splitlines():
        if "weights sha256:" in line:
            return line.split("weights sha256:")[1].strip(" `*")
    raise ValueError(f"{card} records no weights hash")


def _records(log_path: str | Path, steps: int | None) -> list[dict]:
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    return [r for r in records if steps is None or r["step"] < steps]


def stages(workdir: str | Path) -> list[tuple[Path, dict]]:
    """(workdir, training config) of every stage that led to ``workdir``'s weights, first stage first
    (a stage started with ``init_from`` continues from an earlier workdir)."""
    workdir = Path(workdir)
    config = json.loads((workdir / "train_config.json").read_text())
    earlier = stages(config["init_from"]) if config.get("init_from") else []
    return [*earlier, (workdir, config)]


def chained_records(workdir: str | Path, steps: int | None = None) -> list[dict]:
    """The training log of all stages, steps numbered through; ``steps`` cuts the last stage (the
    exported checkpoint)."""
    chain, records = stages(workdir), []
    for i, (folder, _) in enumerate(chain):
        own = _records(folder / "log.jsonl", steps if i == len(chain) - 1 else None)
        records += [r | {"step": r["step"] + len(records), "stage": i + 1} for r in own]
    return records


def training_summary(records: list[dict]) -> dict:
    """Steps, compute time and final loss of a training log."""
    last = records[-100:]
    return {
        "steps": records[-1]["step"] + 1,
        "compute_seconds": sum(r["seconds"] for r in records),
        "final_loss": sum(r["loss"] for r in last) / len(last),
    }


def loss_curve(records: list[dict], out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["step"] for r in records]
    window = 50
    smooth = [
        sum(r["loss"] for r in records[max(0, i - window) : i + 1]) / len(records[max(0, i - window) : i + 1])
        for i in range(len(records))
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [r["loss"] for r in records], lw=0.3, alpha=0.4, label="per step")
    ax.plot(xs, smooth, lw=1.2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / target byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def publish(model_dir: str | Path, workdir: str | Path, eval_json: str | Path) -> Path:
    """Add MODEL_CARD.md, loss_curve.png and the compressed training log to ``model_dir``."""
    model_dir, workdir = Path(model_dir), Path(workdir)
    chain = stages(workdir)
    config = chain[-1][1]
    evaluation = json.loads(Path(eval_json).read_text())
    cells = [Cell(**{k: v for k, v in c.items() if k != "ci95"}) for c in evaluation["cells"]]
    steps_file = model_dir / "trained_steps.json"
    steps = json.loads(steps_file.read_text())["steps"] if steps_file.exists() else None
    records = chained_records(workdir, steps)
    summary = training_summary(records)
    loss_curve(records, model_dir / "loss_curve.png")
    kept = "".join(json.dumps(r) + "\n" for r in records)
    (model_dir / "training_log.jsonl.gz").write_bytes(gzip.compress(kept.encode(), mtime=0))
    model_cfg = json.loads((model_dir / "config.json").read_text())
    params = _parameter_count(model_cfg)
    card = CARD.format(
        params=params / 1e6,
        hidden=model_cfg["hidden_size"],
        layers=model_cfg["num_hidden_layers"],
        heads=model_cfg["num_attention_heads"],
        kv_heads=model_cfg["num_key_value_heads"],
        ffn=model_cfg["intermediate_size"],
        window=model_cfg["max_position_embeddings"],
        theta=model_cfg.get("rope_parameters", {}).get("rope_theta", "?"),
        steps=summary["steps"],
        tokens_per_step=config["tokens_per_step"],
        tokens=summary["steps"] * config["tokens_per_step"] / 1e6,
        hours=summary["compute_seconds"] / 3600,
        device=config["device"],
        threads=config["threads"],
        stage_lines="\n".join(_stage_line(i + 1, folder, cfg) for i, (folder, cfg) in enumerate(chain)),
        reproduce="\n".join(_reproduce_line(folder, cfg) for folder, cfg in chain),
        loss=summary["final_loss"],
        table=card_table(cells),
        bar=quality_bar_lines(cells),
        ppl=evaluation["perplexity"],
        samples=cells[0].samples if cells else 0,
        sha=sha256(model_dir / WEIGHTS),
        config="\n".join(json.dumps(cfg, indent=2) for _, cfg in chain),
        induction_steps=chain[0][1].get("induction_steps", 0),
        induction_length=chain[0][1].get("induction_length", 0),
        copy_until=int(chain[0][1]["steps"] * chain[0][1]["copy_fraction"]),
    )
    path = model_dir / "MODEL_CARD.md"
    path.write_text(card)
    return path


def _stage_line(number: int, folder: Path, cfg: dict) -> str:
    steps = len(_records(folder / "log.jsonl", None))
    lengths = f"{min(cfg['lengths'])}-{max(cfg['lengths'])}"
    start = f", from stage {number - 1}'s weights" if cfg.get("init_from") else ""
    return f"- stage {number}: {steps} steps, lr {cfg['lr']}, lengths {lengths} bytes, seed {cfg['seed']}{start}"


def _reproduce_line(folder: Path, cfg: dict) -> str:
    preset = "cpu-long" if cfg.get("init_from") else "cpu"
    init = f" --init-from {Path(cfg['init_from']).name}" if cfg.get("init_from") else ""
    return f"contextlab train-reference --preset {preset} --workdir {folder.name}{init}"


def _parameter_count(cfg: dict) -> int:
    d, f, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    head = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    attn = d * head * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = attn + 3 * d * f + 2 * d
    embeddings = vocab * d * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + d


CARD = """# contextlab reference model

A small byte-level Llama that contextlab trains itself and ships, so that differences between
long-context methods can be measured on any machine, offline. It is a test bed, not a general model.

- **Architecture**: `LlamaForCausalLM`, {params:.1f}M parameters: hidden {hidden}, {layers} layers,
  {heads} query heads / {kv_heads} KV heads (GQA), FFN {ffn}, RoPE (theta {theta}), native window {window}.
- **Tokenizer**: bytes (ids 0-255 are the byte values) plus `<pad>`, `<bos>`, `<eos>`, `<unk>`; built in code
  (`contextlab.reference.tokenizer`), saved in transformers format.
- **weights sha256:** `{sha}`

## Data
Generated by `contextlab.reference.data` (seeded):
- Natural text: the King James Bible (public domain), from Debian's `bible-kjv` package with verse
  references removed (`contextlab/data/kjv.txt.gz`). The last 5% of its lines are held out (perplexity).
  Loss on every byte.
- Long-context tasks in the benchmark's own prompt format (`Question: ...\\nAnswer:`), needles at uniformly
  random depths, loss on the answers (and the end-of-sequence token) only: single needle (key -> 7-digit
  number or UUID), multi-key with distractors, needle-only haystacks, multi-value, multi-query,
  variable-tracking chains (1-4 hops, 1-2 chains), common/frequent-word extraction, single- and two-hop
  questions over generated facts; plus dense associative recall (`key = value` lines then `key ?` queries)
  and repeated random strings, which give copying circuits more signal per token.
- Order: the first {induction_steps} steps are pure induction data at {induction_length} bytes (a random string, then
  the same string again, loss on the copy): a copying circuit forms there abruptly after a plateau of
  ~250 steps (Olsson et al., 2022), which it had not done after 800 steps of the diluted mixture. Up to
  step {copy_until} the mixture is dominated by dense copying tasks (recall, repeats) at 128-512 bytes; then a
  short-to-long curriculum over 128-4096 bytes with the full mixture.

## Training
{steps} steps x {tokens_per_step} tokens ({tokens:.0f}M tokens seen, padding included), AdamW (warm-up,
flat, linear decay at the end of each stage), bf16 autocast, on `{device}` with {threads} threads:
{hours:.1f} hours of compute. Final training loss (mean of the last 100 steps): {loss:.3f} nats per
target byte. Curve: `loss_curve.png`; log: `training_log.jsonl.gz`.
{stage_lines}

Reproduce (same seeds, same data), one command per stage, from `runs/`:
```bash
{reproduce}
```

## Accuracy (full attention, greedy, {samples} samples per cell, needle depths swept 0-100%)
Produced by `contextlab eval-reference --samples {samples}`; Wilson 95% intervals in brackets.

{table}

Held-out KJV perplexity (bytes, 1K windows): {ppl:.3f}

Quality bar (the project's target for this model):
{bar}

Beyond 4K the model runs past the positions it was trained on; failing there is expected, and is what
context-extension methods must fix.

## Training config (per stage)
```json
{config}
```
"""
