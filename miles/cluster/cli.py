"""`miles train [flags | --config file.yaml]`: parse and validate the flags, then run the RL loop on Ray."""

from __future__ import annotations

import logging
import sys

from miles.config import ConfigError, parse_config

EXAMPLES = r"""examples:
  # CPU laptop: 1 trainer process + 1 engine process (a "GPU" count is one CPU process slot)
  miles train --hf-checkpoint MODEL --prompt-data train.jsonl --label-key label --rm-type math \
      --rollout-batch-size 8 --n-samples-per-prompt 4 --num-rollout 20
  # one 8-GPU node, trainer and engines sharing the GPUs
  miles train --config run.yaml --colocate --actor-num-gpus-per-node 8
  # disaggregated 4 + 4 GPUs, one-step-off async, resume from / save to ckpt/
  miles train --config run.yaml --actor-num-gpus-per-node 4 --rollout-num-gpus 4 --async \
      --save ckpt --load ckpt --save-interval 10
  # afterwards: PNG plots of the run
  miles plot runs/<time>
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv, epilog=EXAMPLES)
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
