"""`miles train [flags | --config file.yaml]`: parse and validate the flags, then run the RL loop on Ray."""

from __future__ import annotations

import logging
import sys

from miles.config import ConfigError, parse_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"miles train: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /generate otherwise
    from miles.cluster.loop import run_training

    history = run_training(cfg.args)
    print(f"miles train: {len(history)} steps done; metrics in {cfg.args.run_dir}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
