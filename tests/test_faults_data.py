"""Data integrity end to end (issue 16, part A): a shard read in training or evaluation yields
exactly the samples its manifest lists, or says why not; a ``.cls`` label that contradicts its
``.json`` record is a bad sample; evaluation reports how many of the listed samples it scored;
a malformed manifest is an error naming the file and the field, in ``shards verify`` and in the
loaders.

Every fault is made on a copy of the project's own shards (conftest ``shards``: 32 px, at most
20 samples per shard; fundus-dev and oct-dev are one shard of 18 each, oct-train three shards of
20, 20 and 14)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from multieye_dist.cli import main
from multieye_dist.config import DataConfig
from multieye_dist.data import schema
from multieye_dist.data.batch import DataError
from multieye_dist.data.layout import image_path, label_file
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.stream import (
    EvalStream,
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    make_loader,
)
from multieye_dist.data.tario import iter_samples, write_samples
from multieye_dist.data.verify import verify

SIZE = 32
CPU = torch.device("cpu")
TRAIN = StreamConfig.from_data(
    DataConfig(),
    samples_per_epoch=64,
    batch_size=8,
    image_size=SIZE,
    pool_size=8,
    augment=False,
    augment_on="cpu",
)


def _copy(shards: Path, tmp_path: Path, *names: str) -> Path:
    """A private copy of the shards (only `names`, when given) that a test may damage."""
    d = tmp_path / "shards"
    if not names:
        shutil.copytree(shards, d)
        return d
    d.mkdir()
    for name in names:
        shutil.copy2(shards / name, d / name)
    return d


def _keys(shard: Path) -> list[str]:
    return [s["__key__"] for s in iter_samples(shard)]


def _cut(shard: Path, keep: int, into: int = 0) -> list[str]:
    """Cut the shard's bytes where sample `keep` begins (`into` of its members further on): what
    an interrupted copy leaves. The tar reader sees a clean end there. Returns the keys of the
    complete samples left."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    of_sample = [m for m in members if m.name.split(".")[0] == keys[keep]]
    shard.write_bytes(shard.read_bytes()[: of_sample[into].offset])
    return keys[:keep]


def _rewrite(shard: Path, change: Callable[[list[dict]], None]) -> list[dict]:
    samples = list(iter_samples(shard))
    change(samples)
    with open(shard, "wb") as fh:
        write_samples(fh, samples)
    return samples


def _eval(d: Path, max_bad: float, world: int = 1, modality: str = "fundus", split: str = "dev"):
    """Every rank's evaluation stream over the split: (keys, bad, missing, bad examples)."""
    shards = ShardSet.from_manifest(d, modality, split)
    keys, bad, missing, examples = [], 0, 0, []
    for rank in range(world):
        ds = EvalStream(
            shards, SIZE, 4, rank=rank, world=world, max_bad_fraction=max_bad, augment_on="cpu"
        )
        batches = list(ds)
        keys += [k for b in batches for k in b.keys]
        if batches:
            stats = batches[-1].stats  # cumulative
            bad, missing = bad + stats.bad, missing + stats.missing
            examples += stats.bad_examples
    return keys, bad, missing, examples


# ---------------------------------------------------------------- shards that end early


def test_a_shard_cut_at_a_member_boundary_is_an_error_with_both_counts(shards, tmp_path):
    d = _copy(shards, tmp_path)
    shard = d / "fundus-dev-000000.tar"
    kept = _cut(shard, 7)
    assert _keys(shard) == kept  # the tar reader sees a clean end: nothing else would notice
    listed = "(keys fundus-dev-000000000 to fundus-dev-000000017)"
    with pytest.raises(DataError) as err:
        _eval(d, max_bad=0)
    assert str(err.value).startswith(
        f"shard {shard}: 7 of the 18 samples its manifest lists {listed} were read (truncated"
    )


def test_a_shard_cut_inside_a_sample_names_that_sample(shards, tmp_path):
    d = _copy(shards, tmp_path)
    shard = d / "fundus-dev-000000.tar"
    kept = _cut(shard, 7, into=1)  # sample 7 keeps its .cls member only
    with pytest.raises(DataError, match=r": 8 of the 18 samples .*; sample fundus-dev-000000007 "
                       r"lacks \.png \(truncated"):  # fmt: skip
        _eval(d, max_bad=0)
    keys, bad, missing, _ = _eval(d, max_bad=0.9)
    assert keys == kept and (bad, missing) == (11, 10)  # the incomplete one, and 10 missing


