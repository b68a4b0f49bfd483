"""Byte-level tokenizer of the reference model, built in code (no vocabulary download).

Token id ``i < 256`` is the byte ``i``; a few special tokens follow. It is a plain ``tokenizers`` BPE model
with an empty merge list over the GPT-2 style byte-to-character alphabet, wrapped in
``PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained`` loads it from a folder offline.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 256, 257, 258, 259
VOCAB_SIZE = 264  # 260 used, rounded up to a multiple of 8 for matmul-friendly shapes


def byte_alphabet() -> list[str]:
    """The printable character that stands for each byte value, in byte order.

    Printable Latin-1 bytes stand for themselves; the others are moved to code points above 255 so every
    byte has a visible, whitespace-free character (the scheme of GPT-2's byte-level BPE).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars: list[str] = []
    shifted = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer whose ids are raw bytes plus ``SPECIAL_TOKENS``."""
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    # Like Llama, a sequence encoded with special tokens starts with <bos>.
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=1 << 20,
        split_special_tokens=True,  # text that spells "<bos>" is five bytes, never the special token
    )


def save_byte_tokenizer(folder: str | Path) -> None:
    build_byte_tokenizer().save_pretrained(str(folder))
