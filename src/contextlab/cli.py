"""Command line: ``contextlab methods | generate | bench | report | eval-reference``.

Bad input exits with code 2 and a one-line message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn

    return wrap


@command("methods")
def cmd_methods(args: argparse.Namespace) -> int:
    from contextlab.methods.spec import list_methods

    table = Table(title="contextlab methods", show_lines=True)
    for col in ("method", "what it does", "parameters", "paper"):
        table.add_column(col, overflow="fold")
    for info in list_methods():
        params = "\n".join(f"{k} = {d}  {h}".rstrip() for k, (d, h) in info.params.items()) or "-"
        table.add_row(info.name, info.summary, params, info.paper)
    Console(width=args.width).print(table)
    return 0


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    import contextlab as cl

    context_file = Path(args.context_file)
    if not context_file.is_file():
        raise UsageError(f"context file not found: {context_file}")
    context = context_file.read_text(encoding="utf-8", errors="replace")
    model, tokenizer = cl.load(args.model, device=args.device)
    out = cl.generate(
        model,
        tokenizer,
        context,
        args.question,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        question_aware=not args.context_only_compression,
        allow_beyond_window=args.allow_beyond_window,
    )
    report = {
        "text": out.text,
        "method": out.method,
        "prompt_tokens": out.prompt_tokens[0],
        "kv_bytes": out.kv_bytes,
        "kv_bytes_full": out.kv_bytes_full,
        "peak_memory_bytes": out.peak_memory_bytes,
        "prefill_seconds": round(out.prefill_seconds, 4),
        "decode_seconds": round(out.decode_seconds, 4),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(out.text)
        print(
            f"[{out.method}] {out.prompt_tokens[0]} prompt tokens, KV {out.kv_bytes / 2**20:.2f} MiB of "
            f"{out.kv_bytes_full / 2**20:.2f} MiB ({100 * out.kv_ratio:.0f}%), prefill {out.prefill_seconds:.3f}s, "
            f"decode {out.decode_seconds:.3f}s",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contextlab", description="Long-context methods for Hugging Face LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list every method with its parameters and paper")
    p.add_argument("--width", type=int, default=None, help="table width (default: terminal width)")
    p = sub.add_parser("generate", help="answer a question about a long context with a method")
    p.add_argument(
        "--model",
        default="reference",
        help="named model (smollm2-135m-instruct, gemma3-270m, reference), a .gguf file, a folder or a hub id",
    )
    p.add_argument("--method", default="full", help="method spec, e.g. snapkv:0.5 or streaming:sink=4,window=1020")
    p.add_argument("--context-file", required=True, help="UTF-8 text file holding the context")
    p.add_argument("--question", default=None, help="question asked after the context")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--context-only-compression",
        action="store_true",
        help="compress the context alone, then feed the question (default: compress both)",
    )
    p.add_argument("--allow-beyond-window", action="store_true", help="allow prompts past the model's window")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    for name, add in EXTRA_PARSERS:
        add(sub.add_parser(name, help=EXTRA_HELP[name]))
    return parser


EXTRA_PARSERS: list[tuple[str, Callable[[argparse.ArgumentParser], None]]] = []
EXTRA_HELP: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"contextlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"contextlab {args.command}: interrupted", file=sys.stderr)
        return 130


def _load_extra_commands() -> None:
    """Subcommands that live with their own concern (bench, reference) register themselves here."""
    if EXTRA_PARSERS:
        return
    from contextlab.bench import cli as bench_cli
    from contextlab.reference import cli as reference_cli

    bench_cli.register(EXTRA_PARSERS, EXTRA_HELP, command)
    reference_cli.register(EXTRA_PARSERS, EXTRA_HELP, command)


if __name__ == "__main__":
    sys.exit(main())