def test_tolerated_missing_samples_are_counted_named_and_limited(shards, tmp_path, caplog):
    d = _copy(shards, tmp_path)
    shard = d / "fundus-dev-000000.tar"
    kept = _cut(shard, 7)
    with caplog.at_level(logging.WARNING, logger="multieye_dist.data.stream"):
        keys, bad, missing, examples = _eval(d, max_bad=0.9)
    assert keys == kept and bad == missing == 11
    assert examples == [f"{shard}: 11 missing"]
    assert f"shard {shard}: 7 of the 18 samples" in caplog.text
    assert "11 missing counted as bad" in caplog.text
    with pytest.raises(DataError, match=r"11 of 18 samples could not be decoded \(or were "
                       r"mislabelled or missing; > data.max_bad_fraction=50.0%\), e.g. "
                       rf"{shard}: 11 missing"):  # fmt: skip
        _eval(d, max_bad=0.5)


def test_strided_units_count_each_missing_sample_once(shards, tmp_path):
    """Four ranks share the one fundus-dev shard (each reads every 4th sample)."""
    d = _copy(shards, tmp_path)
    kept = _cut(d / "fundus-dev-000000.tar", 7)
    keys, bad, missing, _ = _eval(d, max_bad=0.9, world=4)
    assert sorted(keys) == kept and bad == missing == 11


@pytest.mark.parametrize(
    "replacement, foreign",
    [("oct-train-000001.tar", "oct-train-000000020"), ("fundus-train-000000.tar", None)],
    ids=["same-split", "other-modality"],
)
def test_a_shard_replaced_by_another_is_an_error_and_never_read(
    shards, tmp_path, replacement, foreign
):
    """Both replacements have 20 samples, as many as the shard they replace: only the keys
    tell."""
    d = _copy(shards, tmp_path)
    victim = d / "oct-train-000000.tar"
    shutil.copy2(d / replacement, victim)
    foreign = foreign or "fundus-train-000000000"
    with pytest.raises(DataError, match=rf"{victim}: 0 of the 20 samples its manifest lists "
                       rf"\(keys oct-train-000000000 to oct-train-000000019\) were read, 20 it "
                       rf"does not list \(e.g. {foreign}\) ignored"):  # fmt: skip
        _eval(d, max_bad=0, modality="oct", split="train")
    keys, bad, missing, _ = _eval(d, max_bad=0.9, modality="oct", split="train")
    others = _keys(d / "oct-train-000001.tar") + _keys(d / "oct-train-000002.tar")
    assert Counter(keys) == Counter(others)  # nothing twice, nothing from elsewhere
    assert bad == missing == 20


def _teacher_stream(d: Path, cfg: StreamConfig) -> list:
    """The teacher stage's stream: OCT train, no partner; one rank, DataLoader in-process."""
    ds = PairedTrainStream(ShardSet.from_manifest(d, "oct", "train"), None, cfg, rank=0, world=1)
    return list(make_loader(ds, 0))


def test_training_refuses_a_truncated_shard_or_counts_it(shards, tmp_path):
    d = _copy(shards, tmp_path)
    shard = d / "oct-train-000000.tar"
    kept = _cut(shard, 5)
    with pytest.raises(DataError, match=rf"{shard}: 5 of the 20 samples its manifest lists"):
        _teacher_stream(d, replace(TRAIN, max_bad_fraction=0.0))
    with pytest.raises(DataError, match=rf"missing; > data.max_bad_fraction=1.0%.*{shard}: 15 "):
        _teacher_stream(d, TRAIN)  # the default tolerance: 15 of 54 is far beyond it
    batches = _teacher_stream(d, replace(TRAIN, max_bad_fraction=0.9))
    stats = batches[-1].stats
    assert stats.missing >= 15 and stats.missing % 15 == 0 and stats.bad == stats.missing
    used = {k for b in batches for k in b.keys if k < "oct-train-000000020"}
    assert used and used <= set(kept)


# ---------------------------------------------------------------- .cls against .json


def _relabel(samples: list[dict]) -> None:
    meta = json.loads(samples[2]["json"])
    meta["label"] = (meta["label"] + 1) % 9
    samples[2]["json"] = json.dumps(meta, sort_keys=True).encode()


