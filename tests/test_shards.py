"""Conversion: exactly-once, determinism, resume after a kill, bad input, verify."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from multieye_dist.cli import main
from multieye_dist.core.atomic import is_temp_name
from multieye_dist.data.layout import (
    FINDINGS_FILE,
    SPLITS,
    LayoutError,
    attach_findings,
    findings_file,
    image_path,
    label_file,
    read_layout,
)
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import (
    PROGRESS_DIR,
    ConversionError,
    ConvertOptions,
    convert,
    sha256_file,
)
from multieye_dist.data.verify import verify

SIZE = 40
OPTS = ConvertOptions(shard_samples=7, workers=2, preprocess=Preprocess(image_size=SIZE))


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _read_group(out: Path, modality: str, split: str) -> list[dict]:
    manifest = json.loads((out / f"{modality}-{split}.manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _assert_nothing_half_written(out: Path) -> None:
    """No manifest, no temporary file, and every shard present is complete and recorded."""
    if not out.exists():
        return
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if n.endswith(".manifest.json")], names
    assert not [n for n in names if is_temp_name(n)], names
    for tar in out.glob("*.tar"):
        record = json.loads((out / PROGRESS_DIR / f"{tar.name}.json").read_text())
        assert record["sha256"] == sha256_file(tar)


def test_every_sample_exactly_once(synth_root, tmp_path):
    out = tmp_path / "shards"
    summary = convert(synth_root, out, OPTS, progress=False)
    assert summary.written == len(list(out.glob("*.tar"))) and summary.kept == 0
    layout = read_layout(synth_root, ("fundus", "oct"), SPLITS)
    for (modality, split), (samples, _) in layout.items():
        got = _read_group(out, modality, split)
        names = [json.loads(s["json"])["name"] for s in got]
        assert Counter(names) == Counter(s.name for s in samples)  # each exactly once
        expected = {s.name: s.label for s in samples}
        sidecar = dict(
            line.split()
            for line in findings_file(synth_root, modality, split).read_text().split("\n")
            if line
        )
        for s in got:
            meta = json.loads(s["json"])
            assert int(s["cls"]) == meta["label"] == expected[meta["name"]]
            assert meta["modality"] == modality and meta["split"] == split
            # The sidecar's findings travel into the record, sorted ("-": none).
            want = sidecar[meta["name"]]
            assert meta["findings"] == ([] if want == "-" else [int(i) for i in want.split(",")])
            with Image.open(io.BytesIO(s["png"])) as img:
                assert img.size == (SIZE, SIZE)
        manifest = json.loads((out / f"{modality}-{split}.manifest.json").read_text())
        assert manifest["num_samples"] == len(samples)
        assert sum(manifest["class_counts"]) == len(samples)
        assert all(sha256_file(out / s["name"]) == s["sha256"] for s in manifest["shards"])
    assert verify(out, workers=2).ok


def test_oct_is_zero_padded_to_square(synth_root, tmp_path):
    out = tmp_path / "shards"
    opts = replace(OPTS, modalities=("oct",), splits=("dev",))
    convert(synth_root, out, opts, progress=False)
    sample = _read_group(out, "oct", "dev")[0]
    with Image.open(io.BytesIO(sample["png"])) as img:
        px = img.load()
        assert img.size == (SIZE, SIZE) and img.mode == "L"
        assert all(px[x, 0] == 0 for x in range(SIZE))  # padding rows above the B-scan
    assert (
        json.loads(sample["json"])["original_size"][0]
        > json.loads(sample["json"])["original_size"][1]
    )


def test_rerun_is_byte_identical_and_keeps_shards(synth_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert(synth_root, a, replace(OPTS, workers=1), progress=False)
    convert(synth_root, b, replace(OPTS, workers=2), progress=False)
    assert _files(a) == _files(b)  # worker count does not change a byte
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.glob("*.tar")}
    again = convert(synth_root, a, OPTS, progress=False)
    assert again.written == 0 and again.kept == len(mtimes)
    assert {p.name: p.stat().st_mtime_ns for p in a.glob("*.tar")} == mtimes
    assert _files(a) == _files(b)


def test_damaged_shard_is_redone_and_options_change_everything(synth_root, tmp_path):
    out = tmp_path / "s"
    convert(synth_root, out, OPTS, progress=False)
    reference = _files(out)
    victim = sorted(out.glob("fundus-train-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated by a crash or a bad copy
    rerun = convert(synth_root, out, OPTS, progress=False)
    assert rerun.written == 1
    assert _files(out) == reference
    changed = convert(synth_root, out, replace(OPTS, shard_samples=20), progress=False)
    assert changed.kept == 0
    assert verify(out).ok  # shards of the old plan beyond the new ones are gone


def test_killed_run_resumes_to_the_same_result(synth_root, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    convert(synth_root, clean, OPTS, progress=False)
    cmd = [
        sys.executable,
        "-m",
        "multieye_dist.cli",
        "shards",
        "convert",
        "--root",
        str(synth_root),
        "--out",
        str(killed),
        "--shard-samples",
        "2",
        "--workers",
        "1",
        "--image-size",
        str(SIZE),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while len(list((killed / PROGRESS_DIR).glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "conversion finished before it could be killed"
    assert not list(killed.glob("*.manifest.json"))
    # Same plan as the killed run, then the clean run's plan: both must end complete.
    first = convert(synth_root, killed, replace(OPTS, shard_samples=2), progress=False)
    assert first.kept >= 3
    convert(synth_root, killed, OPTS, progress=False)
    assert _files(killed) == _files(clean)


def _convert_cli(root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "shards",
            "convert",
            "--root",
            str(root),
            "--out",
            str(out),
            "--shard-samples",
            "7",
            "--workers",
            "2",
            "--image-size",
            str(SIZE),
            "--no-progress",
            *extra,
        ]
    )


def _edit_label_line(root: Path, modality: str, split: str, lineno: int, text: str | None):
    """Replace (or delete) one label-file line. The findings sidecar follows the label file:
    a name the edit removes from it loses its sidecar line too (a sidecar out of step with its
    label file is a different error, tested on its own)."""
    path = label_file(root, modality, split)
    lines = path.read_text().splitlines()
    old = lines[lineno - 1].split()[0]
    if text is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")
    side = findings_file(root, modality, split)
    if side.is_file() and old not in {ln.split()[0] for ln in lines if ln.split()}:
        kept = [ln for ln in side.read_text().splitlines() if ln.split()[0] != old]
        side.write_text("\n".join(kept) + "\n")
    return path


def _first_line(root: Path, modality: str, split: str, n: int = 1) -> tuple[str, int]:
    name, label = label_file(root, modality, split).read_text().splitlines()[n - 1].split()
    return name, int(label)


def _image(root: Path, modality: str, split: str, n: int = 1) -> Path:
    return image_path(root, modality, _first_line(root, modality, split, n)[0])


def _break(root: Path, kind: str) -> tuple[str, str]:
    """Damage the dataset one way; returns (file that must be named, text that must appear)."""
    lf = str(label_file(root, "fundus", "dev"))
    if kind == "missing-image":
        _image(root, "fundus", "dev", 3).unlink()
        return f"{lf}:3", "missing image"
    if kind == "truncated-image":
        img = _image(root, "oct", "test", 2)
        img.write_bytes(img.read_bytes()[:200])
        return str(img), "cannot decode"
    if kind == "garbage-image":
        img = _image(root, "fundus", "train", 5)
        img.write_bytes(b"this is not a png at all" * 10)
        return str(img), "cannot decode"
    if kind == "label-9":
        name, _ = _first_line(root, "fundus", "dev", 4)
        _edit_label_line(root, "fundus", "dev", 4, f"{name} 9")
        return f"{lf}:4", "outside 0..8"
    if kind == "label-negative":
        name, _ = _first_line(root, "fundus", "dev", 2)
        _edit_label_line(root, "fundus", "dev", 2, f"{name} -1")
        return f"{lf}:2", "outside 0..8"
    if kind == "malformed":
        _edit_label_line(root, "fundus", "dev", 5, "only-one-field")
        return f"{lf}:5", "malformed"
    if kind == "label-not-int":
        name, _ = _first_line(root, "fundus", "dev", 6)
        _edit_label_line(root, "fundus", "dev", 6, f"{name} three")
        return f"{lf}:6", "not an integer"
    if kind == "duplicate":
        name, label = _first_line(root, "fundus", "train", 1)
        _edit_label_line(root, "fundus", "dev", 3, f"{name} {label}")
        return f"{lf}:3", "duplicate name"
    if kind == "empty-label-file":
        label_file(root, "oct", "dev").write_text("\n")
        return str(label_file(root, "oct", "dev")), "empty label file"
    if kind == "missing-label-file":
        label_file(root, "oct", "test").unlink()
        return str(label_file(root, "oct", "test")), "missing label file"
    if kind == "not-a-root":
        (root / "assemble_oct").rename(root / "elsewhere")
        return str(root / "assemble_oct"), "not a MultiEYE root"
    raise AssertionError(kind)


BAD_KINDS = [
    "missing-image",
    "truncated-image",
    "garbage-image",
    "label-9",
    "label-negative",
    "malformed",
    "label-not-int",
    "duplicate",
    "empty-label-file",
    "missing-label-file",
    "not-a-root",
]
SKIPPABLE = [
    "missing-image",
    "truncated-image",
    "garbage-image",
    "label-9",
    "malformed",
    "duplicate",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_names_the_place_and_writes_nothing(fresh_root, tmp_path, kind, capsys):
    where, what = _break(fresh_root, kind)
    out = tmp_path / "out"
    code = _convert_cli(fresh_root, out)
    err = capsys.readouterr().err
    assert code == 2
    assert where in err and what in err, err
    _assert_nothing_half_written(out)


@pytest.mark.parametrize("kind", SKIPPABLE)
def test_skip_bad_converts_the_rest_and_records_why(fresh_root, tmp_path, kind, capsys):
    where, what = _break(fresh_root, kind)
    out = tmp_path / "out"
    code = _convert_cli(fresh_root, out, "--skip-bad")
    printed = capsys.readouterr().out
    assert code == 0
    manifests = [json.loads(p.read_text()) for p in out.glob("*.manifest.json")]
    skipped = [s for m in manifests for s in m["skipped"]]
    assert len(skipped) == 1 and what in skipped[0]["reason"]
    skipped_lines = [line for line in printed.splitlines() if line.startswith("skipped ")]
    assert len(skipped_lines) == 1 and where in skipped_lines[0] and what in skipped_lines[0]
    m = next(m for m in manifests if m["skipped"])
    assert m["num_samples"] == m["num_listed"] - 1
    assert verify(out).ok


def test_verify_reports_each_problem(synth_root, tmp_path, capsys):
    out = tmp_path / "s"
    convert(synth_root, out, OPTS, progress=False)
    assert main(["shards", "verify", "--shards", str(out)]) == 0
    shards = sorted(out.glob("oct-train-*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:700])
    shards[2].unlink()
    (out / "fundus-dev-000099.tar").write_bytes(b"")
    capsys.readouterr()
    assert main(["shards", "verify", "--shards", str(out), "--workers", "2"]) == 1
    report = capsys.readouterr().out
    assert f"{shards[0]}: sha256 differs" in report
    assert f"{shards[1]}: sha256 differs" in report
    assert f"{shards[2]}: shard listed in the manifest is missing" in report
    assert "fundus-dev-000099.tar: shard not listed" in report
    assert "samples in shards, manifest says" in report


def test_verify_catches_bad_labels_and_undecodable_images(synth_root, tmp_path):
    import io

    out = tmp_path / "s"
    convert(synth_root, out, replace(OPTS, modalities=("fundus",), splits=("dev",)), progress=False)
    manifest_path = out / "fundus-dev.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["shards"][0]
    samples = list(wds.WebDataset(str(out / entry["name"]), shardshuffle=False))
    samples[0]["cls"] = b"11"
    samples[1]["png"] = b"\x89PNG broken"
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__"})
    (out / entry["name"]).write_bytes(buf.getvalue())
    entry["sha256"] = sha256_file(out / entry["name"])  # a consistent but wrong shard
    manifest_path.write_text(json.dumps(manifest))
    report = verify(out)
    text = "\n".join(report.problems)
    assert "label 11 outside 0..8" in text
    assert "image does not decode" in text


def test_verify_on_an_empty_dir_fails(tmp_path):
    assert not verify(tmp_path).ok


def test_formats_and_byte_target(synth_root, tmp_path):
    for fmt in ("jpg", "webp"):
        out = tmp_path / fmt
        pp = Preprocess(image_size=SIZE, fmt=fmt, quality=80)
        convert(synth_root, out, replace(OPTS, preprocess=pp, splits=("dev",)), progress=False)
        assert verify(out).ok
        assert _read_group(out, "fundus", "dev")[0][fmt][:2] in (b"\xff\xd8", b"RI")
    out = tmp_path / "bytes"
    target = 40_000
    convert(synth_root, out, replace(OPTS, shard_bytes=target, splits=("train",)), progress=False)
    sizes = [p.stat().st_size for p in sorted(out.glob("fundus-train-*.tar"))]
    assert len(sizes) > 2
    assert all(s < 1.5 * target for s in sizes)  # last shard may be small
    assert max(sizes) > 0.5 * target


def test_clahe_and_median_change_pixels_not_counts(synth_root, tmp_path):
    plain, proc = tmp_path / "plain", tmp_path / "proc"
    base = replace(OPTS, splits=("dev",))
    convert(synth_root, plain, base, progress=False)
    pp = Preprocess(image_size=SIZE, clahe=True, median=3)
    convert(synth_root, proc, replace(base, preprocess=pp), progress=False)
    for modality in ("fundus", "oct"):
        a, b = _read_group(plain, modality, "dev"), _read_group(proc, modality, "dev")
        assert [s["cls"] for s in a] == [s["cls"] for s in b]
        assert [s["png"] for s in a] != [s["png"] for s in b]
    manifest = json.loads((proc / "fundus-dev.manifest.json").read_text())
    assert manifest["preprocessing"]["clahe"] is True and manifest["preprocessing"]["median"] == 0


def test_bad_options_are_rejected(synth_root, tmp_path, capsys):
    base = ["shards", "convert", "--root", str(synth_root), "--out", str(tmp_path / "o")]
    assert main([*base, "--median", "4"]) == 2
    assert "--median 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--splits", "train,valid"])
    assert "'valid'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--shard-bytes", "lots"])
    with pytest.raises(LayoutError):
        convert(tmp_path / "nowhere", tmp_path / "o", OPTS)


def test_conversion_error_type(fresh_root, tmp_path):
    img = _image(fresh_root, "fundus", "test", 1)
    img.write_bytes(b"junk")
    with pytest.raises(ConversionError, match=str(img)):
        convert(fresh_root, tmp_path / "o", OPTS, progress=False)


def test_slurm_array_conversion_through_submitit(synth_root, tmp_path):
    """The array path (submitit's local executor: real subprocesses, same code as on Slurm)
    gives the same bytes as the single-node conversion."""
    direct, array = tmp_path / "direct", tmp_path / "array"
    convert(synth_root, direct, OPTS, progress=False)
    script = Path(__file__).resolve().parents[1] / "shards" / "convert_slurm.py"
    res = subprocess.run(
        [
            sys.executable,
            str(script),
            "--root",
            str(synth_root),
            "--out",
            str(array),
            "--shard-samples",
            "7",
            "--image-size",
            str(SIZE),
            "--tasks",
            "3",
            "--cluster",
            "local",
            "--cpus-per-task",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "submitted 3 conversion task(s)" in res.stdout
    assert _files(array) == _files(direct)
    assert verify(array).ok


# --------------------------------------------------------------------------------------------
# Findings sidecar
# --------------------------------------------------------------------------------------------


def _edit_sidecar(root: Path, split: str, lineno: int, text: str | None) -> str:
    """Replace (None: delete) line `lineno` of the fundus sidecar of `split`; returns the old
    line."""
    path = findings_file(root, "fundus", split)
    lines = path.read_text().splitlines()
    old = lines[lineno - 1]
    if text is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return old


def _break_sidecar(root: Path, kind: str) -> tuple[str, str]:
    """Damage the fundus dev sidecar one way; returns (place that must be named, reason)."""
    side = str(findings_file(root, "fundus", "dev"))
    name = _edit_sidecar(root, "dev", 3, None).split()[0] if kind == "missing-name" else None
    if kind == "missing-name":
        line = label_file(root, "fundus", "dev").read_text().split().index(name) // 2 + 1
        return f"{label_file(root, 'fundus', 'dev')}:{line} ({name})", f"no line in {side}"
    first = findings_file(root, "fundus", "dev").read_text().splitlines()[3].split()[0]
    text, reason = {
        "malformed": (f"{first} 1 2", "malformed line"),
        "one-field": (first, "malformed line"),
        "not-int": (f"{first} 1,x", "'x' is not an integer"),
        "empty-item": (f"{first} 1,,2", "is not an integer"),
        "negative": (f"{first} 2,-1", "finding index -1 is negative"),
        "too-large": (f"{first} 8", "finding index 8 outside 0..7"),
        "index-twice": (f"{first} 2,2", "finding index 2 listed twice"),
        "unknown-name": ("no-such-image 1", "unknown name: not listed in large9cls.txt"),
        "name-twice": (None, "name listed twice, first at line 1"),
    }[kind]
    if kind == "name-twice":
        text = findings_file(root, "fundus", "dev").read_text().splitlines()[0]
    _edit_sidecar(root, "dev", 4, text)
    return f"{side}:4", reason


SIDECAR_KINDS = [
    "malformed",
    "one-field",
    "not-int",
    "empty-item",
    "negative",
    "too-large",
    "index-twice",
    "unknown-name",
    "name-twice",
    "missing-name",
]


@pytest.mark.parametrize("skip_bad", [False, True], ids=["strict", "skip-bad"])
@pytest.mark.parametrize("kind", SIDECAR_KINDS)
def test_bad_findings_sidecar_names_the_place_and_writes_nothing(
    fresh_root, tmp_path, kind, skip_bad, capsys
):
    where, what = _break_sidecar(fresh_root, kind)
    out = tmp_path / "out"
    code = _convert_cli(fresh_root, out, *(["--skip-bad"] if skip_bad else []))
    err = capsys.readouterr().err
    assert code == 2  # a sidecar problem is never skipped: the findings would be wrong
    assert where in err and what in err, err
    assert not out.exists() or not list(out.glob("*.tar"))  # found before anything is written
    _assert_nothing_half_written(out)


def test_sidecar_without_findings_json_still_rejects_negative_indices(fresh_root, tmp_path):
    (fresh_root / "findings.json").unlink()
    first = findings_file(fresh_root, "fundus", "dev").read_text().split()[0]
    _edit_sidecar(fresh_root, "dev", 1, f"{first} 12")  # no upper bound without findings.json
    layout = attach_findings(fresh_root, read_layout(fresh_root, ("fundus",), ("dev",)))
    assert layout[("fundus", "dev")][0][0].findings == (12,)
    _edit_sidecar(fresh_root, "dev", 1, f"{first} -3")
    with pytest.raises(LayoutError, match=r"findings\.txt:1 .*finding index -3 is negative"):
        convert(fresh_root, tmp_path / "o", OPTS, progress=False)


def test_without_sidecar_records_are_unchanged(fresh_root, tmp_path):
    for path in fresh_root.rglob(FINDINGS_FILE):
        path.unlink()
    out = tmp_path / "s"
    convert(fresh_root, out, replace(OPTS, splits=("dev",)), progress=False)
    for modality in ("fundus", "oct"):
        for sample in _read_group(out, modality, "dev"):
            meta = json.loads(sample["json"])
            assert set(meta) == {"name", "label", "modality", "split", "original_size"}
        manifest = json.loads((out / f"{modality}-dev.manifest.json").read_text())
        assert "finding_names" not in manifest
    assert verify(out).ok


def test_manifest_names_the_findings(synth_root, tmp_path):
    out = tmp_path / "s"
    convert(synth_root, out, replace(OPTS, splits=("test",)), progress=False)
    manifest = json.loads((out / "fundus-test.manifest.json").read_text())
    listing = json.loads((synth_root / "findings.json").read_text())["findings"]
    assert manifest["finding_names"] == [e["name"] for e in listing]


def test_changed_sidecar_redoes_the_shard_that_holds_it(fresh_root, tmp_path):
    out = tmp_path / "s"
    opts = replace(OPTS, splits=("dev",), modalities=("fundus",))
    first = convert(fresh_root, out, opts, progress=False)
    line = findings_file(fresh_root, "fundus", "dev").read_text().splitlines()[0]
    name, findings = line.split()
    new = "-" if findings != "-" else "5"
    _edit_sidecar(fresh_root, "dev", 1, f"{name} {new}")
    again = convert(fresh_root, out, opts, progress=False)
    assert again.written == 1 and again.kept == first.written - 1
    records = [json.loads(s["json"]) for s in _read_group(out, "fundus", "dev")]
    got = next(r for r in records if r["name"] == name)
    assert got["findings"] == ([] if new == "-" else [5])
    assert verify(out).ok


@pytest.mark.parametrize(
    "bad", [[2, 1], [1, 1], [-1], [1.0], ["1"], "1", [True]], ids=lambda v: repr(v)
)
def test_verify_catches_bad_findings(synth_root, tmp_path, bad):
    out = tmp_path / "s"
    convert(synth_root, out, replace(OPTS, modalities=("oct",), splits=("dev",)), progress=False)
    manifest_path = out / "oct-dev.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["shards"][0]
    samples = list(wds.WebDataset(str(out / entry["name"]), shardshuffle=False))
    meta = json.loads(samples[0]["json"])
    meta["findings"] = bad
    samples[0]["json"] = json.dumps(meta).encode()
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__"})
    (out / entry["name"]).write_bytes(buf.getvalue())
    entry["sha256"] = sha256_file(out / entry["name"])
    manifest_path.write_text(json.dumps(manifest))
    report = verify(out)
    assert len(report.problems) == 1, report.problems
    assert "not a sorted list of distinct non-negative integers" in report.problems[0]
    assert samples[0]["__key__"] in report.problems[0]


# --------------------------------------------------------------------------------------------
# Output sizes: keep (default), --max-size, --image-size
# --------------------------------------------------------------------------------------------

MIXED = [(20, 30), (48, 48), (64, 40), (100, 100), (30, 12)]
FUNDUS_DEV = ConvertOptions(modalities=("fundus",), splits=("dev",), shard_samples=7, workers=1)


def _mix_sizes(root: Path) -> dict[str, tuple[int, int]]:
    """Resize the fundus dev images to a cycle of sizes; returns name -> (width, height)."""
    samples, _ = read_layout(root, ("fundus",), ("dev",))[("fundus", "dev")]
    sizes = {}
    for i, s in enumerate(samples):
        sizes[s.name] = MIXED[i % len(MIXED)]
        with Image.open(s.path) as img:
            img.resize(sizes[s.name], Image.Resampling.BILINEAR).save(s.path)
    return sizes


def _sizes(out: Path, modality: str = "fundus", split: str = "dev") -> dict[str, tuple]:
    """name -> size of the stored image."""
    got = {}
    for s in _read_group(out, modality, split):
        with Image.open(io.BytesIO(s["png"])) as img:
            got[json.loads(s["json"])["name"]] = img.size
    return got


def _size_cli(root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "shards", "convert", "--root", str(root), "--out", str(out), "--modality", "fundus",
            "--splits", "dev", "--shard-samples", "7", "--workers", "1", "--no-progress", *extra,
        ]
    )  # fmt: skip


def test_default_keeps_each_size_padded_to_square(fresh_root, tmp_path):
    sizes = _mix_sizes(fresh_root)
    assert Preprocess() == Preprocess(image_size=None, max_size=None)  # keep is the default
    out = tmp_path / "s"
    convert(fresh_root, out, replace(FUNDUS_DEV, modalities=("fundus", "oct")), progress=False)
    assert _sizes(out) == {n: (max(w, h),) * 2 for n, (w, h) in sizes.items()}
    assert set(_sizes(out, "oct").values()) == {(48, 48)}  # 48 x 36 B-scans: padded, not resized
    for s in _read_group(out, "fundus", "dev"):
        meta = json.loads(s["json"])
        w, h = sizes[meta["name"]]
        assert meta["original_size"] == [w, h]
        source = np.asarray(Image.open(image_path(fresh_root, "fundus", meta["name"])))
        with Image.open(io.BytesIO(s["png"])) as img:
            stored = np.asarray(img)
        side = max(w, h)
        x0, y0 = (side - w) // 2, (side - h) // 2
        assert (stored[y0 : y0 + h, x0 : x0 + w] == source).all()  # not resampled at all
        assert stored.sum() == source.sum()  # and the padding is zeros
    manifest = json.loads((out / "fundus-dev.manifest.json").read_text())
    assert manifest["preprocessing"]["image_size"] is None
    assert manifest["preprocessing"]["max_size"] is None
    assert verify(out).ok


def test_max_size_shrinks_only_larger_images(fresh_root, tmp_path):
    sizes = _mix_sizes(fresh_root)
    out = tmp_path / "s"
    assert _size_cli(fresh_root, out, "--max-size", "50") == 0
    assert _sizes(out) == {n: (min(max(w, h), 50),) * 2 for n, (w, h) in sizes.items()}
    manifest = json.loads((out / "fundus-dev.manifest.json").read_text())
    assert manifest["preprocessing"]["max_size"] == 50
    assert manifest["preprocessing"]["image_size"] is None


def test_image_size_resizes_every_image_up_or_down(fresh_root, tmp_path):
    _mix_sizes(fresh_root)
    out = tmp_path / "s"
    assert _size_cli(fresh_root, out, "--image-size", "40") == 0
    assert set(_sizes(out).values()) == {(40, 40)}  # 30 -> 40 up, 48/64/100 -> 40 down
    assert (
        json.loads((out / "fundus-dev.manifest.json").read_text())["preprocessing"]["image_size"]
        == 40
    )
    assert Preprocess(40) == Preprocess(image_size=40)  # positional callers keep their meaning


def test_image_size_and_max_size_together_are_an_error(synth_root, tmp_path, capsys):
    out = tmp_path / "s"
    assert _size_cli(synth_root, out, "--image-size", "40", "--max-size", "50") == 2
    err = capsys.readouterr().err
    assert "--image-size 40 and --max-size 50: give at most one" in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="--image-size 40 and --max-size 50"):
        Preprocess(image_size=40, max_size=50)
    assert _size_cli(synth_root, out, "--max-size", "4") == 2
    assert "--max-size 4: must be at least 8 pixels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--image-size 7: must be at least 8"):
        Preprocess(image_size=7)


def test_changed_size_options_redo_the_shards(fresh_root, tmp_path):
    _mix_sizes(fresh_root)
    out = tmp_path / "s"

    def run(**pp):
        opts = replace(FUNDUS_DEV, preprocess=Preprocess(**pp))
        return convert(fresh_root, out, opts, progress=False)

    first = run()
    assert first.kept == 0 and first.written == 3
    assert run().kept == 3  # same options: kept
    capped = run(max_size=50)
    assert capped.kept == 0 and capped.written == 3
    assert max(side for side, _ in _sizes(out).values()) == 50
    assert run(max_size=50).kept == 3
    assert run(max_size=60).kept == 0
    assert run(image_size=40).kept == 0
    assert set(_sizes(out).values()) == {(40, 40)}
    assert run(image_size=40).kept == 3
    assert run().kept == 0  # back to keep: redone again
    assert verify(out).ok
