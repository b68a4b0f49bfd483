"""``contextlab bench`` (the main job) and ``contextlab report``."""

from __future__ import annotations

import argparse

from contextlab.specstring import parse_length, split_top


def register(parsers: list, helps: dict, command) -> None:
    parsers.append(("bench", _bench_args))
    helps["bench"] = "run a benchmark (default: the default suite on the bundled reference model) and report it"
    parsers.append(("report", _report_args))
    helps["report"] = "write the HTML report of a run"
    command("bench")(_bench)
    command("report")(_report)


def _csv(text: str) -> list[str]:
    """Comma-separated items; a comma inside ``name:k=v,k=v`` parameters or inside parentheses
    (``decode(h2o,budget=512)``) stays with its item."""
    items: list[str] = []
    for part in split_top(text, ","):
        part = part.strip()
        if not part:
            continue
        key = part.split("=", 1)[0]
        if items and ":" in items[-1] and "=" in part and ":" not in key and "(" not in key:
            items[-1] += "," + part  # a parameter of the previous spec (its value may be a spec: kv=snapkv:0.5)
        else:
            items.append(part)
    return items


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="named model (smollm2-135m-instruct, gemma3-270m, reference), a .gguf file, a model folder or a hub "
        "id (default: smollm2-135m-instruct)",
    )
    p.add_argument("--methods", default=None, help="comma-separated method specs, e.g. full,snapkv:0.5")
    p.add_argument("--tasks", default=None, help="comma-separated task specs, e.g. niah_single_2,vt:num_hops=2")
    p.add_argument("--lengths", default=None, help="comma-separated lengths, e.g. 1k,2k,4k")
    p.add_argument("--samples", type=int, default=None, help="samples per task and length (depths swept)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    p.add_argument(
        "--context-only-compression",
        action="store_true",
        help="compress the context alone, then feed the question (default: compress both)",
    )
    p.add_argument(
        "--shared-mode",
        choices=["turns", "requests"],
        default=None,
        help="shared-context tasks: later questions as turns of one conversation or separate requests",
    )
    p.add_argument("--allow-beyond-window", action="store_true", help="run lengths past the model's window")
    p.add_argument(
        "--endpoint",
        default=None,
        help="evaluate an OpenAI-compatible server instead of a local model, e.g. http://127.0.0.1:8000/v1 "
        "(API key from CONTEXTLAB_ENDPOINT_KEY)",
    )
    p.add_argument("--model-name", default=None, help="with --endpoint: the model name the server serves")
    p.add_argument(
        "--tokenizer", default=None, help="with --endpoint: local tokenizer building the prompts (default: the model)"
    )
    p.add_argument("--out", default="runs", help="folder that receives the run folder (default: runs)")
    p.add_argument(
        "--resume",
        default=None,
        help="continue an interrupted run (its folder) with its stored settings; flags given again must match",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="with --resume: add the methods, tasks or lengths given to the run (new cells; stored rows stay)",
    )
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1, help="Ray workers on a machine without GPUs")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.add_argument(
        "--quiet", action="store_true", help="no progress (default: a bar on a terminal, log lines otherwise)"
    )


def _given(args: argparse.Namespace) -> dict:
    """The run settings the flags set explicitly (field -> value); flags left out are absent."""
    if (args.model_name or args.tokenizer) and not args.endpoint and not args.resume:
        raise ValueError("--model-name and --tokenizer go with --endpoint URL")
    if args.model_name and args.model:
        raise ValueError("give the served model as --model-name (with --endpoint), not also --model")
    given = {
        "model": args.model_name or args.model or None,
        "endpoint": args.endpoint,
        "tokenizer": args.tokenizer,
        "methods": _csv(args.methods) if args.methods else None,
        "tasks": _csv(args.tasks) if args.tasks else None,
        "lengths": [parse_length(x) for x in args.lengths.split(",") if x.strip()] if args.lengths else None,
        **{name: getattr(args, name) for name in ("samples", "batch_size", "max_new_tokens", "seed", "device")},
        "shared_mode": args.shared_mode,
        "question_aware": False if args.context_only_compression else None,
        "allow_beyond_window": True if args.allow_beyond_window else None,
    }
    return {name: value for name, value in given.items() if value is not None}


def _spec_from(args: argparse.Namespace):
    """The run spec of the flags given; a flag left out keeps the spec's default."""
    from contextlab.bench.spec import RunSpec

    return RunSpec(**_given(args))


def _bench(args: argparse.Namespace) -> int:
    from contextlab.bench.report import write_report
    from contextlab.bench.run import run_benchmark

    if args.extend and not args.resume:
        raise ValueError("--extend grows a run given with --resume RUN; without --resume every run is new")
    summary = run_benchmark(
        None if args.resume else _spec_from(args),
        out_root=args.out,
        resume=args.resume,
        changes=_given(args) if args.resume else None,
        extend=args.extend,
        executor=args.executor,
        workers=args.workers,
        show_progress=not args.quiet,
    )
    print(
        f"run: {summary.run_dir} ({summary.rows_written} results in {summary.wall_seconds:.0f}s; "
        f"harness time {100 * summary.harness_share:.1f}% of it)"
    )
    if not args.no_report:
        print(f"report: {write_report(summary.run_dir)}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (e.g. runs/latest)")
    p.add_argument("--out", default=None, help="report folder (default: <run>/report)")


def _report(args: argparse.Namespace) -> int:
    from contextlab.bench.report import write_report

    print(f"report: {write_report(args.run, args.out)}")
    return 0