def _break_json(samples: list[dict]) -> None:
    samples[2]["json"] = b'{"label": 3,'


@pytest.mark.parametrize(
    "change, why",
    [(_relabel, r"\.json label \d != \.cls \d"), (_break_json, r"\.json record does not parse")],
    ids=["json-label-differs", "json-unparsable"],
)
def test_a_sample_whose_json_contradicts_its_cls_is_a_bad_sample(shards, tmp_path, change, why):
    d = _copy(shards, tmp_path)
    shard = d / "fundus-dev-000000.tar"
    key = _rewrite(shard, change)[2]["__key__"]
    with pytest.raises(DataError, match=rf"^shard {shard}: sample {key}: {why}.*max_bad_fraction"):
        _eval(d, max_bad=0)
    keys, bad, missing, examples = _eval(d, max_bad=0.5)
    assert key not in keys and len(keys) + bad == 18
    assert (bad, missing, examples) == (1, 0, [f"{shard}:{key}"])


def test_training_skips_and_counts_a_mislabelled_sample(shards, tmp_path, caplog):
    d = _copy(shards, tmp_path)
    shard = d / "oct-train-000001.tar"
    key = _rewrite(shard, _relabel)[2]["__key__"]
    with caplog.at_level(logging.WARNING, logger="multieye_dist.data.stream"):
        batches = _teacher_stream(d, replace(TRAIN, max_bad_fraction=0.5))
    assert key not in {k for b in batches for k in b.keys}
    stats = batches[-1].stats
    assert stats.bad >= 1 and stats.missing == 0 and f"{shard}:{key}" in stats.bad_examples
    assert f"bad sample in shard {shard}, skipped: sample {key}: .json label" in caplog.text


def test_verify_reports_the_mislabelled_sample_too(shards, tmp_path):
    d = _copy(shards, tmp_path, "fundus-dev-000000.tar", "fundus-dev.manifest.json")
    key = _rewrite(d / "fundus-dev-000000.tar", _relabel)[2]["__key__"]
    problems = verify(d).problems
    assert any(f"fundus-dev-000000.tar:{key}: .json label" in p for p in problems), problems


# ---------------------------------------------------------------- keys around skipped samples


def test_keys_are_checked_around_samples_skipped_at_conversion(fresh_root, tmp_path):
    """`--skip-bad` leaves a gap in a shard's positional keys: still read without a complaint;
    a shard cut short is still found."""
    name = label_file(fresh_root, "fundus", "dev").read_text().split()[4]  # line 3's name
    image_path(fresh_root, "fundus", name).write_bytes(b"not an image" * 10)
    out = tmp_path / "out"
    opts = ConvertOptions(
        modalities=("fundus",), splits=("dev",), shard_samples=5, workers=1, skip_bad=True,
        preprocess=Preprocess(image_size=SIZE),
    )  # fmt: skip
    convert(fresh_root, out, opts, progress=False)
    manifest = json.loads((out / "fundus-dev.manifest.json").read_text())
    assert manifest["num_skipped"] == 1 and manifest["shards"][0]["samples"] == 4
    assert "fundus-dev-000000002" not in _keys(out / "fundus-dev-000000.tar")
    keys, bad, _, _ = _eval(out, max_bad=0)
    assert len(keys) == 17 and bad == 0
    _cut(out / "fundus-dev-000001.tar", 3)
    with pytest.raises(DataError, match=r"fundus-dev-000001.tar: 3 of the 5 samples"):
        _eval(out, max_bad=0)


# ---------------------------------------------------------------- evaluation's result


def _model(teacher_ckpt: Path):
    from multieye_dist.model.checkpoint import load_inference

    return load_inference(teacher_ckpt)[0]


def test_evaluation_result_carries_listed_scored_and_bad(shards, teacher_ckpt, tmp_path):
    from multieye_dist.train.evaluation import evaluate_split

    model = _model(teacher_ckpt)
    kw = dict(image_size=SIZE, batch_size=8, device=CPU)
    d = _copy(shards, tmp_path, "oct-dev-000000.tar", "oct-dev.manifest.json")
    whole = evaluate_split(model, d, "oct", "dev", num_workers=0, **kw)
    assert (whole["listed"], whole["scored"], whole["bad"], whole["n"]) == (18, 18, 0, 18)
    _cut(d / "oct-dev-000000.tar", 11)
    part = evaluate_split(model, d, "oct", "dev", num_workers=0, max_bad_fraction=0.5, **kw)
    assert (part["listed"], part["scored"], part["bad"], part["n"]) == (18, 11, 7, 11)
    with pytest.raises(DataError, match=r"7 of 18 samples .*oct-dev-000000.tar: 7 missing"):
        evaluate_split(model, d, "oct", "dev", num_workers=0, **kw)  # default: 1% tolerated


