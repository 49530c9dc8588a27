"""Installed anywhere: package data (configs, sweeps, banks, sentences) found through
importlib.resources, ``--config NAME|PATH``, ``config show`` and its help from the config's
comments, and a built wheel that runs the demo from another directory."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from multieye_dist.cli import main
from multieye_dist.config import ConfigError, load_config, to_dict
from multieye_dist.confighelp import describe, field_help, render, type_name
from multieye_dist.core import resources
from multieye_dist.core.resources import find_config, find_packaged, packaged, user_path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs"
PACKAGE_DATA = (
    "configs/demo.yaml",
    "configs/teacher.yaml",
    "configs/distill.yaml",
    "configs/sweeps/distill.yaml",
    "configs/concepts/minilm-l6.safetensors",
    "configs/concepts/synth-findings-minilm.safetensors",
    "configs/concepts/synth-paraphrases-minilm.safetensors",
    "configs/multieye_concepts.txt",
)


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and k != "extra" and k != "lr_scale":  # dict fields are leaves
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


# ----------------------------------------------------------------------------- package data


def test_packaged_finds_the_shipped_files():
    for rel in PACKAGE_DATA:
        assert packaged(rel) == SHIPPED / rel.removeprefix("configs/"), rel
    assert find_packaged("configs/nothing.yaml") is None
    assert find_packaged("../pyproject.toml") is None  # never outside the package
    assert find_packaged("/etc/passwd") is None
    with pytest.raises(FileNotFoundError, match=r"configs/x\.yaml: not in the"):
        packaged("configs/x.yaml")
    assert resources.config_names() == ["demo", "distill", "teacher"]


def test_relative_paths_resolve_from_the_working_directory_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bank = "configs/concepts/minilm-l6.safetensors"
    assert user_path(bank) == SHIPPED / "concepts" / "minilm-l6.safetensors"
    (tmp_path / "configs" / "concepts").mkdir(parents=True)
    (tmp_path / bank).write_bytes(b"mine")
    assert user_path(bank) == Path(bank)  # the user's own file wins
    assert user_path("runs/none") == Path("runs/none")  # neither: unchanged, for the error
    assert user_path(str(tmp_path / "abs")) == tmp_path / "abs"


# ----------------------------------------------------------------------------- --config


def test_config_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = SHIPPED / "demo.yaml"
    assert find_config("demo") == find_config("demo.yaml") == demo
    assert find_config("configs/demo.yaml") == demo  # the path of a checkout's old layout
    assert load_config("teacher").train.stage == "teacher"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("train:\n  epochs: 7\n")
    (tmp_path / "distill").write_text("train:\n  epochs: 6\n")
    assert load_config("configs/demo.yaml").train.epochs == 7  # working directory first
    assert load_config("distill").train.epochs == 6  # a file of that name wins over the name
    assert load_config(tmp_path / "distill").train.epochs == 6


@pytest.mark.parametrize(
    "spec,message",
    [
        ("distil", r"config distil: no packaged config of that name \(packaged configs: demo, "
         r"distill, teacher; or give a YAML path\); did you mean distill\?"),
        ("configs/techer.yaml", r"config configs/techer.yaml: no such file .*did you mean teacher"),
        ("/nonexistent/x.yaml", r"config /nonexistent/x.yaml: no such file \(packaged configs"),
        ("qqqq", r"packaged configs: demo, distill, teacher; or give a YAML path\)$"),
    ],
)  # fmt: skip
def test_unknown_config_lists_the_names_and_suggests_the_closest(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_config(spec)


def test_config_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=rf"config {tmp_path}: a directory, not a YAML file"):
        find_config(tmp_path)


def test_cli_refuses_an_unknown_config_in_one_line(capsys, tmp_path):
    for argv in (["config", "show", "--config", "dmeo"], ["train", "teacher", "--config", "dmeo"]):
        assert main([*argv, f"train.out_dir={tmp_path / 'run'}"]) == 2
        assert capsys.readouterr().err == (
            "multieye-dist: error: config dmeo: no packaged config of that name (packaged "
            "configs: demo, distill, teacher; or give a YAML path); did you mean demo?\n"
        )
    assert not (tmp_path / "run").exists()


def _script(name: str, monkeypatch):
    """launch/<name>.py as a module (a script: launched, it runs as __main__)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_launchers_take_a_config_name(capsys, monkeypatch, tmp_path):
    """launch/submit.py and launch/sweep.py: --config NAME|PATH, checked by argparse."""
    sweep, submit = _script("sweep", monkeypatch), _script("submit", monkeypatch)
    monkeypatch.chdir(tmp_path)  # not the checkout, whose configs/ the working directory would find
    args = sweep.parse_args(["--sweep", "configs/sweeps/distill.yaml"])
    assert (args.config, args.sweep) == (SHIPPED / "distill.yaml", SHIPPED / "sweeps/distill.yaml")
    with pytest.raises(SystemExit) as exc:
        submit.parse_args(["--config", "techer"])
    assert exc.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            ": error: argument --config: config techer: no packaged config of that name "
            "(packaged configs: demo, distill, teacher; or give a YAML path); did you mean teacher?"
        )
    )


