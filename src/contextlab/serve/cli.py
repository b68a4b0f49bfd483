"""``contextlab serve``: the OpenAI-compatible server on a model and a default method."""

from __future__ import annotations

import argparse

from contextlab.serve.config import API_KEY_ENV, ServerConfig


def register(parsers: list, helps: dict, command) -> None:
    parsers.append(("serve", _serve_args))
    helps["serve"] = "serve a model with a method behind an OpenAI-compatible API"
    command("serve")(_serve)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference", help="named model, .gguf file, folder or hub id")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the --model value)")
    p.add_argument("--method", default="full", help="default method spec; a request may override it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; beyond: 429")
    p.add_argument("--max-batch", type=int, default=8, help="rows run together in one batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="per request (default: the model window)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20)
    p.add_argument("--reuse-mb", type=float, default=1024, help="MiB of compressed shared prefixes kept (0: off)")
    p.add_argument(
        "--reuse-min-tokens", type=int, default=1024, help="a chat's earlier messages are reused from this length"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off)")


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("contextlab serve needs FastAPI and uvicorn: pip install 'contextlab[serve]'") from None
    from contextlab.engine.resources import check_device
    from contextlab.methods.spec import build_method
    from contextlab.serve.app import create_app

    config = ServerConfig(
        model=args.model,
        model_name=args.model_name,
        method=build_method(args.method).describe(),
        host=args.host,
        port=args.port,
        api_key=args.api_key or ServerConfig.key_from_env(),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait=args.batch_wait_ms / 1000,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
        reuse_bytes=int(args.reuse_mb * 2**20),
        reuse_min_tokens=args.reuse_min_tokens,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
    )
    check_device(config.device)
    app = create_app(config)
    print(f"contextlab serve: {config.served_name} with {config.method} on http://{config.host}:{config.port}/v1")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0
