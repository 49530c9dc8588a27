"""Config: defaults, YAML diffs with ``base:``, dotted overrides, errors, resolved-config saving."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from multieye_dist.config import (
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    load_config,
    parse_override,
    resolve_paths,
    save_resolved,
    to_dict,
)
from multieye_dist.model.concept_model import ModelConfig as ModelModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_release_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert ModelConfig is ModelModelConfig and cfg.model == ModelModelConfig()
    assert (cfg.data.batch_size, cfg.data.samples_per_epoch, cfg.data.image_size) == (
        64,
        36000,
        512,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (1e-4, 1e-3, (0.9, 0.999))
    assert (cfg.optim.warmup_epochs, cfg.optim.min_lr, cfg.train.epochs) == (5, 1e-6, 100)
    assert (cfg.loss.name, cfg.loss.variant, cfg.loss.alpha, cfg.loss.beta) == (
        "octcoda",
        "paper",
        0.6,
        0.05,
    )
    assert cfg.loss.temperature == 10.0 and cfg.teacher.train_level2 is False
    assert cfg.deepspeed.zero_stage == 1 and cfg.tracking.wandb.mode == "offline"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", ["distill", "teacher", "demo"])
def test_every_shipped_yaml_loads(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.stage == ("teacher" if name == "teacher" else "distill")
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.startswith("# "), "each shipped config starts with a one-line description"


def test_demo_is_tiny():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert (cfg.model.backbone, cfg.data.image_size, cfg.train.epochs) == ("test_resnet", 64, 6)
    assert cfg.train.precision == "fp32" and cfg.optim.warmup_epochs == 0
    assert cfg.data.samples_per_epoch * cfg.train.epochs <= 4096 and not cfg.data.augment
    assert cfg.tracking.backend == "wandb" and cfg.tracking.wandb.mode == "offline"
    assert cfg.data.num_workers == 0


def test_yaml_diff_over_a_base_file(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 3e-4\n  min_lr: 1e-5\ndata:\n  batch_size: 8\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub / "child.yaml", "base: ../base.yaml\noptim:\n  lr: 2e-4\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 2e-4  # the child wins; "2e-4" (a YAML 1.1 string) became a float
    assert cfg.optim.min_lr == 1e-5 and cfg.data.batch_size == 8  # from the base
    assert cfg.optim.weight_decay == 1e-3  # untouched default


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_overrides_of_each_type(tmp_path):
    cfg = load_config(
        write(tmp_path / "c.yaml", "optim:\n  lr: 1e-3\n"),
        [
            "optim.lr=3e-4",  # float from a YAML 1.1 string, over the file
            "optim.weight_decay=0",  # int for a float
            "data.batch_size=32",  # int
            "data.resampled=true",  # bool
            "loss.variant=official",  # choice
            "teacher.checkpoint=runs/t/teacher.safetensors",  # optional str
            "tracking.entity=null",  # None
            "optim.betas=[0.8, 0.99]",  # tuple
            "tracking.tags=[a, b]",  # list
            "tracking.wandb.mode=online",  # a nested section's field
            "deepspeed.extra.bf16.enabled=true",  # into a dict field
            "deepspeed.extra.gradient_clipping=1.0",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.batch_size == 32 and cfg.data.resampled is True
    assert cfg.loss.variant == "official"
    assert cfg.teacher.checkpoint == "runs/t/teacher.safetensors" and cfg.tracking.entity is None
    assert cfg.optim.betas == (0.8, 0.99) and cfg.tracking.tags == ["a", "b"]
    assert cfg.tracking.wandb.mode == "online" and cfg.tracking.project == "multieye-dist"
    assert cfg.deepspeed.extra == {"bf16": {"enabled": True}, "gradient_clipping": 1.0}


def test_parse_override():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], "3e-4")
    assert parse_override("data.batch_size=32") == (["data", "batch_size"], 32)
    assert parse_override("tracking.tags=[1, 2]") == (["tracking", "tags"], [1, 2])
    assert parse_override("tracking.run_name=") == (["tracking", "run_name"], None)
    assert parse_override("tracking.wandb.mode=online") == (["tracking", "wandb", "mode"], "online")
    for bad in ("optim.lr", "=3", "optim..lr=1"):
        with pytest.raises(ConfigError, match="expected section.field=value"):
            parse_override(bad)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'optim\.lr'"):
        load_config(overrides=["optim.lr"])


def test_unknown_key_in_yaml_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "bad.yaml", "# comment\noptim:\n  lr: 1e-4\n  lrr: 3e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.lrr" in msg and f"{path}:4" in msg and "did you mean optim.lr?" in msg


def test_unknown_key_in_override_suggests_the_right_section():
    with pytest.raises(ConfigError, match=r"optim\.batch_size.*did you mean data\.batch_size"):
        load_config(overrides=["optim.batch_size=32"])


def test_unknown_section(tmp_path):
    path = write(tmp_path / "bad.yaml", "optm:\n  lr: 1e-4\n")
    with pytest.raises(
        ConfigError, match=r"unknown section 'optm'.*bad\.yaml:1.*did you mean optim"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "loss.variant=foo",
            "loss.variant='foo' for loss.name=octcoda: choose one of paper, official",
        ),
        (
            "loss.name=kd",
            "loss.name='kd': choose one of concept-align, fundus-only, octcoda, teacher-ce",
        ),
        ("train.precision=fp16", "train.precision='fp16': choose one of autocast-bf16, bf16, fp32"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage=3: choose one of 0, 1, 2"),
        (
            "tracking.wandb.mode=cloud",
            "tracking.wandb.mode='cloud': choose one of offline, online, disabled",
        ),
        ("tracking.backend=tb", "tracking.backend='tb': choose one of local, wandb"),
        ('tracking.project=""', "tracking.project='': must be a non-empty name"),
        ("optim.lr=0", "optim.lr=0.0: must be > 0"),
        ("loss.temperature=-1", "loss.temperature=-1.0: must be > 0"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction=2.0: must be in [0, 1]"),
        ("optim.warmup_epochs=101", "optim.warmup_epochs=101: must be <= train.epochs=100"),
    ],
)
def test_bad_choice_or_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_bad_choice_in_direct_construction():
    with pytest.raises(ConfigError, match="loss.contrastive_scope='all'"):
        LossConfig(contrastive_scope="all")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "optim.lr: expected float, got 'abc'"),
        ("data.batch_size=3.5", "data.batch_size: expected int, got 3.5"),
        ("data.batch_size=true", "data.batch_size: expected int, got True"),
        ("data.resampled=1", "data.resampled: expected bool, got 1"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("tracking.tags=a", "tracking.tags: expected list[str], got 'a'"),
        ("deepspeed.extra=3", "deepspeed.extra: expected dict[str, Any], got 3"),
        ("optim.lr.x=1", "optim.lr (override 'optim.lr.x=1'): expected a value, not a mapping"),
    ],
)
def test_bad_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_nested_section_in_yaml_and_overrides(tmp_path):
    """A field whose type is a section (tracking.wandb) is a nested mapping in YAML, reached by
    a longer dotted override, type-checked, and errors name the file and line."""
    path = write(tmp_path / "c.yaml", "tracking:\n  project: p\n  wandb:\n    mode: online\n")
    cfg = load_config(path)
    assert (cfg.tracking.project, cfg.tracking.wandb.mode) == ("p", "online")
    assert load_config(path, ["tracking.wandb.mode=disabled"]).tracking.wandb.mode == "disabled"
    assert load_config(path, ["tracking.backend=local"]).tracking.wandb.mode == "online"

    bad = write(tmp_path / "bad.yaml", "tracking:\n  wandb:\n    mode: online\n    mdoe: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "'tracking.wandb.mdoe'" in msg and f"{bad}:4" in msg
    assert "did you mean tracking.wandb.mode?" in msg
    with pytest.raises(ConfigError, match=r"tracking\.mode.*did you mean tracking\.wandb\.mode"):
        load_config(overrides=["tracking.mode=online"])
    scalar = write(tmp_path / "scalar.yaml", "tracking:\n  wandb: online\n")
    with pytest.raises(ConfigError, match=rf"tracking\.wandb \({scalar}:2\): expected a mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match=r"tracking\.wandb\.mode \(override .*not a mapping"):
        load_config(overrides=["tracking.wandb.mode.x=1"])


def test_nested_section_type_error_names_its_source(tmp_path):
    path = write(tmp_path / "c.yaml", "tracking:\n  wandb:\n    mode: [online]\n")
    with pytest.raises(ConfigError, match=r"tracking\.wandb\.mode='?\['online'\]"):
        load_config(path)
    path = write(tmp_path / "d.yaml", "tracking:\n  tags: notalist\n")
    with pytest.raises(ConfigError, match=rf"tracking\.tags: expected list\[str\].*{path}:2"):
        load_config(path)


@pytest.mark.parametrize(
    "where, message",
    [
        (
            "yaml",
            "unknown section 'wandb' (FILE:2); it is now tracking "
            "(wandb.mode -> tracking.wandb.mode, wandb.tags -> tracking.tags)",
        ),
        ("override", "unknown section 'wandb' (override 'wandb.mode=disabled'); it is now"),
    ],
)
def test_old_section_names_where_its_keys_went(tmp_path, where, message):
    path = write(tmp_path / "old.yaml", "# old\nwandb:\n  mode: disabled\n  tags: [a]\n")
    with pytest.raises(ConfigError) as err:
        if where == "yaml":
            load_config(path)
        else:
            load_config(overrides=["wandb.mode=disabled"])
    assert message.replace("FILE", str(path)) in str(err.value)


def test_bad_type_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "data:\n  num_workers: many\n")
    with pytest.raises(
        ConfigError, match=r"data\.num_workers: expected int, got 'many'.*c\.yaml:2"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "where",
    [
        "tracking:\n  api_key: abc\n",
        "tracking:\n  wandb:\n    api_key: abc\n",
        "deepspeed:\n  extra:\n    hub_token: abc\n",
    ],
)
def test_secret_like_key_in_yaml_is_rejected(tmp_path, where):
    with pytest.raises(ConfigError, match="set them in the environment"):
        load_config(write(tmp_path / "c.yaml", where))


def test_secret_like_key_in_override_is_rejected():
    with pytest.raises(ConfigError, match=r"tracking\.password.*environment"):
        load_config(overrides=["tracking.password=hunter2"])


def test_save_resolved_round_trip_and_atomic(tmp_path):
    cfg = load_config(
        CONFIGS / "demo.yaml",
        [
            "optim.lr=3e-4",
            "optim.min_lr=1e-7",
            "tracking.tags=[x]",
            "tracking.wandb.mode=disabled",
            "deepspeed.extra.a.b=1",
        ],
    )
    run_dir = tmp_path / "run" / "0"
    path = save_resolved(cfg, run_dir)
    assert path == run_dir / "config.yaml"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # no temp file left
    assert load_config(path) == resolve_paths(cfg)  # paths absolute (tests/test_console.py)
    assert yaml.safe_load(path.read_text()) == to_dict(resolve_paths(cfg))
    save_resolved(dataclasses.replace(cfg, train=Config().train), run_dir)  # overwrite in place
    assert load_config(path).train == resolve_paths(Config()).train
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_to_dict_is_json_serialisable():
    d = to_dict(load_config(overrides=["deepspeed.extra.zero_optimization.overlap_comm=true"]))
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert d["optim"]["betas"] == [0.9, 0.999]
    assert d["tracking"]["wandb"]["mode"] == "offline"  # a nested section, as a mapping
