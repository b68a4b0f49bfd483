"""Tiny GGUF files written by the tests themselves: a random Llama laid out as llama.cpp writes it, with a
byte-level BPE tokenizer in the metadata. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from contextlab.reference.tokenizer import byte_alphabet

HEADS, KV_HEADS = 4, 2
WORDS = ("the", "and", "magic", "number", "special", "question", "answer")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CONTROL, NORMAL = 3, 1  # llama.cpp token types


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)``: the 256 byte symbols, merges spelling a few space-led words
    (``Ġ`` is the byte symbol of a space), then the special tokens. About 300 tokens."""
    tokens = byte_alphabet()
    merges: list[str] = []
    space = tokens[ord(" ")]
    for word in WORDS:
        piece = space
        for char in word:
            merged = piece + char
            if merged not in tokens:
                merges.append(f"{piece} {char}")
                tokens.append(merged)
            piece = merged
    types = [NORMAL] * len(tokens) + [CONTROL] * len(SPECIALS)
    return [*tokens, *SPECIALS], types, merges


def tiny_llama(vocab_size: int, eos_id: int, seed: int = 0) -> LlamaForCausalLM:
    """Two layers, grouped-query attention, untied head; every weight random (norms too), so a tensor
    loaded into the wrong slot changes the logits."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param) * 0.1
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k: the two rotary halves of each head interleaved (its converter does
    this for Llama; transformers undoes it when it reads the file)."""
    rows = weight.shape[0]
    # [H, 2, D/2, in] -> [H, D/2, 2, in]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's tensor names, fp32."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    layer_names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for layer in range(model.config.num_hidden_layers):
        for gguf_name, hf_name in layer_names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, HEADS)
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, KV_HEADS)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = np.ascontiguousarray(weight)
    return tensors


def write_gguf(path: Path, model: LlamaForCausalLM | None, arch: str = "llama") -> Path:
    """Write ``model`` (or, with None, metadata only) as a GGUF file with the byte-level tokenizer; the
    calling test is skipped where the ``gguf`` package is missing."""
    gguf = pytest.importorskip("gguf")
    tokens, types, merges = byte_level_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("contextlab tiny llama")
    if model is not None:
        config = model.config
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    if model is not None:
        for name, tensor in gguf_tensors(model).items():
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """``(folder, model)``: ``folder/tiny.gguf`` holds ``model``; treat the folder as read-only."""
    folder = tmp_path_factory.mktemp("gguf")
    tokens, _, _ = byte_level_vocab()
    model = tiny_llama(len(tokens), eos_id=tokens.index("<|endoftext|>"))
    write_gguf(folder / "tiny.gguf", model)
    return folder, model
