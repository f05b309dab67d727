"""Configuration: loading, dotted overrides, validation messages, docs, save/load, mapping.

Fast and in-process: no process group is started. Every validation error a user can
hit must be a ``ConfigError`` whose message is one line naming the field and the fix;
``megasmoe check`` turns it into ``megasmoe: config error: ...`` and exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import megasmoe.config as C
import megasmoe.config.schema as S
from megasmoe.config import (
    Config,
    ConfigError,
    apply_overrides,
    field_docs,
    load_config,
    parse_override,
    save_config,
    to_dict,
    validate,
)
from megasmoe.routers import registered_routers, router_config_for, router_entry

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def config_error(overrides=(), world_size=None, path=TINY) -> str:
    """The ConfigError message for loading + validating; asserts it is one line."""
    with pytest.raises(ConfigError) as info:
        validate(load_config(path, list(overrides)), world_size)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def ok(overrides=(), world_size=None, path=TINY) -> Config:
    return validate(load_config(path, list(overrides)), world_size)


# --------------------------------------------------------------------------- configs/


def test_configs_directory_is_not_empty():
    assert TINY in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_for_their_world_size(path):
    raw = yaml.safe_load(path.read_text())
    stated = (raw.get("parallel") or {}).get("world_size")
    cfg = ok(path=path, world_size=stated)
    p = cfg.parallel
    assert p.world_size == p.tp * p.pp * p.cp * p.dp
    if stated is not None:
        assert p.world_size == stated
        # Launched with a different process count, the check must refuse.
        msg = config_error(path=path, world_size=stated + 1)
        assert "parallel.world_size" in msg


def test_tiny_cpu_layout():
    cfg = ok()
    p = cfg.parallel
    assert (p.world_size, p.tp, p.pp, p.cp, p.dp, p.ep, p.etp) == (2, 1, 1, 1, 2, 2, 1)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)


def test_defaults_validate_without_a_file():
    cfg = ok(path=None)
    assert cfg.parallel.world_size == 1 and cfg.parallel.dp == 1
    assert cfg.moe.router.name == "topk"


# --------------------------------------------------------------------------- overrides


def test_parse_override_types():
    assert parse_override("train.steps=20") == ("train.steps", 20)
    assert parse_override("train.lr=0.5") == ("train.lr", 0.5)
    assert parse_override("train.recompute=true") == ("train.recompute", True)
    assert parse_override("train.recompute=false") == ("train.recompute", False)
    assert parse_override("run.dir=null") == ("run.dir", None)
    assert parse_override("data.prefixes=[a, b]") == ("data.prefixes", ["a", "b"])
    assert parse_override("moe.layer_freq=[1,0,1,0]") == ("moe.layer_freq", [1, 0, 1, 0])
    assert parse_override(" run.name = x=y") == ("run.name", "x=y")
    assert parse_override("run.name=") == ("run.name", "")


def test_parse_override_scientific_float():
    """``1e-3`` is a float (YAML 1.2); PyYAML's YAML 1.1 resolver alone reads a string."""
    key, value = parse_override("train.lr=1e-3")
    assert key == "train.lr"
    assert isinstance(value, float) and value == pytest.approx(1e-3)