def test_evaluation_counts_what_each_loader_worker_missed(shards, teacher_ckpt, tmp_path):
    """Two DataLoader worker processes read the one shard as two strided units; their counts
    travel with their batches."""
    from multieye_dist.train.evaluation import evaluate_split

    d = _copy(shards, tmp_path, "oct-dev-000000.tar", "oct-dev.manifest.json")
    _cut(d / "oct-dev-000000.tar", 11)
    part = evaluate_split(
        _model(teacher_ckpt), d, "oct", "dev", image_size=SIZE, batch_size=4, num_workers=2,
        device=CPU, max_bad_fraction=0.5,
    )  # fmt: skip
    assert (part["listed"], part["scored"], part["bad"], part["n"]) == (18, 11, 7, 11)


def test_evaluation_refuses_a_total_its_shards_do_not_give(shards, teacher_ckpt, tmp_path):
    """A remote manifest is taken as served (multieye_dist/data/remote.py): one whose total
    exceeds its shards' is caught where the scores are counted."""
    from multieye_dist.train.evaluation import evaluate_split

    d = _copy(shards, tmp_path, "oct-dev-000000.tar", "oct-dev.manifest.json")
    path = d / "oct-dev.manifest.json"
    manifest = json.loads(path.read_text())
    manifest["num_samples"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"^oct-dev \(pipe:.*\): 18 samples scored and 0 bad, but "
                       r"its manifest lists 19; check the shards"):  # fmt: skip
        evaluate_split(
            _model(teacher_ckpt), f"pipe:cat {d}/{{name}}", "oct", "dev",
            image_size=SIZE, batch_size=8, num_workers=0, device=CPU,
        )  # fmt: skip


