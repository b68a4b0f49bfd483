"""Train the reference model: a small Llama (GQA, RoPE) over bytes, on text + long-context tasks.

Seeded and resumable: every ``save_every`` steps the model, optimiser and data-stream state go to
``<workdir>/checkpoint``; a rerun with the same workdir continues. The learning rate is warm-up, flat,
then a linear decay over the last ``decay_fraction`` of the steps (so a run can be extended before
its decay starts). Loss curves go to ``<workdir>/log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from contextlab.reference.data import COPY_PHASE, INDUCTION_PHASE, Mixture, TrainingStream
from contextlab.reference.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ModelShape:
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            tie_word_embeddings=False,
        )


@dataclass
class TrainConfig:
    """``lengths``/``length_weights_*``: training lengths drawn per step. The start weights hold for the
    first ``short_fraction`` of the steps (copying and retrieval circuits form faster on short, cheap
    sequences), then move linearly to the end weights (a short-to-long curriculum). The first
    ``copy_fraction`` of the steps draw from the copy-heavy mixture ``COPY_PHASE``, and before all of them
    the first ``induction_steps`` train on pure induction data (``INDUCTION_PHASE``) at ``induction_length``."""

    shape: ModelShape = field(default_factory=ModelShape)
    steps: int = 1400
    tokens_per_step: int = 8192
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 3072, 4096)
    length_weights_start: tuple[float, ...] = (3, 2, 1, 0, 0, 0, 0)
    length_weights_end: tuple[float, ...] = (0, 0.5, 1, 1, 2, 2, 3)
    short_fraction: float = 0.4
    copy_fraction: float = 0.4  # steps drawn from the copy-heavy mixture (COPY_PHASE) first
    induction_steps: int = 400  # steps of pure induction data (INDUCTION_PHASE) before everything else
    induction_length: int = 128
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    bf16: bool = True
    save_every: int = 100
    init_from: str | None = None  # a training workdir whose last checkpoint's weights start this run

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """``cpu``: the 2-core CPU run the shipped model came from; ``gpu``: an H100 run (<= 25 min);
        ``cpu-long``: a second CPU stage that starts from the ``cpu`` run's weights (``init_from``) and
        trains on 512-4096 bytes only, where the first stage saw few long sequences;
        ``smoke``: a few steps of a tiny model, for tests."""
        if name == "cpu":
            return cls()
        if name == "gpu":
            return cls(
                steps=12000,
                tokens_per_step=65536,
                lr=2e-3,
                threads=16,
                device="cuda",
                save_every=500,
                copy_fraction=0.15,
            )
        if name == "cpu-long":
            return cls(
                steps=500,
                lr=5e-4,
                warmup_steps=20,
                decay_fraction=0.3,
                lengths=(512, 1024, 2048, 3072, 4096),
                length_weights_start=(1, 1, 2, 2, 3),
                length_weights_end=(1, 1, 2, 2, 3),
                short_fraction=0.0,
                copy_fraction=0.0,
                induction_steps=0,
                seed=1,
            )
        if name == "smoke":
            return cls(
                shape=ModelShape(hidden_size=64, num_layers=2, intermediate_size=128),
                steps=3,
                tokens_per_step=1024,
                lengths=(256, 512),
                length_weights_start=(1, 1),
                length_weights_end=(1, 1),
                warmup_steps=1,
                induction_steps=1,
                save_every=2,
            )
        raise ValueError(f"unknown training preset {name!r}; use {', '.join(PRESETS)}")


PRESETS = ("cpu", "cpu-long", "gpu", "smoke")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return cfg.lr
    frac = (step - decay_start) / max(1, cfg.steps - decay_start)
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * min(1.0, frac))


def phase_at(step: int, cfg: TrainConfig, rng: random.Random) -> tuple[int, Mixture | None]:
    """(sequence length, mixture) of a step; ``None`` means the stream's full mixture."""
    if step < cfg.induction_steps:
        return cfg.induction_length, INDUCTION_PHASE
    length = length_for(step, cfg, rng)
    return length, COPY_PHASE if step < cfg.steps * cfg.copy_fraction else None


