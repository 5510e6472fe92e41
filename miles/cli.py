"""The `miles` console script: `miles <command> [args]`, each command owned by its own module."""

from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv: list[str]) -> int | None`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("miles.engine.cli", "offline generation from a jsonl of prompts"),
    "serve": ("miles.serve.cli", "HTTP server: SGLang /generate + OpenAI API"),
    "router": ("miles.serve.router", "load-balancing router in front of `miles serve` workers"),
    "train": ("miles.cluster.cli", "the RL loop (rollout -> reward -> train -> weight sync) on Ray"),
    "plot": ("miles.plot", "PNG plots of a run directory's metrics.jsonl"),
    "demo": ("miles.demo", "the embedded default: GRPO on the bundled example, on CPU"),
}


def _usage() -> str:
    lines = ["usage: miles <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"miles: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
