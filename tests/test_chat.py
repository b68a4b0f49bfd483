"""Chat-template prompts on the reference tokenizer (one token per byte, so cheap) given a ChatML-like
template: the frame around the user's text, the question block, exact task lengths, needle spans, the
unchanged plain format without a template, and templates that cannot hold a context."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from contextlab.bench.tasks import TASKS
from contextlab.bench.tasks.base import encode, prefix_ids, question_ids
from contextlab.chat import ChatTemplateError, chat_frame
from contextlab.loading import reference_path
from contextlab.reference.tokenizer import BOS_ID

SYSTEM = "You are a helpful assistant."
CHATML = (
    "{% if messages[0].role != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HEAD = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"
NEEDLE = re.compile(r"^ One of the special magic numbers for (\S+) is: (\d+)\.$")


@pytest.fixture
def plain():
    """A fresh reference tokenizer (no chat template); fresh, so no memo is shared between tests."""
    return AutoTokenizer.from_pretrained(str(reference_path()))


@pytest.fixture
def chat(plain):
    plain.chat_template = CHATML
    return plain


def test_frame_is_the_template_text_around_the_user_message(chat):
    frame = chat_frame(chat)
    assert chat.decode(frame.head) == HEAD
    assert chat.decode(frame.tail) == TAIL
    rendered = chat.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == HEAD + "hi" + TAIL


def test_no_template_means_no_frame(plain):
    assert plain.chat_template is None
    assert chat_frame(plain) is None


def test_prefix_and_question_blocks_use_the_frame(chat):
    frame = chat_frame(chat)
    assert prefix_ids(chat) == frame.head
    expected = encode(chat, "\n\nQuestion: Who?") + frame.tail + encode(chat, "Answer:")
    assert question_ids(chat, "Who?") == expected
    assert chat.decode(question_ids(chat, "Who?", answer_prefix="A:")) == "\n\nQuestion: Who?" + TAIL + "A:"


def test_plain_format_is_unchanged_without_a_template(plain):
    assert prefix_ids(plain) == [BOS_ID]
    assert plain.decode(question_ids(plain, "Who?")) == "\n\nQuestion: Who?\nAnswer:"


def test_setting_or_clearing_the_template_later_is_seen(plain):
    assert prefix_ids(plain) == [BOS_ID]
    plain.chat_template = CHATML
    assert plain.decode(prefix_ids(plain)) == HEAD
    plain.chat_template = None
    assert prefix_ids(plain) == [BOS_ID]


@pytest.mark.parametrize("length", [600, 777, 1500])
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "vt"])
def test_task_samples_have_exact_length_inside_the_frame(chat, task, length):
    frame = chat_frame(chat)
    answer_block = frame.tail + encode(chat, "Answer:")
    for sample in TASKS.get(task)(chat, length, seed=3, num_samples=3):
        assert len(sample.context_ids) + len(sample.question_ids) == length
        assert sample.context_ids[: len(frame.head)] == frame.head
        assert sample.question_ids[-len(answer_block) :] == answer_block
        assert chat.decode(sample.question_ids).startswith("\n\nQuestion: ")
        assert all(len(frame.head) <= start < end <= len(sample.context_ids) for start, end in sample.needle_spans)
        first = chat.decode(sample.context_ids[slice(*sample.needle_spans[0])])
        assert sample.answers[0] in first


def test_niah_needle_span_is_the_needle_sentence(chat):
    for sample in TASKS.get("niah_single_2")(chat, 600, seed=1, num_samples=3, depths=[0.0, 0.5, 1.0]):
        needle = chat.decode(sample.context_ids[slice(*sample.needle_spans[0])])
        key, value = NEEDLE.match(needle).groups()
        assert sample.answers == [value]
        assert f" for {key} mentioned" in chat.decode(sample.question_ids)


def test_vt_spans_are_the_chain_assignments(chat):
    (sample,) = TASKS.get("vt")(chat, 800, seed=2, num_samples=1)
    assignments = [chat.decode(sample.context_ids[slice(*span)]) for span in sample.needle_spans]
    assert [a.split()[1] for a in assignments] == sample.answers
    assert all(a.startswith(" VAR ") for a in assignments)


def test_plain_task_sample_keeps_the_old_format(plain):
    (sample,) = TASKS.get("niah_single_2")(plain, 500, seed=0, num_samples=1)
    assert sample.context_ids[0] == BOS_ID
    key, _ = NEEDLE.match(plain.decode(sample.context_ids[slice(*sample.needle_spans[0])])).groups()
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    assert sample.question_ids == encode(plain, f"\n\nQuestion: {question}\nAnswer:")
    assert "<|im_start|>" not in plain.decode(sample.context_ids + sample.question_ids)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n<|im_end|>\n{% endfor %}", "exactly once"),
        ("{% for m in messages %}{{ m.content }}\n{{ m.content }}{% endfor %}", "exactly once"),
        ("{{ raise_exception('system turns only') }}", "failed on a single user turn"),
    ],
    ids=["drops-user-text", "repeats-user-text", "raises"],
)
def test_template_that_cannot_hold_a_context_is_refused(plain, template, message):
    plain.chat_template = template
    with pytest.raises(ChatTemplateError, match=message):
        chat_frame(plain)
    with pytest.raises(ChatTemplateError, match=message):  # task generation refuses too, not a wrong prompt
        TASKS.get("niah_single_2")(plain, 500, seed=0, num_samples=1)
