"""`miles serve --model DIR [--host 127.0.0.1] [--port 30000] [--api-key KEY] [engine options]`.

Engine options are generated from `miles.engine.EngineConfig`'s fields (`max_num_seqs` -> `--max-num-seqs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from typing import Any

logger = logging.getLogger("miles.serve")


def _field_type(f: dataclasses.Field, hints: dict) -> tuple[type | None, bool]:
    """(scalar type, optional) of a dataclass field, or (None, _) for types the CLI does not expose."""
    tp = hints.get(f.name, f.type)
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        optional = len(non_none) < len(args)
        tp = non_none[0] if len(non_none) == 1 else None
    return (tp if tp in (int, float, str, bool) else None), optional


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> list[str]:
    """Add one `--kebab-name` option per scalar `EngineConfig` field; returns the field names added."""
    from miles.engine import EngineConfig

    group = parser.add_argument_group("engine (EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    names = []
    for f in dataclasses.fields(EngineConfig):
        tp, _ = _field_type(f, hints)
        if f.name in skip or tp is None or f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            group.add_argument(flag, type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                               help=f"(default: {default})")
        else:
            group.add_argument(flag, type=tp, default=None, help=f"(default: {default})")
        names.append(f.name)
    return names


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    p = argparse.ArgumentParser(prog="miles serve", description="SGLang-compatible /generate + OpenAI HTTP server.")
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=os.environ.get("MILES_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MILES_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models (default: directory name)")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="fail a request that makes no progress for this many seconds while generation runs")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    names = add_engine_args(p)
    return p, names


def make_engine_config(args: argparse.Namespace, names: list[str]) -> Any:
    from miles.engine import EngineConfig

    kw = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return EngineConfig(model=args.model, **kw)


def main(argv: list[str] | None = None) -> int:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(args.model):
        parser.error(f"--model: {args.model!r} is not a directory")
    try:
        cfg = make_engine_config(args, names)
    except (TypeError, ValueError) as e:
        parser.error(f"engine options: {e}")

    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach this port can use it", args.host)

    from miles.engine import LLMEngine
    from miles.serve.async_engine import AsyncEngine
    from miles.serve.server import build_app
    from miles.serve.state import ServerConfig, engine_context_len, engine_vocab_size

    logger.info("loading %s", args.model)
    engine = LLMEngine(cfg)
    aengine = AsyncEngine(engine, stall_timeout=args.stall_timeout)
    scfg = ServerConfig(
        model_path=os.path.abspath(args.model),
        served_model_name=args.served_model_name or os.path.basename(os.path.abspath(args.model)),
        context_len=engine_context_len(engine),
        vocab_size=engine_vocab_size(engine),
        api_key=args.api_key,
    )
    app = build_app(aengine, scfg)
    logger.info("miles serve: http://%s:%d (model %s, context %d)", args.host, args.port, scfg.served_model_name,
                scfg.context_len)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        aengine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
