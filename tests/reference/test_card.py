"""The model card is written from files: a two-stage training log, the exported weights, an evaluation."""

from __future__ import annotations

import gzip
import json

import pytest

from contextlab.reference.card import card_hash, publish, sha256
from contextlab.reference.train import TrainConfig, export_checkpoint, train


def test_card_of_a_two_stage_run_records_both_stages_and_the_weights_hash(tmp_path):
    first, second, model_dir = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "model"
    train(TrainConfig.preset("smoke"), first)
    cfg = TrainConfig.preset("smoke")
    cfg.init_from, cfg.steps, cfg.seed = str(first), 2, 1
    train(cfg, second)
    assert export_checkpoint(second, model_dir) == 2
    evaluation = {
        "perplexity": 7.5,
        "cells": [{"label": "single needle", "task": "niah_single_2", "length": 1024, "accuracy": 0.5, "samples": 4}],
    }
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))

    card = publish(model_dir, second, tmp_path / "eval.json").read_text()

    assert card_hash(model_dir / "MODEL_CARD.md") == sha256(model_dir / "model.safetensors")
    assert "5 steps x 1024 tokens" in card  # 3 smoke steps, then 2 more from their weights
    assert "- stage 1: 3 steps" in card and "- stage 2: 2 steps" in card and "from stage 1's weights" in card
    assert "--preset cpu-long --workdir stage2 --init-from stage1" in card
    assert "| single needle | 50% [15-85] |" in card and "7.500" in card
    assert "- single needle at 1K >= 95%: missed (50%)" in card
    assert "- single needle at 2K >= 95%: not evaluated" in card
    log = gzip.decompress((model_dir / "training_log.jsonl.gz").read_bytes()).decode().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(5))
    assert (model_dir / "loss_curve.png").stat().st_size > 0


def test_a_stage_needs_an_existing_checkpoint_to_start_from(tmp_path):
    cfg = TrainConfig.preset("smoke")
    cfg.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train(cfg, tmp_path / "work")
