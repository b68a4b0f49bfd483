"""GGUF loading: a tiny Llama written as a GGUF by the test loads back with identical logits, is converted
once and then read from the cache, and every kind of bad input gives a ModelFileError or
UnsupportedModelError that names the problem instead of a traceback from deep inside transformers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import contextlab.loading.gguf as gguf_module
from contextlab.hf.support import UnsupportedModelError
from contextlab.loading import ModelFileError, load, resolve
from contextlab.loading.gguf import MANIFEST, GGUFSource, converted_folder
from tests.loading.conftest import write_gguf

IDS = torch.tensor([[292, 5, 100, 200, 17, 266, 280, 3, 9, 44, 272, 120]])  # [B=1, S=12]
CONVERTING = "contextlab: converting"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CONTEXTLAB_CACHE", str(root))
    return root


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # [1, S, V]


def expected_folder(cache: Path, gguf: Path) -> Path:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    return cache / "models" / f"{gguf.stem}-{digest[:16]}"


def test_round_trip_gives_the_same_logits(tiny_gguf, capsys):
    folder, original = tiny_gguf
    model, tokenizer = load(str(folder), gguf_file="tiny.gguf")
    assert CONVERTING in capsys.readouterr().out
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)
    # The tokenizer came out of the GGUF metadata: merges apply, specials stay whole, text round-trips.
    text = "the magic number<|endoftext|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + 2 + 1  # t h e, " magic", " number", <|endoftext|>
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"


def test_second_load_reuses_the_cache(tiny_gguf, cache, capsys, monkeypatch):
    folder, original = tiny_gguf
    converted = Path(resolve(str(folder), gguf_file="tiny.gguf"))
    assert converted == expected_folder(cache, folder / "tiny.gguf")
    manifest = converted / MANIFEST
    assert json.loads(manifest.read_text())["sha256"] == hashlib.sha256((folder / "tiny.gguf").read_bytes()).hexdigest()
    stamp = (converted.stat().st_mtime_ns, manifest.stat().st_mtime_ns)
    capsys.readouterr()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(gguf_module, "_convert", no_conversion)
    model, _ = load(str(folder), gguf_file="tiny.gguf")
    assert CONVERTING not in capsys.readouterr().out
    assert (converted.stat().st_mtime_ns, manifest.stat().st_mtime_ns) == stamp
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_a_path_ending_in_gguf_works_the_same(tiny_gguf):
    folder, original = tiny_gguf
    assert resolve(str(folder / "tiny.gguf")) == resolve(str(folder), gguf_file="tiny.gguf")
    model, _ = load(str(folder / "tiny.gguf"))
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep", [0, 1000, 0.5, -1], ids=["empty", "in-metadata", "half", "last-byte-missing"])
def test_truncated_file_is_a_model_file_error(tiny_gguf, tmp_path, keep):
    data = (tiny_gguf[0] / "tiny.gguf").read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(ModelFileError, match=r"cut\.gguf.*(truncated|corrupt)"):
        load(str(tmp_path), gguf_file="cut.gguf")


def test_unsupported_architecture_is_refused_before_conversion(tmp_path, cache):
    write_gguf(tmp_path / "ssm.gguf", None, arch="mamba")
    with pytest.raises(UnsupportedModelError, match=r"ssm\.gguf.*'mamba'"):
        load(str(tmp_path / "ssm.gguf"))
    assert not (cache / "models").exists()


def test_wrong_sha256_is_a_model_file_error(tiny_gguf, tmp_path):
    source = GGUFSource(path=tiny_gguf[0] / "tiny.gguf", expected_sha256="0" * 64)
    with pytest.raises(ModelFileError, match="sha256"):
        converted_folder(source, root=tmp_path)
    assert not (tmp_path / "models").exists()


def test_leftover_temp_folder_is_ignored(tiny_gguf, cache, capsys):
    folder, original = tiny_gguf
    target = expected_folder(cache, folder / "tiny.gguf")
    leftover = target.parent / f".{target.name}.killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{")
    model, _ = load(str(folder), gguf_file="tiny.gguf")
    assert CONVERTING in capsys.readouterr().out
    assert (target / MANIFEST).is_file()
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_folder_without_manifest_is_converted_again(tiny_gguf, cache, capsys):
    folder, original = tiny_gguf
    target = expected_folder(cache, folder / "tiny.gguf")
    resolve(str(folder), gguf_file="tiny.gguf")
    (target / MANIFEST).unlink()  # as if the process died before the last file
    (target / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    model, _ = load(str(folder), gguf_file="tiny.gguf")
    assert CONVERTING in capsys.readouterr().out
    assert (target / MANIFEST).is_file()
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_missing_gguf_package_names_the_extra(tiny_gguf, monkeypatch):
    monkeypatch.setattr(gguf_module, "_importable", lambda name: name != "gguf")
    with pytest.raises(ModelFileError) as err:
        load(str(tiny_gguf[0]), gguf_file="tiny.gguf")
    message = str(err.value)
    assert "contextlab[models]" in message and "gguf" in message
    assert "\n" not in message


def test_missing_gguf_file_is_a_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match=r"not found.*nope\.gguf"):
        load(str(tmp_path), gguf_file="nope.gguf")
    with pytest.raises(ModelFileError, match=r"not found.*nope\.gguf"):
        load(str(tmp_path / "nope.gguf"))


def test_missing_folder_is_a_model_file_error():
    with pytest.raises(ModelFileError, match=r"/no/such/dir"):
        load("/no/such/dir")


def test_corrupt_config_is_a_model_file_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelFileError, match=r"config\.json"):
        load(str(tmp_path))


def test_folder_of_gguf_files_suggests_gguf_file(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf[0] / "tiny.gguf", tmp_path / "model-q4.gguf")
    with pytest.raises(ModelFileError, match=r"no config\.json.*gguf_file=.*model-q4\.gguf"):
        load(str(tmp_path))


def test_conversion_finished_elsewhere_first_is_kept(tiny_gguf, cache):
    """Two processes converting the same file: the one that renames second keeps the first one's folder."""
    gguf = tiny_gguf[0] / "tiny.gguf"
    target = Path(resolve(str(gguf)))
    stamp = (target / MANIFEST).stat().st_mtime_ns
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    gguf_module._convert(gguf, target, digest, keep_chat_template=True, progress=False)
    assert (target / MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp folder left behind


def test_converted_config_is_plain_and_old_formats_are_converted_again(tiny_gguf, cache, capsys):
    folder, original = tiny_gguf
    target = Path(resolve(str(folder), gguf_file="tiny.gguf"))
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    manifest = json.loads((target / MANIFEST).read_text())
    (target / MANIFEST).write_text(json.dumps({**manifest, "format": manifest["format"] - 1}))
    capsys.readouterr()
    model, _ = load(str(folder), gguf_file="tiny.gguf")
    assert CONVERTING in capsys.readouterr().out
    assert json.loads((target / MANIFEST).read_text())["format"] == manifest["format"]
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_a_sha256_checked_by_the_locator_is_not_hashed_again(tiny_gguf, cache, monkeypatch):
    folder, _ = tiny_gguf
    path = folder / "tiny.gguf"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    first = converted_folder(GGUFSource(path=path, expected_sha256=digest))

    def no_hashing(*args, **kwargs):
        raise AssertionError("the file was hashed although its sha256 was already checked")

    monkeypatch.setattr(gguf_module, "sha256_file", no_hashing)
    assert converted_folder(GGUFSource(path=path, expected_sha256=digest, sha256_verified=True)) == first
    with pytest.raises(AssertionError, match="hashed"):  # unverified sources are still hashed
        converted_folder(GGUFSource(path=path, expected_sha256=digest))
