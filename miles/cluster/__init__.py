"""`miles train`: the RL loop on Ray.

    config.py       flag groups owned here (cluster, loop, logging, checkpoint, debug)
    placement.py    Ray start-up (joins RAY_ADDRESS, else local) and the placement group
    actors.py       TrainActor (one FSDP2 rank) and EngineActor (`miles serve` in-process)
    cluster.py      the driver's handle on trainers, engines and the router
    weight_sync.py  ONE weight-sync loop with ipc / collective / disk transports
    phase.py        bounded waits: timeouts dump stacks and name the phase
    loop.py         the sync and one-step-off async loops, eval, save/resume, debug rollout data
    checkpoint.py   loop state (data cursor + buffer, RNG, step) next to the trainer's DCP checkpoint
    tracking.py     metrics.jsonl / tensorboard / wandb and console progress
    cli.py          `miles train` entry point

CPU-only machines: the same flags place CPU processes. A "GPU" count means one CPU process slot, e.g.
`--actor-num-gpus-per-node 2 --rollout-num-gpus 1` runs two gloo trainer processes and one engine process
(three Ray bundles of one CPU); with `--colocate` the engines share the trainer's slots.
The rollout function runs in the driver process and talks HTTP to the engines (through `miles router`
when there is more than one engine).
"""
