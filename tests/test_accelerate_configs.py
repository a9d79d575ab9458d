"""Every file in accelerate_configs/ against accelerate's own schema, launcher and plugins, and
every DeepSpeed JSON there against DeepSpeed's config parser. CPU only: no process is started.

accelerate itself checks only the top-level keys of a config file: the keys inside
``deepspeed_config`` / ``fsdp_config`` are copied onto the launcher's arguments unchecked, so a
misspelled one is silently ignored. Here they must be names the launcher has an option for.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "accelerate_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DS_JSONS = sorted((CONFIG_DIR / "deepspeed").glob("*.json"))
MIXED_PRECISION = {"no", "fp16", "bf16"}
# With `deepspeed_config_file` accelerate refuses these accelerate-config keys at start-up
# (DeepSpeedPlugin._deepspeed_config_checks): they belong in the JSON.
DS_KEYS_OWNED_BY_JSON = {"zero_stage", "offload_optimizer_device", "offload_param_device", "offload_param_nvme_path",
                         "offload_optimizer_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
                         "zero3_save_16bit_model", "mixed_precision"}
# The "auto" values that accelerate fills for our models. It can also fill the hidden-size based
# zero_optimization.reduce_bucket_size / stage3_* keys, but only for models with a `config.hidden_size`
# (Transformers); timm models have none, so "auto" there would fail in `prepare`.
FILLED_BY_ACCELERATE = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "gradient_clipping", "fp16.enabled", "bf16.enabled",
                        "zero_optimization.stage3_gather_16bit_weights_on_model_save"}


def _launch_parser():
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


def _option_names(parser, group_title: str) -> set[str]:
    """The `accelerate launch` options of one argument group ("DeepSpeed Arguments", "FSDP Arguments")."""
    groups = [g for g in parser._action_groups if g.title == group_title]
    assert len(groups) == 1, f"accelerate's launcher has no argument group {group_title!r}"
    return {action.dest for action in groups[0]._group_actions}


def _header(text: str) -> str:
    """The comment lines before the first YAML line."""
    lines = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _fill_auto(ds_config: dict, *, world_size: int, mixed_precision: str = "bf16", micro: int = 4) -> dict:
    """Concrete values for the "auto" entries, as accelerate's `prepare` would put them."""
    cfg = copy.deepcopy(ds_config)
    autos = []

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value == "auto":
                autos.append(f"{prefix}{key}")

    walk(cfg)
    unfilled = sorted(set(autos) - FILLED_BY_ACCELERATE)
    assert not unfilled, f"'auto' values accelerate cannot fill for a timm model: {unfilled}"
    if cfg.get("gradient_accumulation_steps") in (None, "auto"):
        cfg["gradient_accumulation_steps"] = 1
    if cfg.get("train_micro_batch_size_per_gpu") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = micro
    if cfg.get("train_batch_size") == "auto":
        cfg["train_batch_size"] = (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
                                   * world_size)
    if cfg.get("gradient_clipping") == "auto":
        cfg["gradient_clipping"] = 1.0
    for dtype in ("fp16", "bf16"):
        if isinstance(cfg.get(dtype), dict) and cfg[dtype].get("enabled") == "auto":
            cfg[dtype]["enabled"] = mixed_precision == dtype
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage3_gather_16bit_weights_on_model_save") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return cfg


def validate_deepspeed_dict(ds_config: dict, *, world_size: int, mixed_precision: str = "bf16"):
    """DeepSpeed's own parser on the config with "auto" filled in, as if `world_size` processes ran it.

    DeepSpeed rejects unknown keys inside its sections (pydantic) but not at the top level, so
    top-level keys must be names DeepSpeed defines.
    """
    import deepspeed.runtime.config as ds_runtime_config
    import deepspeed.runtime.constants as ds_constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    known = {v for k, v in vars(ds_constants).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}
    unknown = sorted(set(ds_config) - known)
    assert not unknown, f"top-level keys DeepSpeed does not define: {unknown}"
    concrete = _fill_auto(ds_config, world_size=world_size, mixed_precision=mixed_precision)
    # Without a process group DeepSpeedConfig assumes one process; give it the world size instead.
    fake_dist = SimpleNamespace(get_rank=lambda *a, **k: 0, get_world_size=lambda *a, **k: world_size)
    with mock.patch.object(ds_runtime_config, "dist", fake_dist):
        parsed = ds_runtime_config.DeepSpeedConfig(concrete)
    assert parsed.world_size == world_size
    return parsed


