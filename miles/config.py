"""Typed config groups composed into one argparse CLI (`miles train`), with `--config file.yaml`.

Each package owns dataclasses whose fields *are* its flags: field `rollout_batch_size` becomes
`--rollout-batch-size`, its help comes from `field(metadata={"help": ...})` (or `flag(...)`).
`build_parser` turns the groups into argparse groups; `parse_config` returns a `MilesConfig` holding

* `args`: one flat `argparse.Namespace` with slime's attribute names (what hooks receive), and
* one typed dataclass instance per group (`cfg.cluster`, `cfg.algorithm`, ...) for our own code.

Field conventions (all optional metadata keys):
    help        help text
    flags       explicit option strings, e.g. ("--async",) for field `async_train`
    choices     allowed values (also inferred from `Literal[...]`)
    nargs       argparse nargs for list fields (default "+")
    disable     for bools defaulting to True: the slime-style store_false flag (default `--disable-<name>`)
    required    checked after YAML + CLI are merged (argparse's own `required` would ignore YAML)

Bools defaulting to False are `store_true`; `bool | None` fields get `--x/--no-x`. A field that
appears in two groups is registered once (the first group wins) and both typed groups read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# The groups of `miles train --help`, in order: (group name, "module:Class", title). Groups whose module has
# not been written are skipped; the flags they would own are then missing from the CLI.
GROUPS: list[tuple[str, str, str]] = [
    ("cluster", "miles.cluster.config:ClusterConfig", "placement of trainer ranks and rollout engines (Ray)"),
    ("rollout", "miles.rollout.config:RolloutConfig", "rollout generation and hooks"),
    ("reward", "miles.rollout.config:RewardConfig", "reward functions"),
    ("data", "miles.rollout.config:DataConfig", "prompt data and batch sizes"),
    ("algorithm", "miles.trainer.config:AlgoConfig", "RL algorithm: advantages, losses, KL, TIS"),
    ("trainer", "miles.trainer.config:TrainerConfig", "FSDP2 trainer: optimizer, batching, precision"),
    ("eval", "miles.rollout.config:EvalConfig", "evaluation"),
    ("loop", "miles.cluster.config:LoopConfig", "the RL loop: number of steps, batch invariants, eval cadence"),
    ("logging", "miles.cluster.config:LoggingConfig", "metrics, progress, tensorboard, wandb"),
    ("checkpoint", "miles.cluster.config:CheckpointConfig", "checkpoints, resume and HF export"),
    ("debug", "miles.cluster.config:DebugConfig", "debugging: recorded rollouts, rollout-only / train-only"),
]


class ConfigError(ValueError):
    """An invalid configuration; the message names the flags (and file/line for YAML)."""


def flag(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING, **meta):
    """`dataclasses.field` with flag metadata: `x: int = flag(1, "help text", choices=(1, 2))`."""
    metadata = {"help": help, **meta}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---- type analysis -------------------------------------------------------------------------


@dataclass
class FieldSpec:
    """One CLI flag derived from a dataclass field."""

    name: str  # dest == attribute name on the namespace
    group: str
    kind: str  # "bool", "optbool", "scalar", "list", "json"
    elem_type: Callable[[str], Any]  # converter for one CLI/YAML token
    default: Any
    help: str
    flags: tuple[str, ...]
    choices: tuple | None = None
    nargs: str | int | None = None
    disable_flag: str | None = None
    required: bool = False


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) != len(typing.get_args(tp))
    return tp, False


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_specs(group: str, cls: type) -> list[FieldSpec]:
    """The flags of one config dataclass."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        meta = dict(f.metadata)
        tp, _optional = _unwrap_optional(hints[f.name])
        default = _default_of(f)
        choices = meta.get("choices")
        origin = typing.get_origin(tp)
        nargs = None
        if tp is bool:
            kind, conv = ("optbool" if default is None else "bool"), bool
        elif origin is Literal:
            kind, choices = "scalar", choices or typing.get_args(tp)
            conv = type(choices[0])
        elif origin in (list, tuple, Sequence) or tp in (list, tuple):
            elem = (typing.get_args(tp) or (str,))[0]
            elem, _ = _unwrap_optional(elem)
            kind, conv, nargs = "list", (elem if elem in (int, float, str) else _json_or_str), meta.get("nargs", "+")
        elif tp in (int, float, str):
            kind, conv = "scalar", tp
        else:  # dict and anything else: JSON on the command line, native in YAML
            kind, conv = "json", _json_or_str
        dashed = "--" + f.name.replace("_", "-")
        explicit = meta.get("flags") or ((meta["flag"],) if "flag" in meta else None)
        flags = tuple(explicit or (dashed,))
        disable = None
        if kind == "bool" and default is True:
            if explicit and meta.get("action") == "store_false":
                disable = explicit[0]
            else:
                disable = meta.get("disable", "--disable-" + f.name.replace("_", "-"))
        specs.append(
            FieldSpec(
                name=f.name,
                group=group,
                kind=kind,
                elem_type=meta.get("type", conv),
                default=default,
                help=meta.get("help", ""),
                flags=flags,
                choices=tuple(choices) if choices else None,
                nargs=nargs,
                disable_flag=disable,
                required=bool(meta.get("required", False)),
            )
        )
    return specs