def length_for(step: int, cfg: TrainConfig, rng: random.Random) -> int:
    progress = step / max(1, cfg.steps - 1)
    t = min(1.0, max(0.0, (progress - cfg.short_fraction) / max(1e-9, 1 - cfg.short_fraction)))
    weights = [(1 - t) * a + t * b for a, b in zip(cfg.length_weights_start, cfg.length_weights_end, strict=True)]
    return rng.choices(cfg.lengths, weights=weights)[0]


def make_batch(stream: TrainingStream, length: int, batch_size: int, mixture: Mixture | None = None):
    """Right-padded ``[B, length]`` inputs and next-token labels (-100 where no loss)."""
    inputs = torch.full((batch_size, length), PAD_ID, dtype=torch.long)
    labels = torch.full((batch_size, length), -100, dtype=torch.long)
    for row in range(batch_size):
        ids, mask = stream.sample(length, mixture)
        ids_t = torch.tensor(ids)
        inputs[row, : len(ids)] = ids_t
        target = torch.where(torch.tensor(mask[1:]) > 0, ids_t[1:], -100)
        labels[row, : len(ids) - 1] = target
    return inputs, labels


def train(cfg: TrainConfig, workdir: str | Path) -> LlamaForCausalLM:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_byte_tokenizer()
    model = LlamaForCausalLM(cfg.shape.config()).to(cfg.device)
    model.set_attn_implementation("sdpa")
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    stream, rng, start = TrainingStream(tokenizer, cfg.seed), random.Random(cfg.seed), 0
    ckpt = workdir / "checkpoint"
    if (ckpt / "state.pt").exists():
        start, rng, stream.rng = _load_checkpoint(ckpt, model, optimizer)
        log.info("resumed from step %d", start)
    elif cfg.init_from:
        model.load_state_dict(_checkpoint_state(cfg.init_from)["model"])
        log.info("starting from the weights of %s", cfg.init_from)
    (workdir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    model.train()
    with (workdir / "log.jsonl").open("a") as log_file:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            length, mixture = phase_at(step, cfg, rng)
            inputs, labels = make_batch(stream, length, max(1, cfg.tokens_per_step // length), mixture)
            loss = _step(model, optimizer, inputs.to(cfg.device), labels.to(cfg.device), lr_at(step, cfg), cfg)
            record = {
                "step": step,
                "loss": loss,
                "length": length,
                "lr": lr_at(step, cfg),
                "seconds": round(time.perf_counter() - t0, 3),
                "answer_tokens": int((labels >= 0).sum()),
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save_checkpoint(ckpt, model, optimizer, step + 1, rng, stream.rng)
    return model


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _step(model, optimizer, inputs, labels, lr: float, cfg: TrainConfig) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = "cuda" if inputs.is_cuda else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    value = float(loss.detach())
    return value if math.isfinite(value) else float("nan")


def _save_checkpoint(folder: Path, model, optimizer, step: int, rng, stream_rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": pickle.dumps((rng, stream_rng)),
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(folder / "state.pt")


def _checkpoint_state(workdir: str | Path) -> dict:
    path = Path(workdir) / "checkpoint" / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in {workdir} (expected {path})")
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_checkpoint(folder: Path, model, optimizer):
    state = _checkpoint_state(folder.parent)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    rng, stream_rng = pickle.loads(state["rng"])
    return state["step"], rng, stream_rng


def export(model: LlamaForCausalLM, folder: str | Path, step: int | None = None) -> None:
    """Write the model (safetensors, config), the tokenizer and the training step it came from into
    ``folder`` in transformers format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").save_pretrained(folder, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(folder)
    if step is not None:
        (folder / "trained_steps.json").write_text(json.dumps({"steps": step}))


def export_checkpoint(workdir: str | Path, folder: str | Path) -> int:
    """Export the last checkpoint of ``workdir`` without training; returns its step."""
    workdir = Path(workdir)
    cfg_path = workdir / "train_config.json"
    shape = ModelShape(**json.loads(cfg_path.read_text())["shape"])
    model = LlamaForCausalLM(shape.config())
    state = _checkpoint_state(workdir)
    model.load_state_dict(state["model"])
    export(model, folder, state["step"])
    return state["step"]