def test_a_users_config_may_diff_over_a_packaged_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: distill\noptim:\n  lr: 2e-4\n")
    cfg = load_config(mine)
    assert (cfg.loss.name, cfg.loss.alpha, cfg.train.out_dir) == ("octcoda", 0.6, "runs/distill")
    assert cfg.optim.lr == 2e-4
    (tmp_path / "distill").write_text("train:\n  epochs: 6\n")  # next to mine.yaml: that one
    assert (load_config(mine).train.epochs, load_config(mine).train.out_dir) == (6, "runs/default")
    mine.write_text("optim:\n  lr: 2e-4\nbase: distil\n")
    with pytest.raises(ConfigError) as exc:
        load_config(mine)
    assert str(exc.value) == (
        f"base: distil ({mine}:3): no such file next to it, and no packaged config of that name "
        "(packaged configs: demo, distill, teacher); did you mean distill?"
    )


# ----------------------------------------------------------------------------- config show

FIELDS_SOURCE = '''
from dataclasses import dataclass, field
from typing import ClassVar, Literal


@dataclass(frozen=True)
class Sample:
    """A section. ``documented`` is described here. Nothing else."""

    _key: ClassVar[str] = "sample"  # a ClassVar comment, not a field
    trailing: int = 1  # the trailing comment. A second sentence.
    # A block above, on two lines,
    # joined (e.g. like this). Then more.
    above: str = "x"
    spread: list[str] = field(
        default_factory=list
    )  # the comment on the last line
    documented: float = 0.5

    bare: bool = True
    # ``both``: the trailing one wins
    both: Literal["a", "b"] = "a"  # trailing, with :mod:`markup` gone
'''


