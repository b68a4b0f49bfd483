"""contextlab: long-context methods for Hugging Face causal LMs, behind one interface.

import contextlab as cl
model, tok = cl.load("reference")
out = cl.generate(model, tok, context, question, method=cl.method("snapkv", ratio=0.5))
out.text, out.kv_bytes, out.prefill_seconds
out = cl.strategy("rag:k=8,chunk=256").generate(model, tok, context, question)  # input-level strategy
"""

from __future__ import annotations

from contextlab.engine.generate import Prefilled, generate, prefill
from contextlab.engine.persist import load_cache, save_cache
from contextlab.engine.result import GenerationResult
from contextlab.engine.session import Session
from contextlab.hf.attention import contextlab_attention_enabled as attention_enabled
from contextlab.hf.support import UnsupportedModelError
from contextlab.loading import load
from contextlab.methods.base import Budget, Method, PrefillMethod
from contextlab.methods.spec import METHODS, MethodInfo, list_methods
from contextlab.methods.spec import build_method as method
from contextlab.strategies import STRATEGIES, Strategy, list_strategies
from contextlab.strategies import build_strategy as strategy

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "STRATEGIES",
    "Budget",
    "GenerationResult",
    "Method",
    "MethodInfo",
    "PrefillMethod",
    "Prefilled",
    "Session",
    "Strategy",
    "UnsupportedModelError",
    "attention_enabled",
    "generate",
    "list_methods",
    "list_strategies",
    "load",
    "load_cache",
    "method",
    "prefill",
    "save_cache",
    "strategy",
]