def test_scientific_float_override_and_yaml_file(tmp_path):
    cfg = ok(["train.lr=3e-4", "train.min_lr=1e-5", "model.norm_eps=1E-6"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.min_lr == pytest.approx(1e-5)
    assert cfg.model.norm_eps == pytest.approx(1e-6)
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 3e-4\n  min_lr: 1e-5\n")
    cfg = ok(path=path)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.min_lr == pytest.approx(1e-5)


def test_overrides_are_typed_and_dotted():
    cfg = ok([
        "train.steps=7",
        "train.warmup_steps=1",
        "train.lr=2.0e-3",
        "train.min_lr=0",           # int accepted for a float field, stored as float
        "train.recompute=true",
        "run.dir=null",
        "model.num_query_groups=2",
        "moe.layer_freq=[1,0,1,0]",
        "data.weights=[0.25, 0.75]",
        "data.prefixes=[a, b]",
        "checkpoint.async_save=false",
        "logging.tensorboard=false",
    ])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.train.min_lr == 0.0 and type(cfg.train.min_lr) is float
    assert cfg.train.recompute is True
    assert cfg.run.dir is None and cfg.run.path == Path("runs") / "tiny-cpu"
    assert cfg.model.num_query_groups == 2
    assert cfg.moe.layer_freq == [1, 0, 1, 0]
    assert cfg.data.weights == [0.25, 0.75]
    # Relative paths are the caller's (here the working directory), stored absolute.
    assert cfg.data.prefixes == [str(Path.cwd() / "a"), str(Path.cwd() / "b")]
    assert cfg.checkpoint.async_save is False
    assert cfg.logging.tensorboard is False


def test_override_beats_yaml_and_last_override_wins():
    assert ok().train.steps == 200
    assert ok(["train.warmup_steps=1", "train.steps=5"]).train.steps == 5
    assert ok(["train.warmup_steps=1", "train.steps=5", "train.steps=9"]).train.steps == 9


def test_apply_overrides_builds_nested_dicts():
    tree = apply_overrides({"train": {"steps": 1}}, ["train.lr=0.5", "a.b.c=1", "train.steps=3"])
    assert tree == {"train": {"steps": 3, "lr": 0.5}, "a": {"b": {"c": 1}}}


def test_router_options_as_dotted_overrides():
    cfg = ok(["moe.router.score_function=sigmoid", "moe.router.pre_softmax=true",
              "moe.router.topk_scaling_factor=2"])
    assert cfg.moe.router.name == "topk"
    assert cfg.moe.router.options == {"score_function": "sigmoid", "pre_softmax": True,
                                      "topk_scaling_factor": 2}
    rc = router_config_for(cfg)
    assert rc.score_function == "sigmoid" and rc.pre_softmax is True
    assert rc.topk_scaling_factor == 2.0 and type(rc.topk_scaling_factor) is float


def test_router_options_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("moe:\n  router:\n    name: topk\n    score_function: sigmoid\n")
    cfg = ok(path=path)
    assert router_config_for(cfg).score_function == "sigmoid"


@pytest.mark.parametrize("item, fix", [
    ("train.steps", "key=value"),
    ("=5", "empty key"),
])
def test_malformed_override(item, fix):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [item])
    msg = str(info.value)
    assert "\n" not in msg and fix in msg and "train.steps=20" in msg


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_suggests_section():
    msg = config_error(["trian.steps=5"])
    assert "unknown config key 'trian'" in msg and "did you mean 'train'" in msg


def test_unknown_nested_key_suggests_field():
    msg = config_error(["train.stpes=5"])
    assert "train.stpes" in msg and "did you mean" in msg and "steps'" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    msg = config_error(path=path)
    assert "model.hiden_size" in msg and "did you mean 'model.hidden_size'" in msg


def test_unknown_key_without_near_match_has_no_suggestion():
    msg = config_error(["zzzz.q=1"])
    assert "unknown config key 'zzzz'" in msg and "did you mean" not in msg


def test_section_must_be_a_mapping():
    msg = config_error(["train=5"])
    assert msg.startswith("train:") and "mapping" in msg


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("override, field, expected", [
    ("train.steps=abc", "train.steps", "expected int"),
    ("train.steps=2.5", "train.steps", "expected int"),
    ("train.steps=true", "train.steps", "expected int"),
    ("train.steps=null", "train.steps", "expected int"),
    ("train.lr=fast", "train.lr", "expected float"),
    ("train.recompute=maybe", "train.recompute", "expected bool"),
    ("data.prefixes=abc", "data.prefixes", "expected a list"),
    ("moe.layer_freq=every", "moe.layer_freq", "expected int or list"),
    ("run.name=[1]", "run.name", "expected str"),
    ("moe.router.pre_softmax=maybe", "moe.router.pre_softmax", "expected bool"),
])
def test_bad_types(override, field, expected):
    msg = config_error([override])
    assert msg.startswith(field + ":") and expected in msg


@pytest.mark.parametrize("override", ["moe.router.name=5", "moe.router.name=null"])
def test_router_name_must_be_a_string(override):
    msg = config_error([override])
    assert "moe.router.name" in msg


def test_missing_config_file():
    msg = config_error(path=REPO / "configs" / "no-such.yaml")
    assert "no-such.yaml" in msg and "not found" in msg


def test_config_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    msg = config_error(path=path)
    assert "list.yaml" in msg and "mapping" in msg


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: [1, 2\n  lr: 0.1\n")
    msg = config_error(path=path)
    assert "broken.yaml" in msg


# --------------------------------------------------------------------------- layout errors


def test_world_size_not_divisible_by_model_parallel():
    msg = config_error(["parallel.world_size=3", "parallel.tp=2", "parallel.sp=true",
                        "parallel.ep=1"])
    assert "world size 3" in msg and "tp x pp x cp" in msg and "parallel.tp/pp/cp" in msg


def test_world_size_differs_from_tp_pp_cp_dp():
    msg = config_error(["parallel.dp=4"])
    assert "world size 2 != tp x pp x cp x dp" in msg and "set parallel.dp=2" in msg


def test_world_size_differs_from_launched_processes():
    msg = config_error(world_size=4)
    assert "parallel.world_size=2" in msg and "4 processes" in msg
    assert "set parallel.world_size=4" in msg


def test_launched_world_size_fills_dp():
    cfg = ok(["parallel.world_size=null"], world_size=4)
    assert cfg.parallel.world_size == 4 and cfg.parallel.dp == 4


@pytest.mark.parametrize("override, field", [
    ("parallel.tp=0", "parallel.tp"),
    ("parallel.pp=0", "parallel.pp"),
    ("parallel.cp=0", "parallel.cp"),
    ("parallel.tp=-1", "parallel.tp"),
    ("parallel.ep=0", "parallel.ep"),
    ("parallel.etp=0", "parallel.etp"),
    ("parallel.world_size=0", "parallel.world_size"),
    ("parallel.world_size=-2", "parallel.world_size"),
    ("model.num_heads=0", "model.num_heads"),
    ("model.num_layers=0", "model.num_layers"),
    ("train.global_batch_size=0", "train.global_batch_size"),
])
def test_non_positive_sizes_are_config_errors(override, field):
    """A zero or negative size is a one-line ConfigError, not a traceback or a pass."""
    msg = config_error([override])
    assert field in msg


def test_vpp_must_be_positive():
    msg = config_error(["parallel.vpp=0"])
    assert "parallel.vpp" in msg and "null" in msg


def test_heads_not_divisible_by_tp():
    msg = config_error(["model.num_heads=3", "model.hidden_size=96", "parallel.tp=2",
                        "parallel.sp=true", "parallel.ep=1"])
    assert "model.num_heads=3" in msg and "parallel.tp=2" in msg and "choose a tp" in msg


def test_query_groups_not_divisible_by_tp():
    msg = config_error(["model.num_query_groups=1", "parallel.tp=2", "parallel.sp=true",
                        "parallel.ep=1"])
    assert "model.num_query_groups=1" in msg and "parallel.tp=2" in msg


def test_query_groups_must_divide_heads():
    msg = config_error(["model.num_query_groups=3"])
    assert "model.num_query_groups=3" in msg and "num_heads=4" in msg


def test_hidden_not_divisible_by_heads():
    msg = config_error(["model.hidden_size=130"])
    assert "model.hidden_size=130" in msg and "model.num_heads=4" in msg


def test_experts_not_divisible_by_ep():
    msg = config_error(["moe.num_experts=6", "parallel.ep=4", "parallel.world_size=4",
                        "train.global_batch_size=16"])
    assert "moe.num_experts=6" in msg and "parallel.ep=4" in msg
    assert "divisor of the expert count" in msg


def test_num_experts_positive():
    msg = config_error(["moe.num_experts=0"])
    assert "moe.num_experts" in msg and ">= 1" in msg


@pytest.mark.parametrize("topk", [0, 9])
def test_topk_range(topk):
    msg = config_error([f"moe.topk={topk}"])
    assert f"moe.topk={topk}" in msg and "moe.num_experts=8" in msg


def test_tp_with_moe_needs_sequence_parallel():
    msg = config_error(["parallel.tp=2", "parallel.ep=1"])
    assert "parallel.tp=2" in msg and "set parallel.sp=true" in msg


def test_tp_with_sequence_parallel_is_fine():
    cfg = ok(["parallel.tp=2", "parallel.sp=true", "parallel.ep=1"])
    assert cfg.parallel.dp == 1 and cfg.parallel.etp == 2


def test_ep_times_etp_must_divide():
    msg = config_error(["parallel.ep=2", "parallel.etp=2"])
    assert "parallel.ep x etp = 2x2" in msg and "lower parallel.ep" in msg


def test_sequence_parallel_needs_divisible_sequence():
    msg = config_error(["parallel.tp=2", "parallel.sp=true", "parallel.ep=1",
                        "train.seq_length=127"])
    assert "train.seq_length=127" in msg and "parallel.tp=2" in msg


def test_context_parallel_needs_transformer_engine(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_engine" else real(name, *a))
    msg = config_error(["parallel.cp=2", "parallel.ep=1"])
    assert "parallel.cp=2" in msg and "set parallel.cp=1" in msg


def test_context_parallel_sequence_length(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine"
                        else real(name, *a))
    msg = config_error(["parallel.cp=2", "parallel.ep=1", "train.seq_length=130"])
    assert "train.seq_length=130" in msg and "parallel.cp" in msg


def test_num_layers_not_divisible_by_pp():
    msg = config_error(["model.num_layers=5", "parallel.pp=2", "parallel.ep=1"])
    assert "model.num_layers=5" in msg and "parallel.pp=2" in msg


def test_vpp_without_pp():
    msg = config_error(["parallel.vpp=2"])
    assert "parallel.vpp" in msg and "parallel.pp > 1" in msg and "unset vpp" in msg


def test_num_layers_not_divisible_by_pp_times_vpp():
    msg = config_error(["parallel.pp=2", "parallel.vpp=3", "parallel.ep=1"])
    assert "model.num_layers=4" in msg and "pp x vpp = 6" in msg


def test_interleaved_pipeline_micro_batches():
    msg = config_error(["parallel.pp=2", "parallel.vpp=2", "parallel.ep=1",
                        "train.global_batch_size=12"])
    assert "parallel.pp=2" in msg and "train.global_batch_size" in msg


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    msg = config_error(["train.global_batch_size=10"])
    assert "train.global_batch_size=10" in msg and "4x2" in msg and "multiple of 8" in msg


def test_micro_batch_size_positive():
    msg = config_error(["train.micro_batch_size=0"])
    assert "train.micro_batch_size" in msg and ">= 1" in msg


# --------------------------------------------------------------------------- other fields


def test_unknown_dispatcher_with_suggestion():
    msg = config_error(["moe.dispatcher=alltoal"])
    assert "moe.dispatcher='alltoal'" in msg and "did you mean 'alltoall'" in msg
    assert "allgather, alltoall or flex" in msg


def test_flex_dispatcher_without_deepep_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deep_ep" else real(name, *a))
    msg = config_error(["moe.dispatcher=flex"])
    assert msg.startswith("moe.dispatcher=flex needs DeepEP") and "alltoall" in msg


def test_shared_expert_gate_needs_a_shared_expert():
    assert config_error(["moe.shared_expert_gate=true"]).startswith(
        "moe.shared_expert_gate=true needs a shared expert")


def test_qk_norm_values():
    assert "model.qk_norm='per_head' is unknown; use none, head or full" in config_error(
        ["model.qk_norm=per_head"])


@pytest.mark.parametrize("value", ["0", "1.5", "0.3"])
def test_rotary_percent_range(value):
    """In (0, 1], rotating an even number of the 32 head dimensions (0.3 -> 9.6)."""
    assert config_error([f"model.rotary_percent={value}"]).startswith(
        f"model.rotary_percent={float(value)} must be in (0, 1]")


def test_head_dim_frees_hidden_from_heads():
    """hidden_size need not divide by num_heads when model.head_dim is set."""
    cfg = validate(load_config(TINY, ["model.hidden_size=130", "model.head_dim=32"]))
    from megasmoe.model import to_transformer_config

    assert to_transformer_config(cfg).kv_channels == 32
    assert "model.head_dim=0 must be >= 1" in config_error(["model.head_dim=0"])


def test_unknown_aux_loss_type():
    msg = config_error(["moe.aux_loss_type=balance"])
    assert "moe.aux_loss_type='balance'" in msg and "seq_aux_loss" in msg


def test_unknown_router_dtype():
    msg = config_error(["moe.router_dtype=bf16"])
    assert "moe.router_dtype" in msg and "fp32 or fp64" in msg


@pytest.mark.parametrize("value", ["[1,0,1]", "[1,2,1,0]", "0"])
def test_layer_freq(value):
    msg = config_error([f"moe.layer_freq={value}"])
    assert "moe.layer_freq" in msg


def test_unknown_lr_schedule():
    msg = config_error(["train.lr_schedule=cosin"])
    assert "train.lr_schedule='cosin'" in msg and "cosine, linear, constant or wsd" in msg


def test_min_lr_above_lr():
    msg = config_error(["train.min_lr=0.002"])
    assert "train.min_lr=0.002" in msg and "train.lr=0.001" in msg


def test_warmup_not_below_steps():
    msg = config_error(["train.warmup_steps=200"])
    assert "train.warmup_steps=200" in msg and "train.steps=200" in msg
    assert "lower train.warmup_steps" in msg
    # One step is no exception: megatron's scheduler would assert (warmup < decay steps).
    msg = config_error(["train.steps=1"])
    assert "train.warmup_steps=10 must be < train.steps=1" in msg, msg
    assert ok(["train.steps=1", "train.warmup_steps=0"]).train.steps == 1


def test_steps_positive():
    msg = config_error(["train.steps=0"])
    assert "train.steps" in msg and ">= 1" in msg


def test_unknown_precision():
    msg = config_error(["train.precision=fp16"])
    assert "train.precision='fp16'" in msg and "auto, fp32 or bf16" in msg


@pytest.mark.parametrize("override, field", [
    ("train.log_interval=0", "train.log_interval"),
    ("train.eval_interval=-1", "train.eval_interval"),
    ("checkpoint.interval=-1", "checkpoint.interval"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
])
def test_interval_ranges(override, field):
    msg = config_error([override])
    assert field in msg and ">=" in msg


def test_unknown_data_source():
    msg = config_error(["data.source=web"])
    assert "data.source='web'" in msg and "corpus, indexed or mock" in msg


def test_indexed_data_needs_prefixes():
    msg = config_error(["data.source=indexed"])
    assert "data.prefixes" in msg and ".bin/.idx" in msg


def test_bad_async_save():
    msg = config_error(["checkpoint.async_save=maybe"])
    assert "checkpoint.async_save='maybe'" in msg and "auto, true or false" in msg


# --------------------------------------------------------------------------- routers


def test_unknown_router_name_with_suggestion():
    msg = config_error(["moe.router.name=topkk"])
    assert "moe.router.name='topkk'" in msg and "did you mean 'topk'" in msg
    for name in registered_routers():
        assert name in msg


def test_unknown_router_field_with_suggestion():
    msg = config_error(["moe.router.score_functon=sigmoid"])
    assert "moe.router.score_functon" in msg and "did you mean 'moe.router.score_function'" in msg


@pytest.mark.parametrize("router", registered_routers())
def test_unknown_router_field_is_rejected_for_every_router(router):
    msg = config_error([f"moe.router.name={router}", "moe.router.no_such_field=1"])
    assert "moe.router.no_such_field" in msg


def test_router_field_of_another_router_is_rejected():
    """Fields belong to the chosen router: topk's score_function is unknown elsewhere."""
    assert "score_function" in {f.name for f in dataclasses.fields(router_entry("topk")[1])}
    others = [r for r in registered_routers()
              if "score_function" not in {f.name for f in dataclasses.fields(router_entry(r)[1])}]
    for other in others:
        msg = config_error([f"moe.router.name={other}", "moe.router.score_function=sigmoid"])
        assert "moe.router.score_function" in msg, other


def test_unknown_score_function():
    msg = config_error(["moe.router.score_function=relu"])
    assert "moe.router.score_function='relu'" in msg and "softmax or sigmoid" in msg


# --------------------------------------------------------------------------- docs


def _config_dataclasses() -> list[type]:
    return [obj for _, obj in inspect.getmembers(S, inspect.isclass)
            if dataclasses.is_dataclass(obj) and obj.__module__ == S.__name__]


def test_every_config_section_is_covered():
    names = {cls.__name__ for cls in _config_dataclasses()}
    assert {"Config", "RunConfig", "ModelConfig", "MoEConfig", "RouterSection",
            "ParallelConfig", "TrainConfig", "DataConfig", "CheckpointConfig",
            "LoggingConfig"} <= names


@pytest.mark.parametrize("cls", _config_dataclasses(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls):
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize("router", registered_routers())
def test_every_router_field_has_a_docstring(router):
    cls, config_cls = router_entry(router)
    assert (cls.__doc__ or "").strip(), f"router class of '{router}' has no docstring"
    docs = field_docs(config_cls)
    for f in dataclasses.fields(config_cls):
        assert docs.get(f.name, "").strip(), f"{router}: moe.router.{f.name} has no docstring"


def test_field_docs_reads_attribute_docstrings():
    docs = field_docs(C.TrainConfig)
    assert docs["steps"] == "Optimizer steps to train."
    assert list(docs) == [f.name for f in dataclasses.fields(C.TrainConfig)]


# --------------------------------------------------------------------------- save / load


def test_save_config_round_trips(tmp_path):
    cfg = ok(["moe.router.score_function=sigmoid", "moe.layer_freq=[1,0,1,0]",
              "data.weights=[0.5, 0.5]", "run.dir=" + str(tmp_path / "run"),
              "train.lr=0.00025", "model.norm_eps=1.0e-6", "checkpoint.async_save=false"])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert path.is_file() and not path.with_suffix(".yaml.tmp").exists()
    back = load_config(path)
    assert back == cfg
    assert validate(back) == cfg
    assert to_dict(back) == to_dict(cfg)
    assert yaml.safe_load(path.read_text())["moe"]["router"] == {"name": "topk",
                                                                "score_function": "sigmoid"}


def test_save_config_round_trips_defaults(tmp_path):
    cfg = validate(Config())
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_save_config_overwrites(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(ok(["train.warmup_steps=1", "train.steps=3"]), path)
    save_config(ok(["train.warmup_steps=1", "train.steps=4"]), path)
    assert load_config(path).train.steps == 4


# --------------------------------------------------------------------------- megatron mapping


def test_to_transformer_config_maps_key_fields():
    from megasmoe.model import to_transformer_config

    cfg = ok(["parallel.world_size=4", "parallel.tp=2", "parallel.sp=true", "parallel.ep=2",
              "moe.num_experts=6", "moe.topk=3", "moe.ffn_hidden_size=96",
              "moe.router.score_function=sigmoid", "moe.router.pre_softmax=true",
              "train.global_batch_size=8", "model.num_layers=2", "moe.dispatcher=allgather"],
             world_size=4)
    tc = to_transformer_config(cfg)
    assert tc.tensor_model_parallel_size == 2
    assert tc.pipeline_model_parallel_size == 1
    assert tc.expert_model_parallel_size == 2
    assert tc.expert_tensor_parallel_size == 2
    assert tc.sequence_parallel is True
    assert tc.num_moe_experts == 6
    assert tc.moe_router_topk == 3
    assert tc.moe_ffn_hidden_size == 96
    assert tc.num_layers == 2 and tc.hidden_size == 128 and tc.num_attention_heads == 4
    assert tc.calculate_per_token_loss is True
    assert tc.moe_router_score_function == "sigmoid"
    assert tc.moe_router_pre_softmax is True
    assert tc.moe_token_dispatcher_type == "allgather"
    assert tc.moe_aux_loss_coeff == pytest.approx(0.01)
    assert tc.gated_linear_unit is True and tc.add_bias_linear is False


def test_to_transformer_config_defaults_and_switches():
    import torch

    from megasmoe.model import to_transformer_config

    tc = to_transformer_config(ok())
    assert tc.tensor_model_parallel_size == 1 and tc.expert_model_parallel_size == 2
    assert tc.sequence_parallel is False
    assert tc.moe_router_score_function == "softmax"
    assert tc.ffn_hidden_size == 4 * 128
    assert tc.moe_shared_expert_intermediate_size is None
    if not torch.cuda.is_available():
        assert tc.params_dtype == torch.float32 and tc.bf16 is False

    tc = to_transformer_config(ok(["moe.aux_loss_type=none", "train.recompute=true",
                                   "moe.shared_expert_size=64", "train.precision=bf16"]))
    assert tc.moe_aux_loss_coeff == 0.0
    assert tc.recompute_granularity == "full"
    assert tc.moe_shared_expert_intermediate_size == 64
    assert tc.bf16 is True and tc.params_dtype == torch.bfloat16


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def no_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("args, needle", [
    (["train.stpes=5"], "train.stpes"),
    (["trian.steps=5"], "trian"),
    (["train.steps=abc"], "train.steps"),
    (["moe.router.name=topkk"], "did you mean 'topk'"),
    (["parallel.ep=3"], "parallel.ep=3"),
    (["parallel.pp=3"], "set parallel.world_size to a multiple of 3"),
    (["moe.router.name=hyper", "moe.router.reduced_dim=4"],
     "moe.router.reduced_dim is a field of router xmoe, not of moe.router.name=hyper; "
     "set moe.router.name=xmoe or drop moe.router.reduced_dim"),
    (["train.steps"], "key=value"),
])
def test_cli_check_config_error(args, needle, capsys, no_world_size):
    from megasmoe.cli import main

    assert main(["check", str(TINY), *args]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("megasmoe: config error: ") and needle in lines[0]


def test_cli_check_missing_file(capsys, no_world_size):
    from megasmoe.cli import main

    assert main(["check", "configs/no-such.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megasmoe: config error: ") and "\n" not in err


def test_cli_check_launched_world_size(capsys, monkeypatch):
    from megasmoe.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["check", str(TINY)]) == 2
    assert "4 processes" in capsys.readouterr().err


def test_cli_check_ok(capsys, no_world_size):
    from megasmoe.cli import main

    assert main(["check", str(TINY), "parallel.ep=1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: world_size=2 ") and " dp=2 " in out and " ep=1 " in out


def test_cli_overrides_without_config_file(capsys, no_world_size):
    from megasmoe.cli import main

    assert main(["world-size", "parallel.tp=2", "parallel.sp=true"]) == 0
    assert capsys.readouterr().out.strip() == "2"


def test_cli_console_script_one_line_error():
    """The installed ``megasmoe`` script: exit 2, one stderr line (no warnings leak)."""
    exe = Path(sys.executable).parent / "megasmoe"
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    proc = subprocess.run([str(exe), "check", str(TINY), "train.stpes=5"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "megasmoe: config error: unknown config key 'train.stpes'; did you mean 'train.steps'?"
    ]


def test_config_error_under_torchrun_is_printed_once(tmp_path):
    """torchrun started directly (not through launch/pretrain.sh): every rank validates
    the same config and fails alike; the one-line error is printed once, by rank 0."""
    from conftest import run_megasmoe

    proc = run_megasmoe(["pretrain", str(TINY), "train.stpes=3", f"run.dir={tmp_path / 'run'}"],
                        nproc=2, check=False, launcher="torchrun")
    lines = [ln for ln in proc.stderr.splitlines() if "megasmoe: config error: " in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("megasmoe: config error: ")
    assert "did you mean 'train.steps'" in lines[0]
    assert proc.returncode != 0
