"""Command line: ``contextlab methods | generate | bench | report | eval-reference``.

Bad input exits with code 2 and a one-line message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from contextlab.errors import ContextlabError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class UsageError(ContextlabError):
    """Bad command-line input (exit code 2)."""


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn

    return wrap


@command("methods")
def cmd_methods(args: argparse.Namespace) -> int:
    from contextlab.methods.spec import list_methods
    from contextlab.strategies import list_strategies

    console = Console(width=args.width)
    for title, infos in (("contextlab methods", list_methods()), ("input-level strategies", list_strategies())):
        if console.width >= WIDE_TABLE:
            console.print(_methods_table(infos, title))
        else:  # a four-column table at 80 columns folds words and URLs mid-way: one block per method instead
            console.print(f"{title}:\n", markup=False, highlight=False)
            console.print(_methods_blocks(infos, console.width), soft_wrap=True, markup=False, highlight=False)
    return 0


WIDE_TABLE = 140  # columns from which the methods table has room for every URL on one line


def _plain(text: str) -> str:
    """Docstring markup (``code``) as terminal text."""
    return text.replace("``", "'")


def _papers(paper: str) -> list[str]:
    """One line per cited paper (``a, URL; b, URL``)."""
    return [p.strip() for p in paper.split("; ") if p.strip()] or ["-"]


def _methods_table(infos, title: str) -> Table:
    table = Table(title=title, show_lines=True)
    table.add_column("method", no_wrap=True)
    table.add_column("what it does", ratio=3)
    table.add_column("parameters", ratio=3)
    table.add_column("paper", ratio=2, min_width=34)  # an arXiv URL (32 characters) never breaks
    for info in infos:
        params = "\n".join(f"{k} = {d}  {_plain(h)}".rstrip() for k, (d, h) in info.params.items()) or "-"
        table.add_row(info.name, _plain(info.summary), params, "\n".join(_papers(info.paper)))
    return table


def _methods_blocks(infos, width: int) -> str:
    """Each method as a heading and indented lines wrapped at spaces only (URLs stay whole)."""
    import textwrap

    def wrap(text: str, first: str, rest: str) -> list[str]:
        return textwrap.wrap(
            text,
            width,
            initial_indent=first,
            subsequent_indent=rest,
            break_long_words=False,
            break_on_hyphens=False,
        )

    lines: list[str] = []
    for info in infos:
        lines += [info.name, *wrap(_plain(info.summary), "  ", "  ")]
        for k, (default, meaning) in info.params.items():
            lines += wrap(f"{k} = {default}  {_plain(meaning)}".rstrip(), "    ", "        ")
        for paper in _papers(info.paper):
            lines += wrap(paper, "  paper: ", "         ")
        lines.append("")
    return "\n".join(lines)


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    import contextlab as cl
    from contextlab.engine.resources import check_device
    from contextlab.strategies import Strategy, build
    from contextlab.textfile import read_text_file

    # Everything that can be checked without the model is checked before it loads (seconds saved per typo).
    method = build(args.method)
    if isinstance(method, Strategy) and args.question is None:
        raise UsageError(f"{method.name} answers a question about the context: give --question")
    check_device(args.device)
    context_file = Path(args.context_file)
    if not context_file.is_file():
        raise UsageError(f"context file not found: {context_file}")
    read = read_text_file(context_file, args.decode_errors, replace_hint="--decode-errors replace")
    if read.replaced_bytes:
        print(
            f"contextlab generate: note: {read.replaced_bytes} undecodable byte(s) of {context_file} replaced by "
            f"U+FFFD (the first at byte offset {read.first_replaced})",
            file=sys.stderr,
        )
    if not read.text.strip():
        raise UsageError(f"context is empty: {context_file} holds no text")
    if args.question is not None and not args.question.strip():
        raise UsageError("--question is empty; leave it out to continue the context instead")
    model, tokenizer = cl.load(args.model, device=args.device)
    options = {"max_new_tokens": args.max_new_tokens, "question_aware": not args.context_only_compression}
    if isinstance(method, Strategy):
        out = method.generate(model, tokenizer, read.text, args.question, **options)
    else:
        out = cl.generate(
            model,
            tokenizer,
            read.text,
            args.question,
            method=method,
            allow_beyond_window=args.allow_beyond_window,
            **options,
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
        "calls": out.calls,
        "tokens_processed": out.tokens_processed,
        "route": (out.routes or [None])[0],
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(out.text)
        print(
            f"[{out.method}] {out.prompt_tokens[0]} prompt tokens, KV {out.kv_bytes / 2**20:.2f} MiB of "
            f"{out.kv_bytes_full / 2**20:.2f} MiB ({100 * out.kv_ratio:.0f}%), prefill {out.prefill_seconds:.3f}s, "
            f"decode {out.decode_seconds:.3f}s; {out.calls} model call(s), {out.tokens_processed} tokens processed"
            + (f", route {out.routes[0]}" if out.routes and out.routes[0] else ""),
            file=sys.stderr,
        )
    return 0


@command("profile")
def cmd_profile(args: argparse.Namespace) -> int:
    from collections import Counter

    import contextlab as cl
    from contextlab.methods.profiles import model_digest, profile_path

    method = cl.method(args.method)
    if not hasattr(method, "settings"):
        raise UsageError(f"{method.describe()} measures nothing on the model; profiled methods: minference, duo")
    if args.force and method.profile:
        raise UsageError("--force measures into the profile folder; drop profile= (that file is only read)")
    model, tokenizer = cl.load(args.model, device=args.device)
    path = profile_path(method.name, model_digest(model), method.settings())
    if args.force and path.exists():
        path.unlink()
    bound = method.bind(model, tokenizer)
    if getattr(bound, "shapes", None) is not None:  # minference: a shape per query head
        counts = Counter(shape for layer in bound.shapes for shape in layer)
    else:  # duo: streaming or retrieval per KV head
        counts = Counter("streaming" if s else "retrieval" for layer in bound.streaming for s in layer)
    where = method.profile or path
    print(f"{where}: " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + " heads")
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
    p.add_argument(
        "--method",
        default="full",
        help="method or input-level strategy spec, e.g. snapkv:0.5, streaming:sink=4,window=1020, rag:k=8+snapkv:0.5",
    )
    p.add_argument("--context-file", required=True, help="UTF-8 text file holding the context")
    p.add_argument(
        "--decode-errors",
        choices=["strict", "replace"],
        default="strict",
        help="bytes that are not UTF-8: refuse the file (strict, default) or replace them and say how many",
    )
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
    p = sub.add_parser("profile", help="measure a method's per-head profile on a model (minference, duo), save it")
    p.add_argument("--model", default="reference", help="named model, a .gguf file, a folder or a hub id")
    p.add_argument("--method", required=True, help="method spec whose profile to measure, e.g. minference")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    p.add_argument("--force", action="store_true", help="measure again even when a saved profile exists")
    for name, add in EXTRA_PARSERS:
        add(sub.add_parser(name, help=EXTRA_HELP[name]))
    return parser


EXTRA_PARSERS: list[tuple[str, Callable[[argparse.ArgumentParser], None]]] = []
EXTRA_HELP: dict[str, str] = {}


# API wording in error messages -> the flags a command-line user types.
CLI_WORDS = (
    ("pass allow_beyond_window=True", "pass --allow-beyond-window"),
    ("use question_aware=False", "use --context-only-compression"),
    ("with question_aware=True", "by default"),
    ("pass question=None to continue the context instead", "leave out --question to continue the context instead"),
    ("pass one with gguf_file=", "pass one of them as --model FOLDER/FILE.gguf"),
)


def cli_message(message: str) -> str:
    for api, flag in CLI_WORDS:
        message = message.replace(api, flag)
    return message


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    try:
        with _terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"contextlab {args.command}: error: {cli_message(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"contextlab {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """The command line prints its own progress: transformers' weight-loading bars, its info logs and its
    deprecation FutureWarnings (about arguments contextlab passes, not the user) are silenced here only;
    the Python API keeps them. Setting TRANSFORMERS_VERBOSITY or HF_HUB_DISABLE_PROGRESS_BARS overrides."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    if "transformers" in sys.modules:  # imported before main() (an in-process caller): switch it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a job scheduler, a container stop) ends a command the way Ctrl-C does: finished
    work is kept and the resume command printed (exit 130 instead of a silent death)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_extra_commands() -> None:
    """Subcommands that live with their own concern (bench, reference) register themselves here."""
    if EXTRA_PARSERS:
        return
    from contextlab.bench import cli as bench_cli
    from contextlab.reference import cli as reference_cli
    from contextlab.serve import cli as serve_cli

    bench_cli.register(EXTRA_PARSERS, EXTRA_HELP, command)
    reference_cli.register(EXTRA_PARSERS, EXTRA_HELP, command)
    serve_cli.register(EXTRA_PARSERS, EXTRA_HELP, command)


if __name__ == "__main__":
    sys.exit(main())
