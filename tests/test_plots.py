"""Pictures (multieye_dist.track.plots): every PNG decodes at its exact pixel size; the inputs they
are drawn from are checked before anything is written; a plotting failure at the end of a training
is a warning, never a failed run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import spawn_single, tiny_overrides
from PIL import Image

from multieye_dist.cli import main
from multieye_dist.data.classes import CLASS_NAMES
from multieye_dist.data.layout import read_layout
from multieye_dist.track import plots, records

C = len(CLASS_NAMES)


def _png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The decoded picture (it must be a complete PNG of `size`), as an RGB array."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size, f"{path.name}: {img.size} != {size}"
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10, f"{path.name} is blank"
    return pixels


def _metrics(run: Path, steps: int = 12) -> None:
    """A tiny metrics.jsonl as the tracker writes it: train terms every step, dev every 4,
    and steps 5-6 logged twice (a resumed run replays them; the later line counts)."""
    lines = []
    for step in [*range(1, 7), 5, 6, *range(7, steps + 1)]:
        loss = 2.0 * math.exp(-step / 6) + (1.0 if len(lines) < 6 and step in (5, 6) else 0.3)
        rec = {"step": step, "time": 0.0, "train/loss": loss, "train/ce": loss - 0.1,
               "train/distill": 0.1, "train/lr": 1e-3 / step, "train/epoch": step / 4}  # fmt: skip
        lines.append(json.dumps(rec))
        if step % 4 == 0:
            dev = {"dev/f1": 0.2 + step / 40, "dev/accuracy": 0.3 + step / 40, "dev/f1/normal": 1}
            lines.append(json.dumps({"step": step, "time": 0.0, **dev}))
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _records(n_per_class: int = 4, absent: int | None = None, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = [c for c in range(C) if c != absent for _ in range(n_per_class)]
    out = []
    for i, y in enumerate(labels):
        logits = rng.normal(size=C)
        logits[y] += 1.5
        p = np.exp(logits) / np.exp(logits).sum()
        out.append({"key": f"fundus-test-{i:09d}", "label": y, "probs": p.tolist()})
    return out


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _metrics(run)
    records.write_records(  # class 2 absent: its curves are missing, its legend entry is not
        run / "eval" / f"test_last{records.RECORDS_SUFFIX}",
        _records(absent=2),
        split="test",
        modality="fundus",
        class_names=CLASS_NAMES,
    )
    return run


# ----------------------------------------------------------------------------- the library


def test_the_library_imports_without_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # an import of it would now fail
        "import multieye_dist.track.plots, multieye_dist.cli, multieye_dist.track.tracking\n"
        "from multieye_dist.cli import build_parser; build_parser()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_replayed_step_keeps_its_later_value(tmp_path):
    from multieye_dist.track.records import read_metrics

    _metrics(tmp_path / "run")
    series = plots.metric_series(read_metrics(tmp_path / "run"))
    steps, loss = series["train/loss"]
    assert steps.tolist() == list(range(1, 13))
    assert loss[4] == pytest.approx(2.0 * math.exp(-5 / 6) + 0.3)  # not the first line's +1.0
    assert series["dev/f1"][0].tolist() == [4, 8, 12]


# ----------------------------------------------------------------------------- a run


def test_plots_command_draws_curves_confusion_and_roc_pr(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["plots", str(run)]) == 0
    listed = capsys.readouterr().out.split()
    names = ["curves", "confusion_test_last", "roc_pr_test_last"]
    assert listed == [str(run / "plots" / f"{n}.png") for n in names]
    _png(run / "plots" / "curves.png", plots.CURVES_PX)
    cm = _png(run / "plots" / "confusion_test_last.png", plots.CONFUSION_PX)
    assert (cm[..., 2].astype(int) - cm[..., 0] > 60).any()  # the blue cells are there
    _png(run / "plots" / "roc_pr_test_last.png", plots.ROC_PR_PX)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{n}.png" for n in names)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda doc: doc["records"][3].update(probs=[0.5, 0.5]),
         r"test_last\.records\.json: records\[3\]\.probs: 2 values, 9 classes"),
        (lambda doc: doc["records"][1].update(label=9), r"records\[1\]\.label: 9 is not a class"),
        (lambda doc: doc.pop("class_names"), r"key 'class_names' missing"),
        (lambda doc: doc["records"][0]["probs"].__setitem__(0, float("nan")), "not all finite"),
    ],
)  # fmt: skip
def test_bad_records_are_named_and_nothing_is_drawn(tmp_path, capsys, damage, message):
    run = _run_dir(tmp_path)
    path = run / "eval" / f"test_last{records.RECORDS_SUFFIX}"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    assert main(["plots", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    assert __import__("re").search(message, err), err
    assert not (run / "plots").exists()  # checked before the first picture


def test_a_corrupt_metrics_line_is_named_with_its_line(tmp_path, capsys):
    run = _run_dir(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = '{"step": 3, "train/loss": 1.'
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["plots", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}:3: not a metrics record" in capsys.readouterr().err
    assert not (run / "plots").exists()


def test_a_directory_with_nothing_to_draw_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plots", str(tmp_path / "empty")]) == 2
    assert "nothing to draw" in capsys.readouterr().err
    assert main(["plots", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.png"))


def test_a_plotting_failure_after_training_is_a_warning(tmp_path, monkeypatch, caplog):
    run = _run_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert plots.plot_run_safely(run) == []
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "pictures not drawn (ModuleNotFoundError" in warning.getMessage()
    assert f"multieye-dist plots {run}" in warning.getMessage()
    assert not (run / "plots").exists()


def test_evaluate_split_keeps_the_records_the_metrics_came_from(shards, teacher_ckpt, tmp_path):
    import torch

    from multieye_dist.model.checkpoint import load_inference
    from multieye_dist.track.metrics import evaluate
    from multieye_dist.train.evaluation import evaluate_split

    model, _ = load_inference(teacher_ckpt)
    path = tmp_path / "eval" / f"dev_last{records.RECORDS_SUFFIX}"
    kw = dict(image_size=32, batch_size=8, num_workers=0, device=torch.device("cpu"))
    result = evaluate_split(model, shards, "oct", "dev", records_path=path, **kw)
    rec = records.read_records(path)
    assert (rec.split, rec.modality, rec.class_names) == ("dev", "oct", list(CLASS_NAMES))
    assert len(rec.keys) == len(set(rec.keys)) == result["listed"]
    again = evaluate(rec.labels, rec.probs, rec.class_names)
    assert again["confusion_matrix"] == result["confusion_matrix"]
    assert again["auc"] == pytest.approx(result["auc"])


# ----------------------------------------------------------------------------- explain, preview


def _fundus_images(root: Path, n: int) -> list[Path]:
    samples = read_layout(root, ("fundus",), ("test",))[("fundus", "test")][0]
    return [s.path for s in samples[:n]]


def test_explain_plot_draws_each_image_beside_its_concepts(teacher_ckpt, synth_root, tmp_path,
                                                           capsys):  # fmt: skip
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    [image] = _fundus_images(synth_root, 1)
    args = ["explain", "--checkpoint", str(teacher_ckpt), "--topk", "3"]
    assert main([*args, str(image), "--plot", str(one)]) == 0
    assert f"picture: {one}" in capsys.readouterr().out
    pixels = _png(one, plots.explanation_px(1, 3))
    blue = (np.abs(pixels.astype(int) - [0x1F, 0x77, 0xB4]).sum(-1) < 30).sum()
    orange = (np.abs(pixels.astype(int) - [0xE8, 0x71, 0x0A]).sum(-1) < 30).sum()
    assert blue + orange > 500  # the bars are drawn
    assert (
        main([*args, *map(str, _fundus_images(synth_root, 2)), "--json", "--plot", str(two)]) == 0
    )
    assert len(json.loads(capsys.readouterr().out)) == 2  # stdout stays one JSON document
    _png(two, plots.explanation_px(2, 3))
    assert plots.explanation_px(2, 3) == (1500, 1040)


def test_explain_plot_must_be_a_png_name(teacher_ckpt, synth_root, tmp_path, capsys):
    [image] = _fundus_images(synth_root, 1)
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--checkpoint", str(teacher_ckpt), str(image), "--plot", "x.jpg"])
    assert exc.value.code == 2
    assert "--plot: 'x.jpg': pictures are PNG" in capsys.readouterr().err


@pytest.mark.parametrize("split, per_class", [("train", 3), ("dev", 4)])
def test_shards_preview_draws_a_grid_per_class(shards, tmp_path, capsys, split, per_class):
    out = tmp_path / "preview.png"
    args = ["shards", "preview", str(shards), "--modality", "fundus", "--split", split]
    assert main([*args, "--per-class", str(per_class), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    pixels = _png(out, plots.preview_px(per_class))
    w, _ = plots.preview_px(per_class)
    cell = plots.PREVIEW_CELL_PX
    # Dev has 2 per class: the first cells of a row hold images, the cells past 2 stay white.
    top = 60 + 4  # the first class row
    first = pixels[top : top + 100, 240 + 10 : 240 + 100]
    assert first.std() > 5
    last = pixels[top : top + 100, 240 + (per_class - 1) * cell + 10 : w - 30]
    assert (last.std() > 5) == (split == "train")


def test_a_picture_that_cannot_be_written_is_named_and_leaves_nothing(shards, tmp_path, capsys):
    from multieye_dist.core.atomic import temp_files

    (tmp_path / "file").write_text("a file, not a directory")
    out = tmp_path / "file" / "preview.png"
    args = ["shards", "preview", str(shards), "--modality", "oct", "--split", "dev"]
    assert main([*args, "--per-class", "1", "--out", str(out)]) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "file") in err, err
    assert not temp_files(tmp_path) and (tmp_path / "file").read_text().startswith("a file")


def test_shards_preview_names_the_missing_manifest(tmp_path, capsys):
    out = tmp_path / "p.png"
    args = ["shards", "preview", str(tmp_path), "--modality", "oct", "--split", "dev"]
    assert main([*args, "--out", str(out)]) == 2
    assert f"no manifest {tmp_path / 'oct-dev.manifest.json'}" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- training


def _train_teacher(rank: int, world: int, overrides: list[str]) -> None:
    from multieye_dist.config import load_config
    from multieye_dist.train.loop import run

    run(load_config(None, overrides))


@pytest.mark.slow
def test_a_finished_training_leaves_its_records_and_pictures(shards, tmp_path):

    out = tmp_path / "teacher"
    overrides = tiny_overrides(
        shards, out, "train.stage=teacher", "data.samples_per_epoch=16", "train.plots=true"
    )
    spawn_single(_train_teacher, overrides)
    for name in ("dev_last", "test_best", "test_last"):
        rec = records.read_records(out / "eval" / f"{name}{records.RECORDS_SUFFIX}")
        assert rec.modality == "oct" and rec.split == name.split("_")[0]
        _png(out / "plots" / f"confusion_{name}.png", plots.CONFUSION_PX)
        _png(out / "plots" / f"roc_pr_{name}.png", plots.ROC_PR_PX)
    _png(out / "plots" / "curves.png", plots.CURVES_PX)
