"""`miles train` configuration: dataclass -> argparse, YAML, validation errors naming the flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from miles.config import ConfigError, build_parser, field_specs, flag, parse_config, validate

BASE = ["--hf-checkpoint", "/m", "--prompt-data", "/p.jsonl", "--num-rollout", "2", "--rollout-batch-size", "4"]


@dataclass
class _Toy:
    steps: int = flag(3, "number of steps")
    rate: float | None = flag(None, "a rate")
    mode: Literal["a", "b"] = flag("a", "a mode")
    names: list[str] | None = flag(None, "names")
    ids: list[int] | None = flag(None, "ids")
    verbose: bool = flag(False, "talk")
    normalize: bool = flag(True, "normalize")
    inverted: bool = flag(True, "slime-style", flag="--disable-the-thing", action="store_false")
    maybe: bool | None = flag(None, "tri-state")
    extra: dict = flag(default_factory=dict, help="json")
    is_async: bool = flag(False, "async", flags=("--async",))


def _toy(argv, yaml_path=None):
    groups = [("toy", _Toy, "toy group")]
    if yaml_path:
        argv = ["--config", str(yaml_path), *argv]
    return parse_config(argv, groups=groups, check=False)


def test_dataclass_fields_become_flags():
    cfg = _toy(
        ["--steps", "7", "--rate", "0.5", "--mode", "b", "--names", "x", "y", "--ids", "1", "2", "--verbose",
         "--disable-normalize", "--disable-the-thing", "--no-maybe", "--extra", '{"k": 1}', "--async"]
    )
    t = cfg.toy
    assert (t.steps, t.rate, t.mode, t.names, t.ids) == (7, 0.5, "b", ["x", "y"], [1, 2])
    assert (t.verbose, t.normalize, t.inverted, t.maybe, t.extra, t.is_async) == (True, False, False, False,
                                                                                   {"k": 1}, True)
    assert cfg.args.steps == 7 and cfg.args.is_async is True  # the flat namespace carries the same values
    d = _toy([]).toy
    assert (d.steps, d.rate, d.verbose, d.normalize, d.inverted, d.maybe, d.extra) == (3, None, False, True, True,
                                                                                      None, {})
    with pytest.raises(SystemExit):
        _toy(["--mode", "c"])  # Literal -> choices
    kinds = {s.name: s.kind for s in field_specs("toy", _Toy)}
    assert kinds["verbose"] == "bool" and kinds["maybe"] == "optbool" and kinds["ids"] == "list"


def test_yaml_supplies_keys_and_cli_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 9\nrate: 2\nnames: [p, q]\ntoy:\n  mode: b\ndisable-normalize: true\nextra: {a: [1]}\n"
                 "async: true\n")
    cfg = _toy([], y)
    assert (cfg.toy.steps, cfg.toy.rate, cfg.toy.names, cfg.toy.mode, cfg.toy.normalize, cfg.toy.extra) == (
        9, 2.0, ["p", "q"], "b", False, {"a": [1]})
    assert cfg.toy.is_async is True  # a key may also be the flag's name
    assert _toy(["--steps", "1"], y).toy.steps == 1


@pytest.mark.parametrize(
    "text, needle",
    [
        ("steps: 1\nstepz: 2\n", "c.yaml:2: unknown key 'stepz' (did you mean 'steps'?)"),
        ("steps: many\n", "c.yaml:1: bad value for --steps"),
        ("steps: 1.5\n", "c.yaml:1: bad value for --steps"),
        ("verbose: 3\n", "c.yaml:1: bad value for --verbose"),
        ("mode: z\n", "--mode must be one of ['a', 'b']"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("steps: [1\n", "invalid YAML"),
    ],
)
def test_yaml_errors_name_file_line_and_flag(tmp_path, text, needle):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError) as e:
        _toy([], y)
    assert needle in str(e.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        _toy([], tmp_path / "nope.yaml")


def test_train_help_lists_groups_and_slime_flags():
    text = build_parser().parser.format_help()
    for group in ("cluster:", "rollout:", "data:", "algorithm:", "trainer:", "eval:", "logging:", "checkpoint:",
                  "debug:"):
        assert group in text, group
    for name in ("--actor-num-gpus-per-node", "--rollout-num-gpus-per-engine", "--colocate", "--async",
                 "--update-weights-interval", "--save-debug-rollout-data", "--load-debug-rollout-data",
                 "--debug-rollout-only", "--debug-train-only", "--save-interval", "--save-hf", "--use-tensorboard",
                 "--rollout-batch-size", "--n-samples-per-prompt", "--disable-grpo-std-normalization"):
        assert name in text, name


def test_full_parse_fills_slime_names_and_derived_values():
    cfg = parse_config(BASE + ["--n-samples-per-prompt", "2", "--num-steps-per-rollout", "2", "--colocate",
                               "--actor-num-gpus-per-node", "2", "--rollout-temperature", "0.7"])
    a = cfg.args
    assert a.global_batch_size == 4 and a.over_sampling_batch_size == 4
    assert a.rollout_num_gpus == 2 and a.offload_train is True and a.offload_rollout is True
    assert a.update_weight_transport == "ipc"
    assert a.rollout_temperature == 0.7
    assert cfg.cluster.colocate is True and cfg.checkpoint.hf_checkpoint == "/m"
    assert not hasattr(cfg.args, "async") and cfg.args.async_train is False
    d = parse_config(BASE).args
    assert (d.rollout_num_gpus, d.update_weight_transport, d.global_batch_size, d.num_steps_per_rollout) == (
        1, "collective", 4, 1)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--n-samples-per-prompt", "3", "--global-batch-size", "5"],
         "--rollout-batch-size (4) x --n-samples-per-prompt (3) = 12 samples per rollout must be a multiple of "
         "--global-batch-size (5)"),
        (["--global-batch-size", "2", "--num-steps-per-rollout", "3"],
         "must equal --global-batch-size (2) x --num-steps-per-rollout (3) = 6"),
        (["--over-sampling-batch-size", "2"], "--over-sampling-batch-size (2) must be >= --rollout-batch-size (4)"),
        (["--async", "--colocate"], "--async needs disaggregated placement"),
        (["--save-interval", "1"], "--save-interval needs --save DIR"),
        (["--eval-interval", "1"], "--eval-interval needs --eval-prompt-data"),
        (["--debug-train-only"], "--debug-train-only needs --load-debug-rollout-data"),
        (["--debug-train-only", "--debug-rollout-only"], "are exclusive"),
        (["--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"],
         "--rollout-num-gpus (3) must be a multiple of --rollout-num-gpus-per-engine (2)"),
        (["--colocate", "--rollout-num-gpus", "2"], "cannot exceed the trainer's devices"),
        (["--rollout-num-gpus", "2", "--rollout-num-gpus-per-engine", "2"], "tensor-parallel engines"),
        (["--kl-coef", "0.1", "--kl-loss-coef", "0.1"], "--kl-coef and --kl-loss-coef"),
        (["--rollout-external-engine-addrs", "h:1", "--update-weight-transport", "collective"],
         "--rollout-external-engine-addrs only supports --update-weight-transport disk"),
    ],
)
def test_validation_names_the_inconsistent_flags(extra, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + extra)
    assert needle in str(e.value)


def test_validation_requires_core_flags():
    with pytest.raises(ConfigError) as e:
        parse_config(["--rollout-batch-size", "2"])
    msg = str(e.value)
    assert "--num-rollout or --num-epoch" in msg and "--hf-checkpoint" in msg and "--prompt-data" in msg


def test_package_group_checks_run():
    with pytest.raises(ConfigError, match="--lr-decay-style cosine requires --lr-decay-iters"):
        parse_config(BASE + ["--lr-decay-style", "cosine"])


def test_load_debug_rollout_data_implies_train_only():
    args = argparse.Namespace(**vars(parse_config(BASE, check=False).args))
    args.load_debug_rollout_data = "/tmp/x_{rollout_id}.pt"
    args.prompt_data = None
    validate(args)
    assert args.debug_train_only is True


def test_sglang_server_flags_are_ignored_other_unknown_flags_fail(capsys):
    cfg = parse_config(BASE + ["--sglang-mem-fraction-static", "0.7", "--sglang-enable-metrics", "--colocate"])
    assert cfg.args.colocate is True
    assert cfg.args.ignored_sglang_args == ["--sglang-mem-fraction-static", "0.7", "--sglang-enable-metrics"]
    with pytest.raises(SystemExit):
        parse_config(BASE + ["--tensor-model-parallel-size", "2"])
    assert "unrecognized arguments: --tensor-model-parallel-size 2" in capsys.readouterr().err


@dataclass
class _A:
    rollout_temperature: float = flag(1.0, "sampling temperature")


@dataclass
class _B:
    temperature: float = flag(1.0, "same flag, other name", flag="--rollout-temperature")


def test_field_sharing_another_fields_flag_mirrors_it():
    cfg = parse_config(["--rollout-temperature", "0.5"], groups=[("a", _A, ""), ("b", _B, "")], check=False)
    assert cfg.a.rollout_temperature == 0.5 and cfg.b.temperature == 0.5