def _add_argument(group: argparse._ArgumentGroup, spec: FieldSpec) -> None:
    help_ = spec.help or " "
    if spec.kind == "bool":
        if spec.disable_flag:
            group.add_argument(spec.disable_flag, dest=spec.name, action="store_false", help=f"{help_} (on by default)")
        else:
            group.add_argument(*spec.flags, dest=spec.name, action="store_true", help=help_)
        return
    if spec.kind == "optbool":
        group.add_argument(*spec.flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        return
    kw: dict[str, Any] = {"dest": spec.name, "type": spec.elem_type, "help": help_ + " (default: %(default)s)"}
    if spec.choices:
        kw["choices"] = spec.choices
    if spec.kind == "list":
        kw["nargs"] = spec.nargs
    if spec.required:
        kw["help"] = help_ + " (required)"
    group.add_argument(*spec.flags, **kw)


# ---- groups and parser ---------------------------------------------------------------------


def load_groups(groups: Sequence[tuple[str, str, str]] | None = None) -> list[tuple[str, type, str]]:
    """Import the config classes named in `groups` (default `GROUPS`), skipping unwritten modules."""
    out = []
    for name, target, title in groups or GROUPS:
        module, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        out.append((name, cls, title))
    return out


@dataclass
class ParserInfo:
    parser: argparse.ArgumentParser
    specs: dict[str, FieldSpec]  # dest -> spec (first group wins)
    groups: list[tuple[str, type, str]]
    mirrors: dict[str, str]  # dest -> dest whose flag it shares (e.g. trainer `temperature` <- `rollout_temperature`)


def build_parser(
    prog: str = "miles train", groups: Sequence[tuple[str, type, str]] | None = None, epilog: str | None = None
) -> ParserInfo:
    """An argparse parser with one argument group per config group, plus `--config FILE.yaml`."""
    groups = list(groups) if groups is not None else load_groups()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Miles RL training: rollout -> reward -> train -> weight sync, placed on Ray.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags override it)")
    specs: dict[str, FieldSpec] = {}
    owner: dict[str, str] = {}  # option string -> dest
    mirrors: dict[str, str] = {}
    for name, cls, title in groups:
        arg_group = parser.add_argument_group(name, title)
        for spec in field_specs(name, cls):
            if spec.name in specs:  # shared field: registered by the first group that declares it
                continue
            options = [spec.disable_flag] if spec.disable_flag else list(spec.flags)
            taken = [owner[o] for o in options if o in owner]
            if taken:  # another field already owns this flag: this one mirrors its value
                mirrors[spec.name] = taken[0]
                continue
            specs[spec.name] = spec
            owner.update({o: spec.name for o in options})
            _add_argument(arg_group, spec)
    parser.set_defaults(**{s.name: s.default for s in specs.values()})
    return ParserInfo(parser, specs, groups, mirrors)


# ---- YAML -----------------------------------------------------------------------------------