def test_field_help_comes_from_the_source_comments(tmp_path, monkeypatch):
    path = tmp_path / "sample_fields.py"
    path.write_text(FIELDS_SOURCE)
    spec = importlib.util.spec_from_file_location("sample_fields", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sample_fields", module)
    spec.loader.exec_module(module)
    assert field_help(module.Sample) == {
        "trailing": "the trailing comment.",
        "above": "A block above, on two lines, joined (e.g. like this).",
        "spread": "the comment on the last line",
        "documented": "documented is described here.",
        "bare": "",
        "both": "trailing, with markup gone",
    }
    assert type_name(module.Sample.__annotations__["both"]) == "a|b"


def test_type_names():
    from typing import Any, Literal

    assert type_name(int) == "int" and type_name(str | None) == "str | None"
    assert type_name(Literal["auto", "cpu"]) == "auto|cpu"
    assert type_name(dict[str, Any]) == "dict[str, Any]"
    assert type_name(tuple[float, float]) == "tuple[float, float]"


def test_config_show_prints_every_key_with_type_value_default_and_help(capsys):
    assert main(["config", "show", "--config", "demo", "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# config: {SHIPPED / 'demo.yaml'}; overrides: optim.lr=3e-4"
    assert out[1].split() == ["KEY", "TYPE", "VALUE"]
    rows = {line.split()[0]: line for line in out[2:]}
    cfg = load_config("demo", ["optim.lr=3e-4"])
    assert sorted(rows) == sorted(_leaf_keys(to_dict(cfg)))  # every key, once
    assert len(out) == len(rows) + 2
    assert rows["data.batch_size"].split() == ["data.batch_size", "int", "16", "(default", "64)",
                                               "#", "per", "rank"]  # fmt: skip
    assert rows["optim.lr"].split()[:5] == ["optim.lr", "float", "0.0003", "(default", "0.0001)"]
    assert rows["data.pool_size"].split("#")[0].split() == ["data.pool_size", "int", "32"]
    # one line: the first sentence of a multi-line comment block
    assert rows["model.weights"].endswith(
        "# Local file: .safetensors, or a torch .pt/.pth state dict (read with weights_only=True)."
    )
    assert rows["train.stage"].split()[1:3] == ["distill|teacher|align", "distill"]
    assert "tracking.wandb.mode" in rows and "tracking.wandb" not in rows
    lr_scale = r'^optim\.lr_scale +dict\[str, float\] +\{"classifier": 30\} +\(default \{\}\) +# '
    assert re.match(lr_scale, rows["optim.lr_scale"]), rows["optim.lr_scale"]


def test_config_show_defaults_and_the_help_source():
    rows = describe(load_config())
    assert all(r.value == r.default for r in rows)
    assert "(default 64)" not in render(rows)  # shown only where the value differs
    by_key = {r.key: r for r in rows}
    assert by_key["concepts.bank"].value == "configs/concepts/minilm-l6.safetensors"
    assert by_key["concepts.bank"].help == "concept bank (concepts.save_bank)"
    # the comments beside the fields are the one source: edit one and the help follows
    source = (ROOT / "multieye_dist" / "data" / "config.py").read_text()
    assert "max_bad_fraction: float = 0.01  # corrupt samples tolerated before the run stops" in (
        source
    )
    assert by_key["data.max_bad_fraction"].help == "corrupt samples tolerated before the run stops"
    documented = [r.key for r in rows if r.help]
    assert len(documented) >= len(rows) // 2, documented


# ----------------------------------------------------------------------------- the wheel


def _copy_sources(dest: Path) -> Path:
    """What the wheel is built from, outside the shared checkout (pip writes build/ and
    *.egg-info next to pyproject.toml)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("multieye_dist", "configs"):  # configs/: the wheel's multieye_dist/configs
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args, "--no-index"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_wheel_installed_elsewhere_trains_and_shows_its_config(tmp_path):
    """Build the wheel, install it with --target, and run it from another directory with only
    the target and the venv's site-packages on the path (-S: no .pth, so not the editable
    install of this checkout)."""
    src = _copy_sources(tmp_path / "src")
    _pip("wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "wheel"))
    (wheel,) = (tmp_path / "wheel").glob("multieye_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in PACKAGE_DATA:
        assert f"multieye_dist/{rel}" in names, rel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(target), str(wheel))
    assert (target / "bin" / "multieye-dist").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    cli = [sys.executable, "-S", "-m", "multieye_dist.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*cli, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    shown = run("config", "show", "--config", "demo", "train.epochs=1").stdout
    shipped = target / "multieye_dist" / "configs" / "demo.yaml"
    assert shown.splitlines()[0] == f"# config: {shipped}; overrides: train.epochs=1"
    assert "# per rank" in shown and "(default 100)" in shown

    # The user's path from the installed wheel: data -> shards -> a training that reads the
    # packaged config and concept bank (the demo itself runs from the checkout in
    # tests/test_cli.py; here one stage is enough to show the package data is found).
    raw, shards, out = tmp_path / "raw", tmp_path / "shards", tmp_path / "align"
    run("synth", "--out", str(raw), "--per-class", "2", "--fundus-per-class", "2",
        "--image-size", "32", "--workers", "1")  # fmt: skip
    run("shards", "convert", "--root", str(raw), "--out", str(shards),
        "--image-size", "32", "--workers", "1", "--no-progress")  # fmt: skip
    run(
        "train", "align", "--config", "demo", f"data.shards={shards}", f"train.out_dir={out}",
        "align.modality=oct", "model.backbone=test_resnet", "tracking.backend=local",
        "data.image_size=32", "data.samples_per_epoch=16", "data.batch_size=8",
        "data.num_workers=0", "train.epochs=1", "train.progress=false", "train.plots=false",
    )  # fmt: skip
    assert (out / "best.safetensors").is_file()
    # the run's bank is the installed package's (config.yaml records absolute paths)
    bank = target / "multieye_dist" / "configs" / "concepts" / "synth-findings-minilm.safetensors"
    assert f"bank: {bank}" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing in the working directory


def test_pyproject_lists_every_package_of_the_library():
    # pyproject.toml lists the packages (the configs folder is mapped into the wheel, which
    # automatic discovery cannot express): a new subpackage missing there would be left out of
    # the wheel and fail only from an installed copy.
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "multieye_dist").rglob("__init__.py")
    }
    data = {"multieye_dist.configs"} | {
        f"multieye_dist.configs.{d.name}" for d in SHIPPED.iterdir() if d.is_dir()
    }
    assert set(meta["packages"]) == folders | data
    assert meta["package-dir"] == {"multieye_dist.configs": "configs"}
