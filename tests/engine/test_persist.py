"""Saved caches: a cache written to disk and loaded back (in this process or another) answers follow-up
questions exactly as the one in memory; every mismatch or damaged file is refused with the reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import contextlab as cl
from tests.conftest import tiny_model
from tests.engine.test_generate import CONTEXTS

FOLLOW_UPS = ["Which letter came first?", "And the last one?"]
REPO = Path(__file__).resolve().parents[2]


def _answers(model, tokenizer, prefilled, mode: str = "turns") -> list[list[list[int]]]:
    session = cl.Session.from_prefilled(model, tokenizer, prefilled, mode=mode)
    rows = prefilled.input_ids.shape[0]
    return [session.ask([q] * rows, max_new_tokens=8).token_ids for q in FOLLOW_UPS]


@pytest.mark.parametrize(
    ("arch", "spec", "batch"),
    [
        ("llama", "full", 1),
        ("llama", "snapkv:0.5+kivi:bits=4,group=16,residual=16", 1),
        ("llama", "adakv:0.5+kivi:bits=2,group=16,residual=8", 2),
        ("llama", "decode(h2o,budget=48,every=4)+kivi:bits=3,group=16,residual=8", 1),
        ("llama", "decode(h2o,budget=48,every=4)+kivi:bits=3,group=16,residual=8,sink=2", 2),
        ("gemma3", "kivi:bits=4,group=16,residual=16", 2),
        ("llama", "snapkv:0.5+kivi:bits=2,group=16,residual=8,scales=e4m3", 2),
        ("qwen2", "pyramidkv:0.5", 2),
        ("phi3", "snapkv:0.5+kvquant:bits=3,group=16,residual=8", 2),
        ("llama", "kivi:bits=2,group=16,residual=8,sink=1,levels=normal,rotate=hadamard", 2),
        ("qwen3", "zipcache:group=16,residual=16", 2),
        ("llama", "snapkv:0.5+zipcache:keys=channel,group=16,residual=8", 2),
        ("llama", "decode(h2o,budget=48,every=4)+zipcache:group=16,residual=8", 1),
        ("llama", "snapkv:0.5+infllm:budget=48,block=8,sink=4,local=16", 2),
        ("llama", "quest:budget=32,page=8,dense_layers=0", 2),
        ("qwen2", "tokenselect:budget=32", 1),
        ("llama", "retrieval:budget=48,local=16,clusters=4,probe=2", 2),
        ("llama", "snapkv:0.5+retrieval:budget=48,local=16,clusters=4,probe=1,vote=head,follow=true", 2),
        ("llama", "snapkv:0.5+infllm:budget=48,block=8,sink=4,local=16,offload=cpu", 2),
        ("llama", "infiniretri:budget=16,chunk=24,window=4", 2),  # a re-encoded prompt
    ],
)
@pytest.mark.usefixtures("offload_on_cpu")
def test_a_loaded_cache_answers_as_the_one_in_memory(tmp_path, tokenizer, arch, spec, batch):
    model = tiny_model(arch)
    context = CONTEXTS[:batch] if batch > 1 else CONTEXTS[0]
    done = cl.prefill(model, tokenizer, context, method=spec)
    path = cl.save_cache(done, tmp_path / "ctx.clkv", model=model, tokenizer=tokenizer)
    loaded = cl.load_cache(path, model, tokenizer=tokenizer)
    assert loaded.cache.kv_bytes() == done.cache.kv_bytes()
    assert torch.equal(loaded.attention_mask, done.attention_mask)
    assert loaded.columns == done.columns and loaded.refed == done.refed
    assert (loaded.origins is None) == (done.origins is None)
    assert done.origins is None or torch.equal(loaded.origins, done.origins)
    # The file holds used slots only: about what the cache holds, plus ids, mask, logits and the header.
    extra = done.last_logits.nbytes + done.input_ids.nbytes * 2 + 64 * 1024
    assert path.stat().st_size < done.cache.kv_bytes() + extra
    assert _answers(model, tokenizer, loaded) == _answers(model, tokenizer, done)


def test_requests_mode_restarts_every_question_from_the_loaded_cache(tmp_path, llama, tokenizer):
    done = cl.prefill(llama, tokenizer, CONTEXTS[1], method="snapkv:0.5+kivi:bits=4,group=16,residual=16")
    loaded = cl.load_cache(cl.save_cache(done, tmp_path / "c.clkv"), llama)
    first, second = _answers(llama, tokenizer, loaded, mode="requests")
    alone = cl.Session.from_prefilled(llama, tokenizer, loaded, mode="requests").ask(FOLLOW_UPS[1], 8).token_ids
    assert second == alone and len(first) == 1


LOAD_SCRIPT = """
import json, sys
import contextlab as cl
from contextlab.reference.tokenizer import build_byte_tokenizer
from tests.conftest import tiny_model
model, tok = tiny_model("llama"), build_byte_tokenizer()
session = cl.Session.from_prefilled(model, tok, cl.load_cache(sys.argv[1], model, tokenizer=tok))
print(json.dumps([session.ask(q, max_new_tokens=8).token_ids for q in json.loads(sys.argv[2])]))
"""


def test_a_cache_saved_here_answers_the_same_in_another_process(tmp_path, llama, tokenizer):
    done = cl.prefill(llama, tokenizer, CONTEXTS[2], method="snapkv:0.5+kivi:bits=2,group=16,residual=8")
    path = cl.save_cache(done, tmp_path / "shared.clkv", model=llama, tokenizer=tokenizer)
    expected = _answers(llama, tokenizer, cl.load_cache(path, llama))
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path), json.dumps(FOLLOW_UPS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama, tokenizer) -> Path:
    done = cl.prefill(llama, tokenizer, CONTEXTS[0], method="kivi:bits=4,group=16,residual=16")
    return cl.save_cache(done, tmp_path_factory.mktemp("saved") / "c.clkv", model=llama, tokenizer=tokenizer)


def _damaged(saved: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(saved.read_bytes())
    out = tmp_path / "damaged.clkv"
    out.write_bytes(bytes(edit(data)))
    return out


def _flip(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0x01
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d[: len(d) - 100], "truncated"),
        (_flip, "failed its checksum"),
        (lambda d: b"NOT-A-CACHE" + d[11:], "wrong magic"),
        (lambda d: d[:10], "not a contextlab cache file"),
        (lambda d: d[:16] + (7).to_bytes(4, "little") + d[20:], "version 7"),
    ],
)
def test_damaged_files_are_refused(saved, tmp_path, llama, edit, message):
    with pytest.raises(ValueError, match=message):
        cl.load_cache(_damaged(saved, tmp_path, edit), llama)


def test_another_model_tokenizer_or_dtype_is_refused(saved, tokenizer):
    with pytest.raises(ValueError, match=r"another model configuration .*model_type: saved 'llama', model 'qwen2'"):
        cl.load_cache(saved, tiny_model("qwen2"))
    with pytest.raises(ValueError, match="other weights"):
        cl.load_cache(saved, tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match=r"holds torch\.float32 keys and values but the model runs in torch\.bfloat16"):
        cl.load_cache(saved, tiny_model("llama", dtype=torch.bfloat16))
    changed = copy.deepcopy(tokenizer)  # one more special token: another tokenizer
    changed.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(ValueError, match="another tokenizer"):
        cl.load_cache(saved, tiny_model("llama"), tokenizer=changed)


def test_only_prefilled_caches_and_sessions_can_be_saved(tmp_path, llama, tokenizer):
    out = cl.generate(llama, tokenizer, CONTEXTS[0], "Which?", max_new_tokens=2)
    with pytest.raises(TypeError, match=r"needs what contextlab\.prefill returns or a Session"):
        cl.save_cache(out, tmp_path / "x.clkv")
    session = cl.Session(llama, tokenizer, CONTEXTS[0], method="snapkv:0.5")
    session.ask("Which letter?", max_new_tokens=4)
    path = cl.save_cache(session, tmp_path / "session.clkv")
    resumed = cl.Session.from_prefilled(llama, tokenizer, cl.load_cache(path, llama, tokenizer=tokenizer))
    assert resumed.ask("And then?", 6).token_ids == session.ask("And then?", 6).token_ids