def _convert_yaml_value(spec: FieldSpec, value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        if spec.kind in ("bool", "optbool"):
            if not isinstance(value, bool):
                raise TypeError(f"expected true/false, got {value!r}")
            return value
        if spec.kind == "list":
            items = value if isinstance(value, list) else [value]
            return [spec.elem_type(v) if spec.elem_type in (int, float, str) else v for v in items]
        if spec.kind == "scalar":
            if spec.elem_type in (int, float) and isinstance(value, bool):
                raise TypeError(f"expected a number, got {value!r}")
            if spec.elem_type is int and isinstance(value, float) and not value.is_integer():
                raise TypeError(f"expected an integer, got {value!r}")
            if spec.elem_type is str and isinstance(value, (dict, list)):
                raise TypeError(f"expected a string, got {value!r}")
            out = spec.elem_type(value)
        else:
            out = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value for {spec.flags[0]}: {e}") from None
    if spec.choices and out not in spec.choices:
        raise ConfigError(f"{where}: {spec.flags[0]} must be one of {list(spec.choices)}, got {out!r}")
    return out


def load_yaml_config(path: str, info: ParserInfo) -> dict[str, Any]:
    """Read a YAML config into `{dest: value}`. Keys may use dashes or underscores, may be nested one
    level under a group name (`cluster: {colocate: true}`), and may be slime's `disable_*` forms."""
    import yaml

    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: the top level must be a mapping of flag names to values")
    group_names = {name for name, _, _ in info.groups}
    disables = {s.disable_flag.lstrip("-").replace("-", "_"): s for s in info.specs.values() if s.disable_flag}
    aliases = {f.lstrip("-").replace("-", "_"): s.name for s in info.specs.values() if not s.disable_flag
               for f in s.flags}  # e.g. `async` -> async_train
    out: dict[str, Any] = {}

    def visit(mapping: yaml.MappingNode, nested: bool) -> None:
        for key_node, value_node in mapping.value:
            key = str(key_node.value).replace("-", "_")
            where = f"{path}:{key_node.start_mark.line + 1}"
            if not nested and key in group_names and isinstance(value_node, yaml.MappingNode):
                visit(value_node, True)
                continue
            value = yaml.safe_load(yaml.serialize(value_node))
            key = key if key in info.specs else aliases.get(key, key)
            if key in info.specs:
                out[key] = _convert_yaml_value(info.specs[key], value, where)
            elif key in disables:
                spec = disables[key]
                out[spec.name] = not _convert_yaml_value(spec, value, where)
            else:
                known = list(info.specs) + list(disables)
                hint = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(
                    f"{where}: unknown key {key_node.value!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )

    visit(root, False)
    return out


# ---- the result -----------------------------------------------------------------------------


class MilesConfig:
    """The parsed configuration: flat slime-style `args` plus typed group instances (`cfg.cluster`...)."""

    def __init__(self, args: argparse.Namespace, groups: Sequence[tuple[str, type, str]]):
        self.args = args
        self.groups: dict[str, Any] = {}
        for name, cls, _ in groups:
            fields = [f.name for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)]
            self.groups[name] = cls(**{f: getattr(args, f) for f in fields})

    def __getattr__(self, name: str) -> Any:
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(f"MilesConfig has no group {name!r} (groups: {sorted(groups)})")


def _drop_sglang_args(parser: argparse.ArgumentParser, unknown: list[str]) -> list[str]:
    """slime re-exposes every SGLang server flag as `--sglang-*`; Miles' engine has its own options, so such
    flags (and their values) are accepted and ignored with a warning. Anything else unknown is an error."""
    ignored, rest, skipping = [], [], False
    for tok in unknown:
        if tok.startswith("--sglang-"):
            ignored.append(tok)
            skipping = True
        elif skipping and not tok.startswith("-"):
            ignored.append(tok)
        else:
            skipping = False
            rest.append(tok)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if ignored:
        import logging

        logging.getLogger(__name__).warning("ignoring SGLang server flags (not used by Miles' engine): %s",
                                            " ".join(ignored))
    return ignored


def parse_config(
    argv: Sequence[str] | None = None,
    groups: Sequence[tuple[str, type, str]] | None = None,
    check: bool = True,
    prog: str = "miles train",
    epilog: str | None = None,
) -> MilesConfig:
    """Parse `argv` (YAML from `--config`, CLI overriding it), fill derived values and (with `check`) validate.

    Raises ConfigError naming the flags on an inconsistent configuration.
    """
    info = build_parser(prog, groups, epilog)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        info.parser.set_defaults(**load_yaml_config(known.config, info))
    args, unknown = info.parser.parse_known_args(argv)
    args.ignored_sglang_args = _drop_sglang_args(info.parser, unknown)
    for dest, source in info.mirrors.items():
        setattr(args, dest, getattr(args, source))
    missing = [s.flags[0] for s in info.specs.values() if s.required and getattr(args, s.name) is None]
    if missing:
        raise ConfigError(f"missing required flag(s): {', '.join(missing)}")
    if check:
        validate(args)
    try:
        cfg = MilesConfig(args, info.groups)
        for group in cfg.groups.values():  # each package's own checks
            if hasattr(group, "validate"):
                group.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    return cfg


# ---- cross-group validation ----------------------------------------------------------------


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def finalize(args: argparse.Namespace) -> None:
    """Fill slime's derived values in place (defaults that depend on other flags)."""
    if _get(args, "load_debug_rollout_data"):
        args.debug_train_only = True
    colocate = bool(_get(args, "colocate"))
    actor_gpus = (_get(args, "actor_num_nodes", 1) or 1) * (_get(args, "actor_num_gpus_per_node", 1) or 1)
    if _get(args, "rollout_num_gpus") is None and hasattr(args, "rollout_num_gpus"):
        args.rollout_num_gpus = actor_gpus if colocate else _get(args, "rollout_num_gpus_per_engine", 1)
    for name in ("offload_train", "offload_rollout"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, colocate)
    rbs, n = _get(args, "rollout_batch_size"), _get(args, "n_samples_per_prompt", 1) or 1
    if rbs:
        if _get(args, "over_sampling_batch_size") is None and hasattr(args, "over_sampling_batch_size"):
            args.over_sampling_batch_size = rbs
        steps, gbs = _get(args, "num_steps_per_rollout"), _get(args, "global_batch_size")
        if steps and gbs is None and (rbs * n) % steps == 0:
            args.global_batch_size = rbs * n // steps
        elif gbs is None and hasattr(args, "global_batch_size"):
            args.global_batch_size = rbs * n
        gbs = _get(args, "global_batch_size")
        if hasattr(args, "num_steps_per_rollout") and args.num_steps_per_rollout is None and gbs:
            if (rbs * n) % gbs == 0:
                args.num_steps_per_rollout = rbs * n // gbs
    transport = _get(args, "update_weight_transport")
    if transport == "auto":
        if _get(args, "rollout_external_engine_addrs"):
            args.update_weight_transport = "disk"
        else:
            args.update_weight_transport = "ipc" if colocate else "collective"


def validate(args: argparse.Namespace) -> None:
    """Fill derived values, then fail (ConfigError listing every problem, by flag name) if they disagree.

    Runs before any process is started.
    """
    finalize(args)
    errors: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    rbs, n = _get(args, "rollout_batch_size"), _get(args, "n_samples_per_prompt", 1)
    debug_train = bool(_get(args, "debug_train_only"))
    debug_rollout = bool(_get(args, "debug_rollout_only"))
    need(rbs is not None, "--rollout-batch-size is required")
    need(rbs is None or rbs >= 1, f"--rollout-batch-size must be >= 1, got {rbs}")
    need(n is None or n >= 1, f"--n-samples-per-prompt must be >= 1, got {n}")
    need(
        _get(args, "num_rollout") is not None or _get(args, "num_epoch") is not None,
        "one of --num-rollout or --num-epoch is required",
    )
    need(_get(args, "hf_checkpoint") is not None, "--hf-checkpoint (the starting model directory) is required")
    if rbs and n:
        total = rbs * n
        gbs, steps = _get(args, "global_batch_size"), _get(args, "num_steps_per_rollout")
        if gbs is not None:
            need(gbs >= 1, f"--global-batch-size must be >= 1, got {gbs}")
            need(
                gbs < 1 or total % gbs == 0,
                f"--rollout-batch-size ({rbs}) x --n-samples-per-prompt ({n}) = {total} samples per rollout must be "
                f"a multiple of --global-batch-size ({gbs})",
            )
        if steps is not None and gbs:
            need(
                gbs * steps == total,
                f"--rollout-batch-size ({rbs}) x --n-samples-per-prompt ({n}) = {total} must equal "
                f"--global-batch-size ({gbs}) x --num-steps-per-rollout ({steps}) = {gbs * steps}",
            )
        osb = _get(args, "over_sampling_batch_size")
        need(
            osb is None or osb >= rbs,
            f"--over-sampling-batch-size ({osb}) must be >= --rollout-batch-size ({rbs})",
        )
    if _get(args, "async_train"):
        need(not _get(args, "colocate"), "--async needs disaggregated placement: remove --colocate (or --async)")
        need(
            not debug_train and not debug_rollout,
            "--async cannot be combined with --debug-train-only, --debug-rollout-only or --load-debug-rollout-data",
        )
    need(not (debug_train and debug_rollout), "--debug-rollout-only and --debug-train-only are exclusive")
    need(
        not debug_train or _get(args, "load_debug_rollout_data"),
        "--debug-train-only needs --load-debug-rollout-data (there are no engines to generate with)",
    )
    need(
        _get(args, "save_interval") is None or _get(args, "save") is not None,
        "--save-interval needs --save DIR",
    )
    need(
        _get(args, "save_interval") is None or _get(args, "save_interval") >= 1,
        f"--save-interval must be >= 1, got {_get(args, 'save_interval')}",
    )
    ei = _get(args, "eval_interval")
    if ei is not None:
        need(ei >= 1, f"--eval-interval must be >= 1, got {ei}")
        need(
            bool(_get(args, "eval_prompt_data")) or bool(_get(args, "eval_config")),
            "--eval-interval needs --eval-prompt-data NAME PATH [...]",
        )
    epd = _get(args, "eval_prompt_data")
    need(
        not epd or len(epd) == 1 or len(epd) % 2 == 0,
        f"--eval-prompt-data takes NAME PATH pairs, got {len(epd or [])} values",
    )
    need(
        _get(args, "update_weights_interval", 1) >= 1,
        f"--update-weights-interval must be >= 1, got {_get(args, 'update_weights_interval')}",
    )
    need(
        _get(args, "update_weights_interval", 1) == 1 or _get(args, "async_train") or not _get(args, "colocate"),
        "--update-weights-interval > 1 with --colocate would train and generate on diverging weights; use 1",
    )
    if hasattr(args, "rollout_num_gpus") and not debug_train:
        rg, per = args.rollout_num_gpus, _get(args, "rollout_num_gpus_per_engine", 1)
        need(per >= 1, f"--rollout-num-gpus-per-engine must be >= 1, got {per}")
        need(rg >= 0, f"--rollout-num-gpus must be >= 0, got {rg}")
        need(
            per < 1 or rg % per == 0,
            f"--rollout-num-gpus ({rg}) must be a multiple of --rollout-num-gpus-per-engine ({per})",
        )
        external = _get(args, "rollout_external_engine_addrs")
        need(rg > 0 or bool(external), "--rollout-num-gpus 0 needs --rollout-external-engine-addrs")
        need(
            per == 1,
            f"--rollout-num-gpus-per-engine {per}: tensor-parallel engines are not supported yet; use 1 "
            "(and more engines)",
        )
        if _get(args, "colocate"):
            actor = _get(args, "actor_num_nodes", 1) * _get(args, "actor_num_gpus_per_node", 1)
            need(
                rg <= actor,
                f"--colocate: --rollout-num-gpus ({rg}) cannot exceed the trainer's devices "
                f"(--actor-num-nodes x --actor-num-gpus-per-node = {actor})",
            )
        if external:
            need(
                _get(args, "update_weight_transport") == "disk",
                "--rollout-external-engine-addrs only supports --update-weight-transport disk",
            )
    if _get(args, "update_weight_transport") == "ipc":
        need(
            _get(args, "colocate") or _get(args, "actor_num_nodes", 1) == 1,
            "--update-weight-transport ipc needs trainer and engines on one node (use --colocate or collective)",
        )
    if not _get(args, "load_debug_rollout_data") and _get(args, "rollout_global_dataset", True):
        need(
            _get(args, "prompt_data") is not None or not hasattr(args, "prompt_data"),
            "--prompt-data is required (or --disable-rollout-global-dataset with your own data source)",
        )
    temp = _get(args, "rollout_temperature")
    need(temp is None or temp > 0, f"--rollout-temperature must be > 0, got {temp}")
    need(
        not (_get(args, "kl_coef") and _get(args, "kl_loss_coef")),
        "--kl-coef and --kl-loss-coef cannot both be non-zero",
    )
    need(
        not (_get(args, "use_rollout_logprobs") and _get(args, "use_tis")),
        "--use-rollout-logprobs and --use-tis are exclusive",
    )
    need(
        _get(args, "loss_type") != "custom_loss" or _get(args, "custom_loss_function_path") is not None,
        "--loss-type custom_loss needs --custom-loss-function-path",
    )
    need(
        not _get(args, "custom_reward_post_process_path")
        or _get(args, "advantage_estimator", "grpo") in ("grpo", "gspo"),
        "--custom-reward-post-process-path needs --advantage-estimator grpo or gspo (its rewards are the advantages)",
    )
    sub = _get(args, "load_debug_rollout_data_subsample")
    need(sub is None or 0 < sub <= 1, f"--load-debug-rollout-data-subsample must be in (0, 1], got {sub}")
    need(
        not (_get(args, "save_debug_rollout_data") and _get(args, "load_debug_rollout_data")),
        "--save-debug-rollout-data and --load-debug-rollout-data are exclusive",
    )
    if not errors:
        try:
            from miles.rollout.config import validate as validate_rollout
        except ImportError:
            validate_rollout = None
        if validate_rollout is not None:
            try:
                validate_rollout(args)
            except (ValueError, AttributeError) as e:
                errors.append(str(e))
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
