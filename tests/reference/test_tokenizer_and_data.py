"""Reference tokenizer round trips; training data is deterministic and exactly as long as asked."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from contextlab.reference.data import INDUCTION_PHASE, TrainingStream, kjv_split
from contextlab.reference.tokenizer import BOS_ID, build_byte_tokenizer

TOKENIZER = build_byte_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
@example("<bos> and <eos> spelled out are plain bytes")
def test_tokenizer_round_trips_any_utf8(text):
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert TOKENIZER.decode(ids) == text


def test_tokenizer_adds_bos_and_saves(tmp_path):
    from transformers import AutoTokenizer

    assert TOKENIZER("hi")["input_ids"] == [BOS_ID, 104, 105]
    TOKENIZER.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("héllo")["input_ids"] == TOKENIZER("héllo")["input_ids"]


def test_training_stream_is_deterministic_and_bounded():
    a, b = TrainingStream(TOKENIZER, seed=3), TrainingStream(TOKENIZER, seed=3)
    for length in (256, 1024, 3000):
        for _ in range(10):
            (ia, ma), (ib, mb) = a.sample(length), b.sample(length)
            assert ia == ib and ma == mb
            assert len(ia) == len(ma) <= length and sum(ma) > 0


def test_induction_samples_repeat_a_string_and_train_only_on_the_copy():
    stream = TrainingStream(TOKENIZER, seed=5)
    for _ in range(20):
        ids, mask = stream.sample(128, INDUCTION_PHASE)
        assert len(ids) == len(mask) == 128 and ids[0] == BOS_ID
        first = mask.index(1)
        n = sum(mask)
        assert mask[first : first + n] == [1] * n and first == 1 + n  # one contiguous copy right after the original
        assert ids[first : first + n] == ids[1 : 1 + n]


def test_heldout_text_is_disjoint_from_training_text():
    train, heldout = kjv_split()
    assert heldout and heldout not in train and len(heldout) < 0.1 * len(train)


def test_smoke_training_runs_resumes_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from contextlab.reference.train import TrainConfig, export, train

    cfg = TrainConfig.preset("smoke")
    model = train(cfg, tmp_path / "work")
    log = (tmp_path / "work" / "log.jsonl").read_text().splitlines()
    assert len(log) == cfg.steps and (tmp_path / "work" / "checkpoint" / "state.pt").exists()
    cfg.steps += 2  # resuming continues from the checkpoint instead of starting over
    train(cfg, tmp_path / "work")
    assert len((tmp_path / "work" / "log.jsonl").read_text().splitlines()) == cfg.steps
    export(model, tmp_path / "model")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.model_type == "llama"


def test_learning_rate_warms_up_holds_and_decays():
    from contextlab.reference.train import TrainConfig, lr_at

    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 1e-4 and lr_at(9, cfg) == 1e-3
    assert lr_at(50, cfg) == 1e-3  # constant until the last 20% of the steps
    assert lr_at(80, cfg) == 1e-3 and abs(lr_at(99, cfg) - 1e-3 * (1 - 0.9 * 19 / 20)) < 1e-12
