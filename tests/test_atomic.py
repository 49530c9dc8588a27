"""multieye_dist.core.atomic, the one file writer: umask permissions, no temporary file left behind,
the old file intact after a failed rewrite; and each kind of writer that goes through it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from multieye_dist.core import atomic
from multieye_dist.core.atomic import is_temp_name, open_atomic, temp_files, write_bytes, write_text


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _no_temp_files(root: Path) -> None:
    left = [p for p in _all_files(root) if is_temp_name(p.name)]
    assert not left, left


# ------------------------------------------------------------------------ the helper itself


def test_each_helper_writes_with_the_umask_mode_and_leaves_no_temp(tmp_path, umask):
    expected = 0o666 & ~umask
    write_text(tmp_path / "a.txt", "héllo\n")
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    with open_atomic(tmp_path / "c.bin", "wb") as fh:
        for i in range(3):
            fh.write(bytes([i]) * 1000)
    with open_atomic(tmp_path / "d.txt", "w") as fh:
        fh.write("ünï\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"".join(bytes([i]) * 1000 for i in range(3))
    assert (tmp_path / "d.txt").read_text(encoding="utf-8") == "ünï\n"
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
        n: expected for n in ("a.txt", "b.bin", "c.bin", "d.txt")
    }
    # A rewrite gets the mode of a new file too, like open(path, "w") would on a new file.
    write_text(tmp_path / "a.txt", "again")
    assert _mode(tmp_path / "a.txt") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.bin", "d.txt"]


def test_parent_directories_are_created(tmp_path):
    path = write_text(tmp_path / "x" / "y" / "z.json", "{}")
    assert path == tmp_path / "x" / "y" / "z.json" and path.read_text() == "{}"


def test_temp_name_is_hidden_from_the_project_globs(tmp_path):
    target = tmp_path / "fundus-train-000000.tar"
    with open_atomic(target, "wb") as fh:
        fh.write(b"partial")
        (tmp,) = tmp_path.iterdir()  # the write in flight
        assert tmp.name.startswith(".") and tmp.name.endswith(".tmp") and is_temp_name(tmp.name)
        assert temp_files(tmp_path) == [tmp]
        for pattern in ("*.tar", "fundus-train-*.tar", "*.json", "*.safetensors", "step*"):
            assert not list(tmp_path.glob(pattern)), pattern
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert temp_files(tmp_path) == []
    assert not is_temp_name(".hidden") and not is_temp_name("a.tmp")


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_removes_the_temp_and_keeps_the_old_file(tmp_path, exc_type):
    target = tmp_path / "data.bin"
    write_bytes(target, b"old contents")

    def chunks():
        yield b"new " * 1000
        yield b"more " * 1000
        raise exc_type("interrupted part-way")

    with pytest.raises(exc_type, match="part-way"):
        with open_atomic(target, "wb") as fh:
            for chunk in chunks():
                fh.write(chunk)
                fh.flush()  # the partial data really is in the temporary file
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_failure_of_the_rename_removes_the_temp(tmp_path, monkeypatch):
    target = tmp_path / "data.txt"
    write_text(target, "old")

    def refuse(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        write_text(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]
    assert target.read_text() == "old"


def test_bad_target_directory_names_the_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "sub" / "out.json"
    with pytest.raises(OSError, match=f"cannot write {target}"):
        write_text(target, "{}")
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'file' / 'x.json'}"):
        write_text(tmp_path / "file" / "x.json", "{}")
    with pytest.raises(ValueError, match="only 'wb' and 'w'"):
        with open_atomic(tmp_path / "y", "ab"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_file_and_directory_are_fsynced_unless_told(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    write_text(tmp_path / "a", "x")
    expected = ["file", "dir"] if hasattr(os, "O_DIRECTORY") else ["file"]
    assert synced == expected
    synced.clear()
    write_text(tmp_path / "b", "x", fsync=False)
    assert synced == []


# ------------------------------------------------------------------------ each kind of writer


def _tiny_model():
    from multieye_dist.model.concept_model import ConceptModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet")
    bank = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    return ConceptModel(cfg, bank), cfg


def test_safetensors_export_mode_and_clean(tmp_path, umask):
    from multieye_dist.model.checkpoint import export_inference, load_inference

    model, cfg = _tiny_model()
    path = tmp_path / "best.safetensors"
    export_inference(path, model, cfg, concept_sentences=list("abcd"), image_size=32)
    assert _mode(path) == 0o666 & ~umask  # safetensors' own save_file would leave 0600
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]
    assert load_inference(path)[1]["concept_sentences"] == list("abcd")


def test_concept_bank_mode_and_clean(tmp_path, umask):
    from multieye_dist.model.concepts import load_bank, save_bank

    path = tmp_path / "bank.safetensors"
    save_bank(path, torch.nn.functional.normalize(torch.randn(3, 5), dim=1), ["a", "b", "c"])
    assert _mode(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]
    assert load_bank(path)[1] == ["a", "b", "c"]


def test_shards_records_and_manifests_mode_and_clean(synth_root, tmp_path, umask):
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert

    opts = ConvertOptions(
        modalities=("oct",),
        splits=("dev",),
        shard_samples=8,
        workers=1,
        preprocess=Preprocess(image_size=24),
    )
    out = tmp_path / "shards"
    # What a killed conversion leaves: the next run removes it before writing anything.
    (out / ".progress").mkdir(parents=True)
    for stale in (
        out / ".oct-dev-000000.tar.0badc0de.tmp",
        out / ".progress" / ".x.json.12345678.tmp",
    ):
        stale.write_bytes(b"half a file")
    convert(synth_root, out, opts, progress=False)
    files = _all_files(out)
    kinds = {p.suffix for p in files}
    assert kinds == {".tar", ".json"}  # shards, progress records, the manifest
    assert any(p.name.endswith(".manifest.json") for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
    _no_temp_files(out)


def test_deepspeed_checkpoint_files_mode_clean_and_failed_save(tmp_path, umask):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from multieye_dist.train.engine import _safe_checkpoint_engine

    safe = _safe_checkpoint_engine(TorchCheckpointEngine())
    path = tmp_path / "mp_rank_00_model_states.pt"
    safe.save({"w": torch.arange(1000.0), "step": 3}, str(path))
    assert _mode(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # An object whose serialisation raises while torch.save is writing the temporary file.
    seen: list[list[Path]] = []

    class Unpicklable:
        def __reduce__(self):
            seen.append(temp_files(tmp_path))
            raise RuntimeError("serialisation failed part-way")

    with pytest.raises(RuntimeError, match="part-way"):
        safe.save({"w": torch.ones(10_000), "x": Unpicklable()}, str(path))
    assert len(seen) == 1 and len(seen[0]) == 1  # the write was in flight
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert safe.load(str(path))["step"] == 3


def test_synthetic_images_and_label_files_mode_and_clean(tmp_path, umask):
    from multieye_dist.data.synth import SynthOptions, generate

    generate(tmp_path / "raw", SynthOptions(per_class=1, image_size=32, workers=1))
    files = _all_files(tmp_path / "raw")
    # images, label files and findings sidecars, the findings' names (findings.json)
    assert {p.suffix for p in files} == {".png", ".txt", ".json"}
    assert {_mode(p) for p in files} == {0o666 & ~umask}
    _no_temp_files(tmp_path / "raw")


def test_resolved_config_mode_and_clean(tmp_path, umask):
    from multieye_dist.config import load_config, save_resolved

    path = save_resolved(load_config(), tmp_path / "run")
    assert _mode(path) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_eval_json_mode_and_clean(synth_root, tmp_path):
    from multieye_dist.cli import main
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert
    from multieye_dist.model.checkpoint import export_inference

    shards = tmp_path / "shards"
    opts = ConvertOptions(
        modalities=("oct",), splits=("test",), workers=1, preprocess=Preprocess(image_size=32)
    )
    convert(synth_root, shards, opts, progress=False)
    model, cfg = _tiny_model()
    ckpt = tmp_path / "m.safetensors"
    export_inference(ckpt, model, cfg, concept_sentences=list("abcd"), image_size=32)
    out = tmp_path / "eval" / "deep" / "test.json"
    old = os.umask(0o027)
    try:
        argv = ["eval", "--checkpoint", str(ckpt), "--shards", str(shards), "--modality", "oct"]
        assert main([*argv, "--json", str(out)]) == 0
    finally:
        os.umask(old)
    assert _mode(out) == 0o640
    assert [p.name for p in out.parent.iterdir()] == ["test.json"]
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["modality"] == "oct"
