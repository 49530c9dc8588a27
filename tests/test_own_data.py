"""A dataset of one's own: class names from the data (ImageFolder folders, a CSV's label
column, classes.txt beside MultiEYE label files), recorded in every manifest and followed by
verify, the streams, training, evaluation and the exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

from multieye_dist.cli import main
from multieye_dist.config import ConfigError, load_config
from multieye_dist.data.classes import CLASS_NAMES, ClassNamesError
from multieye_dist.data.layout import LayoutError
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.schema import ManifestError, load_manifest
from multieye_dist.data.shards import ConversionError, ConvertOptions, convert
from multieye_dist.data.stream import PairedTrainStream, ShardSet, StreamConfig
from multieye_dist.data.verify import verify
from multieye_dist.model.checkpoint import load_inference
from multieye_dist.train.setup import data_classes

CLASSES = ("drusen", "edema", "healthy")  # sorted: ImageFolder's label order


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _imagefolder(root: Path, classes=CLASSES, per_class=None) -> Path:
    """ROOT/{train,val,test}/CLASS/ of JPEG and TIFF images ("val": the dev split)."""
    per_class = per_class or {"train": 6, "val": 2, "test": 2}
    seed = 0
    for split, n in per_class.items():
        for c in classes:
            for i in range(n):
                seed += 1
                _image(root / split / c / f"{c}_{i}.{'jpg' if i % 2 else 'tif'}", seed)
    return root


def _options(**kw) -> ConvertOptions:
    base = {"workers": 1, "preprocess": Preprocess(image_size=32), "shard_samples": 8}
    return ConvertOptions(**{**base, **kw})


def _manifest(out: Path, modality: str, split: str) -> dict:
    return json.loads((out / f"{modality}-{split}.manifest.json").read_text())


def test_imagefolder_converts_with_folder_class_names_and_verifies(tmp_path):
    root = _imagefolder(tmp_path / "tree")
    out = tmp_path / "shards"
    code = main(["shards", "convert", "--root", str(root), "--out", str(out),
                 "--modality", "fundus", "--workers", "1", "--no-progress"])  # fmt: skip
    assert code == 0
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):  # val -> dev
        m = _manifest(out, "fundus", split)
        assert m["class_names"] == list(CLASSES)
        assert m["input_format"] == "imagefolder"
        assert m["class_counts"] == [n, n, n]
        assert all(len(s["class_counts"]) == 3 for s in m["shards"])
    assert verify(out).ok, verify(out).text()
    assert ShardSet.from_manifest(out, "fundus", "train").class_names == CLASSES


def test_imagefolder_needs_one_modality_and_refuses_stray_files(tmp_path, capsys):
    root = _imagefolder(tmp_path / "tree")
    out = tmp_path / "shards"
    args = ["shards", "convert", "--root", str(root), "--out", str(out), "--workers", "1"]
    assert main(args) == 2
    assert "an ImageFolder tree holds one modality; pass --modality" in capsys.readouterr().err
    stray = root / "train" / "edema" / "notes.txt"
    stray.write_text("not an image")
    assert main([*args, "--modality", "oct"]) == 2
    err = capsys.readouterr().err
    assert str(stray) in err and "not an image file" in err
    assert not list(out.glob("*.manifest.json"))  # nothing converted


def test_undecodable_image_is_named_or_recorded_with_skip_bad(tmp_path):
    root = _imagefolder(tmp_path / "tree", per_class={"train": 2})
    bad = root / "train" / "edema" / "edema_0.tif"
    bad.write_bytes(b"not a tiff")
    opts = {"modalities": ("fundus",), "splits": ("train",)}
    with pytest.raises(ConversionError, match=rf"{bad} \(edema/edema_0.tif\): "):
        convert(root, tmp_path / "out", _options(**opts), progress=False)
    assert not list((tmp_path / "out").glob("*.manifest.json"))
    convert(root, tmp_path / "out", _options(**opts, skip_bad=True), progress=False)
    m = _manifest(tmp_path / "out", "fundus", "train")
    assert m["class_counts"] == [2, 1, 2] and m["num_skipped"] == 1
    assert m["skipped"][0]["label_file"] == str(bad)


def _csv(root: Path, rows: list[str], classes_txt: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split,modality"]
    for i, (label, split) in enumerate(r.split(":") for r in rows):
        _image(root / "img" / f"{i}.png", i)
        lines.append(f"img/{i}.png,{label},{split},fundus")
    if classes_txt is not None:
        (root / "classes.txt").write_text(classes_txt)
    path = root / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "labels,classes_txt,names,counts",
    [
        (["b", "a", "c", "a"], None, ["a", "b", "c"], [2, 1, 1]),  # names: sorted
        (["2", "0", "0", "8"], None, list(CLASS_NAMES), [2, 0, 1, 0, 0, 0, 0, 0, 1]),
        (["1", "0", "x", "1"], "x\ny\n", ["x", "y"], [2, 2]),  # classes.txt: names and indices
    ],
)
def test_csv_labels_as_names_or_indices(tmp_path, labels, classes_txt, names, counts):
    path = _csv(tmp_path / "data", [f"{lab}:train" for lab in labels], classes_txt)
    convert(path, tmp_path / "out", _options(modalities=("fundus",), splits=("train",)), False)
    m = _manifest(tmp_path / "out", "fundus", "train")
    assert (m["class_names"], m["class_counts"], m["input_format"]) == (names, counts, "csv")
    assert verify(tmp_path / "out").ok


def test_csv_errors_name_the_line(tmp_path):
    path = _csv(tmp_path / "a", ["0:train", "7:train"], "x\ny\n")
    with pytest.raises(LayoutError, match=rf"{path}:3 \(img/1.png\): label '7' is neither"):
        convert(path, tmp_path / "out", _options(modalities=("fundus",), splits=("train",)))
    mixed = _csv(tmp_path / "b", ["a:train", "1:train"])
    with pytest.raises(LayoutError, match=rf"{mixed}:3: label '1' is an index but line 2"):
        convert(mixed, tmp_path / "out", _options(modalities=("fundus",), splits=("train",)))
    bad_split = _csv(tmp_path / "c", ["a:train", "a:validation"])
    with pytest.raises(LayoutError, match=rf"{bad_split}:3: split 'validation'"):
        convert(bad_split, tmp_path / "out", _options(modalities=("fundus",)))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.json"))


def test_classes_txt_beside_multieye_label_files(fresh_root, tmp_path):
    names = [f"disease {c}" for c in range(9)]
    for top in ("assemble", "assemble_oct"):
        for split in ("train", "dev", "test"):
            (fresh_root / top / split / "classes.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    convert(fresh_root, out, _options(splits=("dev",)), progress=False)
    assert _manifest(out, "fundus", "dev")["class_names"] == names
    assert ShardSet.from_manifest(out, "oct", "dev").class_names == tuple(names)
    # Fewer classes than the labels use: the label line is named.
    few = fresh_root / "assemble" / "dev" / "classes.txt"
    few.write_text("a\nb\n")
    with pytest.raises(ClassNamesError, match="class names differ: .*assemble/dev/classes.txt"):
        convert(fresh_root, tmp_path / "o2", _options(splits=("dev",)))
    for top in ("assemble", "assemble_oct"):
        for split in ("train", "dev", "test"):
            (fresh_root / top / split / "classes.txt").write_text("a\nb\n")
    with pytest.raises(LayoutError, match=r"large9cls.txt:\d+ \(.*\): label \d outside 0..1"):
        convert(fresh_root, tmp_path / "o3", _options(splits=("dev",)))


def test_old_manifest_without_class_names_reads_as_the_nine(shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    for path in old.glob("*.manifest.json"):
        m = json.loads(path.read_text())
        del m["class_names"]
        path.write_text(json.dumps(m))
    s = ShardSet.from_manifest(old, "fundus", "train")
    assert s.class_names == CLASS_NAMES and len(s.total_class_counts) == 9
    assert verify(old).ok
    # With the field, class_counts must have one entry per name.
    path = old / "fundus-dev.manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "class_names": ["a", "b", "c"]}))
    want = r"field 'class_counts' is \[.*\] \(array\), expected an array of 3 non-negative"
    with pytest.raises(ManifestError, match=want):
        load_manifest(path)


def test_fundus_and_oct_with_different_classes_are_refused(tmp_path):
    out = tmp_path / "out"
    one = {"train": 4}
    convert(_imagefolder(tmp_path / "f", CLASSES, one), out,
            _options(modalities=("fundus",), splits=("train",)), progress=False)  # fmt: skip
    convert(_imagefolder(tmp_path / "o", ("a", "b"), one), out,
            _options(modalities=("oct",), splits=("train",)), progress=False)  # fmt: skip
    fundus = ShardSet.from_manifest(out, "fundus", "train")
    oct_ = ShardSet.from_manifest(out, "oct", "train")
    cfg = StreamConfig(64, 8, 32, 0, False, 4, 0.0, False, "cpu")
    with pytest.raises(ClassNamesError, match="fundus-train.manifest.json has .*oct-train"):
        PairedTrainStream(fundus, oct_, cfg, rank=0, world=1)
    report = verify(out)
    assert not report.ok and "class_names ['a', 'b'] differ" in report.text()


def test_model_num_classes_follows_the_train_manifest(tmp_path):
    out = tmp_path / "out"
    convert(_imagefolder(tmp_path / "f", CLASSES, {"train": 4}), out,
            _options(modalities=("fundus",), splits=("train",)), progress=False)  # fmt: skip
    base = [f"data.shards={out}", "loss.name=fundus-only", "model.backbone=test_resnet"]
    cfg = load_config(None, base)
    assert cfg.model.num_classes == 9 and data_classes(cfg).model.num_classes == 3
    with pytest.raises(ConfigError, match=r"model.num_classes=5 but .*fundus-train.manifest"):
        data_classes(load_config(None, [*base, "model.num_classes=5"]))


@pytest.mark.slow
def test_imagefolder_trains_and_evaluates_with_its_three_classes(tmp_path):
    """convert -> verify -> one epoch of 2 fundus-only steps on 1 rank (it ends with the dev
    evaluation and the exports; train.stop_after_steps would stop before them) -> eval names
    the 3 classes."""
    root = _imagefolder(tmp_path / "tree", per_class={"train": 6, "val": 1, "test": 2})
    out = tmp_path / "shards"
    convert(root, out, _options(modalities=("fundus",)), False)
    assert verify(out).ok
    run = tmp_path / "run"
    over = [
        "model.backbone=test_resnet", f"data.shards={out}", "data.image_size=32",
        "data.batch_size=8", "data.samples_per_epoch=16", "data.num_workers=0",
        "data.augment=false", "train.epochs=1", "optim.warmup_epochs=0",
        f"train.out_dir={run}", "train.precision=fp32", "train.progress=false", "train.plots=false",
        "loss.name=fundus-only", "tracking.wandb.mode=disabled",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "multieye_dist.cli", "train", "distill", *over,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = run / "last.safetensors"
    model, meta = load_inference(export)
    assert model.num_classes == 3 and meta["class_names"] == list(CLASSES)
    result = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(export), "--shards", str(out),
                 "--split", "test", "--json", str(result)])  # fmt: skip
    assert code == 0
    r = json.loads(result.read_text())
    assert r["class_names"] == list(CLASSES) and r["num_classes"] == 3 and r["n"] == 6