def test_eval_command_on_a_truncated_shard_exits_1_and_writes_nothing(
    shards, teacher_ckpt, tmp_path, capsys
):
    d = _copy(shards, tmp_path, "oct-dev-000000.tar", "oct-dev.manifest.json")
    _cut(d / "oct-dev-000000.tar", 11)
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(teacher_ckpt), "--shards", str(d), "--split", "dev"]
    assert main([*args, "--batch-size", "8", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "multieye-dist: data error: 7 of 18 samples" in err and "7 missing" in err, err
    assert not out.exists()


# ---------------------------------------------------------------- malformed manifests


def _at(m, path: str, change: Callable[[dict | list, str | int], None]):
    """`m` after `change(parent, key)` at the dotted `path` ("shards.0.samples")."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = m
    for p in parents:
        node = node[p]
    change(node, last)
    return m


def _set(path: str, value):
    return lambda m: _at(m, path, lambda node, key: node.__setitem__(key, value))


def _drop(path: str):
    return lambda m: _at(m, path, lambda node, key: node.__delitem__(key))


# id -> (the manifest's new bytes, or a function of its parsed JSON; what the message must say)
MALFORMED = {
    "not-json": (b'{"modality": "fundus", "split": ', "is not JSON"),
    "not-utf8": (b"\xff\xfe\x00garbage", "the manifest is not UTF-8 text"),
    "top-level-list": (lambda m: [m], "a JSON array, not a manifest (a JSON object)"),
    "top-level-null": (lambda m: None, "a JSON null, not a manifest (a JSON object)"),
    "no-shards": (_drop("shards"), "field 'shards' is missing"),
    "shards-not-list": (
        _set("shards", {"a": 1}),
        "field 'shards' is {'a': 1} (object), expected an array",
    ),
    "num-samples-str": (
        _set("num_samples", "18"),
        "field 'num_samples' is '18' (string), expected a non-negative integer",
    ),
    "image-ext": (
        _set("image_ext", "gif"),
        "field 'image_ext' is 'gif' (string), expected one of png, jpg, webp",
    ),
    "wrong-split": (_set("split", "test"), "field 'split' is 'test', expected 'dev'"),
    "entry-not-object": (
        _set("shards.0", "fundus-dev-000000.tar"),
        "field 'shards[0]' is a string, not an object",
    ),
    "entry-no-samples": (_drop("shards.0.samples"), "field 'shards[0].samples' is missing"),
    "entry-samples-bool": (
        _set("shards.0.samples", True),
        "field 'shards[0].samples' is True (boolean), expected a non-negative integer",
    ),
    "entry-samples-negative": (
        _set("shards.0.samples", -1),
        "field 'shards[0].samples' is -1 (integer), expected a non-negative integer",
    ),
    "entry-counts-short": (
        _set("shards.0.class_counts", [9, 9]),
        "field 'shards[0].class_counts' is [9, 9] (array), expected an array of 9",
    ),
    "entry-name-escapes": (
        _set("shards.0.name", "../fundus-dev-000000.tar"),
        "field 'shards[0].name' is '../fundus-dev-000000.tar' (string), expected a plain file name",
    ),
    "entry-sha-missing": (_drop("shards.0.sha256"), "field 'shards[0].sha256' is missing"),
    "listed-twice": (
        lambda m: {**m, "shards": m["shards"] * 2},
        "field 'shards[1].name' 'fundus-dev-000000.tar' is listed twice",
    ),
    "total-disagrees": (
        _set("num_samples", 19),
        "field 'num_samples' is 19, but the shards list 18 samples",
    ),
}


def _malformed(shards: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """The fundus-dev shard with its manifest broken one way: (manifest, expected text)."""
    d = _copy(shards, tmp_path, "fundus-dev-000000.tar", "fundus-dev.manifest.json")
    path = d / "fundus-dev.manifest.json"
    how, text = MALFORMED[kind]
    if isinstance(how, bytes):
        path.write_bytes(how)
    else:
        path.write_text(json.dumps(how(json.loads(path.read_text()))))
    return path, text


@pytest.mark.parametrize("kind", MALFORMED)
def test_verify_names_a_malformed_manifest_and_its_field(shards, tmp_path, capsys, kind):
    path, text = _malformed(shards, tmp_path, kind)
    before = path.read_bytes()
    assert main(["shards", "verify", "--shards", str(path.parent), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    problems = [line for line in out.splitlines() if line.startswith(f"PROBLEM {path}")]
    assert len(problems) == 1 and text in problems[0], out
    assert "Traceback" not in err and path.read_bytes() == before


@pytest.mark.parametrize("kind", MALFORMED)
def test_loading_a_malformed_manifest_names_the_file_and_field(shards, tmp_path, kind):
    path, text = _malformed(shards, tmp_path, kind)
    with pytest.raises(schema.ManifestError) as err:
        ShardSet.from_manifest(path.parent, "fundus", "dev")
    assert str(path) in str(err.value) and text in str(err.value)
    assert "\n" not in str(err.value)


def test_eval_command_on_a_malformed_manifest_is_a_usage_error(
    shards, teacher_ckpt, tmp_path, capsys
):
    path, text = _malformed(shards, tmp_path, "num-samples-str")
    args = ["--checkpoint", str(teacher_ckpt), "--shards", str(path.parent), "--split", "dev"]
    assert main(["eval", *args, "--modality", "fundus"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {text}" in err and "Traceback" not in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- a real training run


@pytest.mark.slow
def test_training_on_a_truncated_shard_stops_with_a_data_error(shards, tmp_path):
    """`multieye-dist train teacher` on one process (its own process group), a shard of its
    training split cut short: before this was checked it trained on 39 of the 54 samples and
    exited 0."""
    d = _copy(shards, tmp_path)
    shard = d / "oct-train-000000.tar"
    _cut(shard, 5)
    out = tmp_path / "run"
    overrides = [
        "model.backbone=test_resnet", f"data.shards={d}", "data.image_size=32",
        "data.batch_size=8", "data.samples_per_epoch=64", "data.num_workers=0",
        "data.augment=false", "train.epochs=1", f"train.out_dir={out}", "train.precision=fp32",
        "train.progress=false", "train.plots=false", "optim.warmup_epochs=0",
        "tracking.wandb.mode=disabled",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "multieye_dist.cli", "train", "teacher", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("multieye-dist: data error: ") and f"{shard}: 15 missing" in last
    assert "Traceback" not in proc.stderr
    assert not list(out.rglob("*.safetensors"))  # no model exported from a partial split