def _deepspeed_plugin_config(args, defaults, mp_from_config_flag) -> dict:
    """The DeepSpeed config a launched process would build: launcher environment -> DeepSpeedPlugin."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    # as accelerate.commands.launch.launch_command does before calling the DeepSpeed launcher
    fields = list(defaults.deepspeed_config.keys())
    if mp_from_config_flag:
        fields.append("mixed_precision")
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    args.main_process_port = 0  # a free port: never probe 29500, which a concurrent run may hold
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env, clear=True), contextlib.chdir(REPO):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(args.mixed_precision)
    assert plugin.zero3_init_flag is False, "zero3_init_flag needs a Transformers model (timm models: false)"
    return plugin.deepspeed_config


def _fsdp_plugin(args):
    """The FSDP plugin a launched process would build from the launcher's environment."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args.main_process_port = 0
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env, clear=True):
        return FullyShardedDataParallelPlugin()


def check_accelerate_config(path: Path) -> dict:
    """Check one accelerate config file; raise (AssertionError, or accelerate's/DeepSpeed's
    ValueError) on the first problem. Returns what was resolved, for further checks."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils import ComputeEnvironment, DistributedType

    text = path.read_text()
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict), "a YAML mapping"

    # header: the exact launch command for this very file
    header = _header(text)
    assert f"accelerate launch --config_file accelerate_configs/{path.name}" in header, \
        f"the header comment shows `accelerate launch --config_file accelerate_configs/{path.name} ...`"
    named = set(re.findall(r"--config_file\s+accelerate_configs/(\S+)", header))
    assert named == {path.name}, f"the header names other accelerate configs: {sorted(named - {path.name})}"
    assert "scripts/train_classifier.py" in header and "configs/toy_effnetlite0_finetune.yaml" in header

    # top level: fields of accelerate's config dataclass, and accelerate's own loader
    fields = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(raw) - fields)
    assert not unknown, f"unknown keys {unknown}: not fields of accelerate's ClusterConfig"
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert isinstance(cfg.distributed_type, DistributedType)
    assert DistributedType(raw["distributed_type"]) == cfg.distributed_type
    dist = cfg.distributed_type

    # processes and machines
    assert isinstance(cfg.num_processes, int) and cfg.num_processes >= 1, "num_processes >= 1"
    assert isinstance(cfg.num_machines, int) and cfg.num_machines >= 1, "num_machines >= 1"
    assert cfg.num_processes % cfg.num_machines == 0, \
        f"num_processes {cfg.num_processes} (all machines) is not a multiple of num_machines {cfg.num_machines}"
    assert 0 <= cfg.machine_rank < cfg.num_machines, "machine_rank in [0, num_machines)"
    if dist == DistributedType.NO:
        assert cfg.num_processes == 1 and cfg.num_machines == 1, "distributed_type NO runs one process"
    if dist == DistributedType.MULTI_GPU:
        assert cfg.num_processes >= 2, "MULTI_GPU needs num_processes >= 2"
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port, "several machines need main_process_ip and a fixed port"
    per_machine = cfg.num_processes // cfg.num_machines
    match = re.search(r"(\d+)gpu|gpu(\d+)", path.stem)
    if match:
        assert per_machine == int(match.group(1) or match.group(2)), \
            f"{path.name}: {per_machine} processes per machine, the name says {match.group(0)}"

    # mixed precision (with a DeepSpeed JSON it belongs in the JSON / on the command line)
    ds_file = (cfg.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert "mixed_precision" not in raw, \
            "with deepspeed_config_file accelerate refuses mixed_precision here: pass --mixed_precision instead"
    else:
        assert cfg.mixed_precision in MIXED_PRECISION, \
            f"mixed_precision {cfg.mixed_precision!r} not in {MIXED_PRECISION}"
        for mp in ("fp16", "bf16"):
            if mp in path.stem.split("_"):
                assert cfg.mixed_precision == mp, f"{path.name}: mixed_precision is {cfg.mixed_precision}"

    # the nested sections: only names `accelerate launch` has an option for
    parser = _launch_parser()
    if dist == DistributedType.DEEPSPEED:
        assert cfg.deepspeed_config, "a DEEPSPEED config needs deepspeed_config"
        bad = sorted(set(cfg.deepspeed_config) - _option_names(parser, "DeepSpeed Arguments"))
        assert not bad, f"deepspeed_config keys accelerate does not know: {bad}"
        if ds_file:
            assert (REPO / ds_file).is_file(), f"deepspeed_config_file {ds_file} (relative to the repository root)"
            clash = sorted(set(cfg.deepspeed_config) & DS_KEYS_OWNED_BY_JSON)
            assert not clash, f"with deepspeed_config_file these belong in the JSON: {clash}"
    else:
        assert not cfg.deepspeed_config, "deepspeed_config only with distributed_type DEEPSPEED"
    if dist == DistributedType.FSDP:
        assert cfg.fsdp_config, "an FSDP config needs fsdp_config"
        bad = sorted(set(cfg.fsdp_config) - _option_names(parser, "FSDP Arguments"))
        assert not bad, f"fsdp_config keys accelerate does not know: {bad}"
    else:
        assert not cfg.fsdp_config, "fsdp_config only with distributed_type FSDP"

    # accelerate's launcher (all its checks up to starting processes), then the plugin a process builds
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mp_from_config_flag = _validate_launch_command(args)
    assert args.num_processes == cfg.num_processes and args.num_machines == cfg.num_machines
    resolved = {"cfg": cfg, "args": args}
    if dist == DistributedType.DEEPSPEED:
        ds_config = _deepspeed_plugin_config(args, defaults, mp_from_config_flag)
        mp = args.mixed_precision if args.mixed_precision != "no" else "bf16"  # bf16: as with --mixed_precision bf16
        parsed = validate_deepspeed_dict(ds_config, world_size=cfg.num_processes, mixed_precision=mp)
        stage = re.search(r"zero(\d)", path.stem)
        if stage:
            assert parsed.zero_optimization_stage == int(stage.group(1)), f"{path.name}: ZeRO stage"
        if parsed.zero_optimization_stage == 3:
            assert parsed.zero_config.gather_16bit_weights_on_model_save, \
                "ZeRO-3 must gather the weights on save (zero3_save_16bit_model) to export a consolidated model"
        resolved["deepspeed"] = parsed
    if dist == DistributedType.FSDP:
        resolved["fsdp"] = _fsdp_plugin(args)
    return resolved


# ---------------------------------------------------------------- the shipped files


def test_configs_exist_for_every_hardware_set_up():
    names = {p.name for p in CONFIGS}
    expected = {"cpu.yaml", "cpu_2proc.yaml", "gpu1_fp16.yaml", "gpu1_bf16.yaml", "deepspeed_zero2.yaml",
                "deepspeed_zero3.yaml", "deepspeed_zero3_json.yaml", "fsdp.yaml", "two_node_ddp_8gpu.yaml",
                "pipeline_2gpu.yaml", "pipeline_4gpu.yaml",
                *(f"ddp_{n}gpu_{mp}.yaml" for n in (2, 4, 8) for mp in ("fp16", "bf16"))}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_passes_accelerates_checks(path):
    check_accelerate_config(path)


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_every_deepspeed_json_is_valid_and_used(path):
    ds_config = json.loads(path.read_text())
    parsed = validate_deepspeed_dict(ds_config, world_size=2)
    stage = re.search(r"zero(\d)", path.stem)
    assert stage and parsed.zero_optimization_stage == int(stage.group(1))
    if parsed.zero_optimization_stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save
    users = [p.name for p in CONFIGS if f"accelerate_configs/deepspeed/{path.name}" in p.read_text()]
    assert users, f"no accelerate config points at {path.name}"


def test_resolved_settings_of_the_sharded_configs():
    zero3 = check_accelerate_config(CONFIG_DIR / "deepspeed_zero3.yaml")["deepspeed"]
    zero3_json = check_accelerate_config(CONFIG_DIR / "deepspeed_zero3_json.yaml")["deepspeed"]
    for parsed in (zero3, zero3_json):
        assert parsed.zero_optimization_stage == 3 and parsed.zero_config.gather_16bit_weights_on_model_save
        assert parsed.train_batch_size == parsed.train_micro_batch_size_per_gpu * 2  # 2 processes, no accumulation
    fsdp = check_accelerate_config(CONFIG_DIR / "fsdp.yaml")
    plugin = fsdp["fsdp"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading is False
    assert fsdp["cfg"].num_processes == 8 and fsdp["cfg"].mixed_precision == "bf16"
    two = check_accelerate_config(CONFIG_DIR / "two_node_ddp_8gpu.yaml")["cfg"]
    assert (two.num_machines, two.num_processes, two.machine_rank, two.rdzv_backend) == (2, 16, 0, "static")


# ---------------------------------------------------------------- the checks can fail


def _write(tmp_path: Path, name: str, raw: dict, header: str | None = None) -> Path:
    path = tmp_path / name
    header = header or (f"# test\n#   accelerate launch --config_file accelerate_configs/{name} "
                        "scripts/train_classifier.py --config configs/toy_effnetlite0_finetune.yaml\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def _raw(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / name).read_text())


def _ds_json_copy(tmp_path: Path, **zero_extra) -> str:
    ds = json.loads((CONFIG_DIR / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"].update(zero_extra)
    out = tmp_path / "zero3_custom.json"
    out.write_text(json.dumps(ds))
    return str(out)


def test_a_copy_of_a_good_config_passes(tmp_path):
    check_accelerate_config(_write(tmp_path, "ddp_2gpu_bf16.yaml", _raw("ddp_2gpu_bf16.yaml")))


@pytest.mark.parametrize("base,change,message", [
    ("ddp_2gpu_bf16.yaml", {"num_process": 2}, "unknown keys"),
    ("ddp_2gpu_bf16.yaml", {"mixed_precision": "fp32"}, "mixed_precision"),
    ("ddp_2gpu_bf16.yaml", {"num_processes": 1}, "num_processes >= 2"),
    ("ddp_2gpu_bf16.yaml", {"num_processes": 4}, "the name says 2gpu"),
    ("ddp_2gpu_bf16.yaml", {"distributed_type": "MULTI_GPUS"}, "MULTI_GPUS"),
    ("two_node_ddp_8gpu.yaml", {"num_processes": 15}, "not a multiple"),
    ("deepspeed_zero3.yaml", {"deepspeed_config": {"zero_stages": 3}}, "zero_stages"),
    ("deepspeed_zero3.yaml", {"deepspeed_config": {"offload_param_device": "gpu"}}, "DeepSpeedZeroConfig"),
    ("deepspeed_zero3.yaml",
     {"deepspeed_config": {"zero3_save_16bit_model": False}}, "gather the weights"),
    # left out, zero3_init_flag defaults to true under ZeRO-3 (deepspeed.zero.Init needs Transformers)
    ("deepspeed_zero3.yaml", {"deepspeed_config": {"zero3_init_flag": None}}, "zero3_init_flag"),
    ("fsdp.yaml", {"fsdp_config": {"fsdp_state_dict": "FULL_STATE_DICT"}},
     "fsdp_state_dict"),
    ("fsdp.yaml", {"fsdp_config": {"fsdp_reshard_after_forward": "FULL_SHARD"}},
     "truth value"),  # FSDP2 wants a bool, not an FSDP1 sharding strategy
    ("fsdp.yaml", {"fsdp_config": {"fsdp_auto_wrap_policy": "SIZE_BASED"}},
     "Invalid auto wrap policy"),
    ("deepspeed_zero3_json.yaml", {"mixed_precision": "bf16"}, "mixed_precision"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_a_broken_config_is_rejected(tmp_path, base, change, message):
    raw = _raw(base)
    for key, value in change.items():  # nested sections are merged: change (None: drop) one key in them
        if isinstance(value, dict):
            value = {k: v for k, v in {**raw[key], **value}.items() if v is not None}
        raw[key] = value
    with pytest.raises((AssertionError, ValueError), match=message):
        check_accelerate_config(_write(tmp_path, base, raw))


@pytest.mark.parametrize("extra", [{"mixed_precision": "no"}, {"deepspeed_config": {"gradient_clipping": 1.0}}])
def test_accelerate_itself_refuses_settings_the_json_owns(tmp_path, extra):
    """Why the check above exists: a process started with such a config fails in DeepSpeedPlugin."""
    from accelerate.commands.launch import _validate_launch_command

    raw = _raw("deepspeed_zero3_json.yaml")
    raw["deepspeed_config"] = {**raw["deepspeed_config"],
                               "deepspeed_config_file": str(CONFIG_DIR / "deepspeed" / "zero3.json")}
    for key, value in extra.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    path = _write(tmp_path, "deepspeed_zero3_json.yaml", raw)
    args = _launch_parser().parse_args(["--config_file", str(path), "train.py"])
    with pytest.raises(ValueError, match="will be ignored"):
        _deepspeed_plugin_config(*_validate_launch_command(args))


def test_a_misspelled_key_in_a_deepspeed_json_is_rejected(tmp_path):
    raw = _raw("deepspeed_zero3_json.yaml")
    typo = _ds_json_copy(tmp_path, stage3_gather_16bit_weight_on_model_save=True)  # "weight", not "weights"
    raw["deepspeed_config"] = {**raw["deepspeed_config"], "deepspeed_config_file": typo}
    with pytest.raises(ValueError, match="stage3_gather_16bit_weight_on_model_save"):
        check_accelerate_config(_write(tmp_path, "deepspeed_zero3_json.yaml", raw))
    ds = json.loads((CONFIG_DIR / "deepspeed" / "zero3.json").read_text())
    with pytest.raises(AssertionError, match="zero_optimisation"):
        validate_deepspeed_dict({**ds, "zero_optimisation": {"stage": 3}}, world_size=2)
    with pytest.raises(AssertionError, match="cannot fill"):
        validate_deepspeed_dict({**ds, "zero_optimization": {**ds["zero_optimization"], "reduce_bucket_size": "auto"}},
                                world_size=2)


def test_a_header_for_another_file_is_rejected(tmp_path):
    header = ("# copied\n#   accelerate launch --config_file accelerate_configs/ddp_4gpu_bf16.yaml "
              "scripts/train_classifier.py --config configs/toy_effnetlite0_finetune.yaml\n")
    with pytest.raises(AssertionError, match="header"):
        check_accelerate_config(_write(tmp_path, "ddp_2gpu_bf16.yaml", _raw("ddp_2gpu_bf16.yaml"), header))
