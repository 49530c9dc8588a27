from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multieye_dist.cli import main
from multieye_dist.data.classes import NUM_CLASSES
from multieye_dist.data.layout import (
    SPLITS,
    attach_findings,
    findings_file,
    image_dir,
    label_file,
    read_layout,
)
from multieye_dist.data.synth import (
    FINDING_PROBS,
    FINDINGS,
    FUNDUS_NOISE,
    NUM_FINDINGS,
    SynthOptions,
    bayes_accuracy,
    class_counts,
    fundus_image,
    generate,
    oct_image,
    sample_findings,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_classes(synth_root):
    layout = read_layout(synth_root, ("fundus", "oct"), SPLITS)
    for (modality, split), (samples, bad) in layout.items():
        assert not bad
        assert label_file(synth_root, modality, split).is_file()
        labels = [s.label for s in samples]
        assert sorted(set(labels)) == list(range(NUM_CLASSES)), (modality, split)
        for s in samples:
            assert s.path.parent == image_dir(synth_root, modality)
    assert len(layout[("fundus", "train")][0]) == 6 * NUM_CLASSES


def test_deterministic_for_a_seed(tmp_path):
    opts = SynthOptions(per_class=2, seed=7, image_size=32, fundus_per_class=1)
    generate(tmp_path / "a", opts)
    generate(tmp_path / "b", SynthOptions(**{**opts.__dict__, "workers": 2}))
    generate(tmp_path / "c", SynthOptions(**{**opts.__dict__, "seed": 8}))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b  # the worker count does not change a byte (images, labels, sidecars)
    assert a.keys() == c.keys() and a != c


def test_oct_is_grey_and_wider_than_tall(synth_root):
    samples, _ = read_layout(synth_root, ("oct",), ("dev",))[("oct", "dev")]
    with Image.open(samples[0].path) as img:
        assert img.mode == "L" and img.size[0] > img.size[1]


def test_imbalance():
    counts = class_counts(SynthOptions(per_class=100, imbalance=100), "train")
    assert counts[0] == 100 and counts[-1] == 1
    assert counts == sorted(counts, reverse=True)


# ----------------------------------------------------------------- the class -> findings model


def test_findings_list():
    assert len(FINDINGS) == NUM_FINDINGS == 8
    assert len({f.name for f in FINDINGS}) == len({f.caption for f in FINDINGS}) == 8
    assert FINDING_PROBS.shape == (NUM_CLASSES, NUM_FINDINGS)
    shared = (FINDING_PROBS > 0.5).sum(0)
    assert (shared >= 2).sum() >= 3  # drusen, fluid, haemorrhage: core in several classes


def test_finding_frequencies_match_the_table():
    n = 3000
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        counts = np.zeros(NUM_FINDINGS)
        for _ in range(n):
            for k in sample_findings(rng, label):
                counts[k] += 1
        p = FINDING_PROBS[label]
        tolerance = 5 * np.sqrt(p * (1 - p) / n) + 1e-3
        np.testing.assert_array_less(np.abs(counts / n - p), tolerance, err_msg=f"class {label}")


def likeliest_findings(label: int) -> tuple[int, ...]:
    """The class's most likely combination (findings independent: those with p > 1/2)."""
    return tuple(int(i) for i in np.flatnonzero(FINDING_PROBS[label] > 0.5))


def test_each_class_has_its_own_likeliest_combination():
    combos = [likeliest_findings(c) for c in range(NUM_CLASSES)]
    assert combos[0] == ()  # normal: no finding
    assert len(set(combos)) == NUM_CLASSES, combos
    # Empirically too: the most frequent combination of each class is the table's.
    rng = np.random.default_rng(1)
    for c in range(NUM_CLASSES):
        drawn = Counter(sample_findings(rng, c) for _ in range(500))
        assert drawn.most_common(1)[0][0] == combos[c]
    # Seen perfectly, the findings identify the class most of the time (not always).
    assert 0.8 < bayes_accuracy() < 0.95


# ----------------------------------------------------------------- the pictures


@pytest.mark.parametrize("k", range(NUM_FINDINGS), ids=[f.name for f in FINDINGS])
def test_a_finding_is_clear_on_oct_and_faint_on_fundus(k):
    """Same eye and noise with and without finding k. Over the pixels the finding changes, the
    mean change over the noise's standard deviation there is above 1 on OCT (the finding stands
    out of the speckle) and below it on fundus (each pixel is drowned in noise); yet on fundus
    too the whole finding is far from invisible (an ideal observer's d' = |change| / noise sd
    well above 1), so it can be learnt."""

    def f32(img: Image.Image) -> np.ndarray:
        return np.asarray(img, np.float32)

    def snr(draw, seed: int) -> tuple[float, float]:
        clean0 = f32(draw(np.random.default_rng(seed), (), 64, noise=False))
        cleank = f32(draw(np.random.default_rng(seed), (k,), 64, noise=False))
        noisy0 = f32(draw(np.random.default_rng(seed), (), 64))
        change = np.abs(cleank - clean0)
        region = change > 1
        assert region.sum() >= 4, "the finding changes almost nothing"
        sd = (noisy0 - clean0)[region].std()
        return float(change[region].mean() / sd), float(np.sqrt((change[region] ** 2).sum()) / sd)

    oct_pixel, oct_d = np.mean([snr(oct_image, s) for s in range(8)], axis=0)
    fundus_pixel, fundus_d = np.mean([snr(fundus_image, s) for s in range(8)], axis=0)
    assert oct_pixel > 1.1 and oct_d > 15, (oct_pixel, oct_d)
    assert 0.1 < fundus_pixel < 0.9 and fundus_d > 2, (fundus_pixel, fundus_d)
    assert oct_pixel > 1.4 * fundus_pixel and oct_d > 1.5 * fundus_d


def test_pictures_depend_on_findings_not_on_the_class():
    rng = np.random.default_rng(3)
    a = np.asarray(oct_image(np.random.default_rng(5), (0, 1), 48))
    b = np.asarray(oct_image(np.random.default_rng(5), (0, 1), 48))
    assert (a == b).all()
    fundus = np.asarray(fundus_image(rng, (), 48), np.float32)
    assert fundus.shape == (48, 48, 3) and abs(fundus[24, 24].mean() - 90) < 4 * FUNDUS_NOISE


# ----------------------------------------------------------------- sidecars and options


def test_findings_sidecar_agrees_with_the_label_files(synth_root):
    listing = json.loads((synth_root / "findings.json").read_text())["findings"]
    assert [(e["index"], e["name"], e["caption"]) for e in listing] == [
        (i, f.name, f.caption) for i, f in enumerate(FINDINGS)
    ]
    layout = attach_findings(synth_root, read_layout(synth_root, ("fundus", "oct"), SPLITS))
    for (modality, split), (samples, _) in layout.items():
        names = [
            ln.split()[0]
            for ln in label_file(synth_root, modality, split).read_text().split("\n")
            if ln
        ]
        side = findings_file(synth_root, modality, split).read_text().splitlines()
        assert [ln.split()[0] for ln in side] == names  # same names, same order
        for s in samples:
            assert s.findings is not None and list(s.findings) == sorted(set(s.findings))
            assert all(0 <= i < NUM_FINDINGS for i in s.findings)
    # Over the whole set, the findings follow their classes (fluid mostly in 2, 7, 8, ...).
    seen = np.zeros((NUM_CLASSES, NUM_FINDINGS))
    count = np.zeros(NUM_CLASSES)
    for samples, _ in layout.values():
        for s in samples:
            count[s.label] += 1
            seen[s.label, list(s.findings)] += 1
    assert np.abs(seen / count[:, None] - FINDING_PROBS).mean() < 0.1


def test_fundus_per_class_makes_fundus_labels_scarce(tmp_path):
    opts = SynthOptions(per_class=12, fundus_per_class=2, image_size=32)
    summary = generate(tmp_path, opts)
    assert summary["fundus"]["train"] == [2] * NUM_CLASSES
    assert summary["oct"]["train"] == [12] * NUM_CLASSES
    for modality in ("fundus", "oct"):
        for split in ("dev", "test"):
            assert summary[modality][split] == [3] * NUM_CLASSES
    layout = read_layout(tmp_path, ("fundus", "oct"), SPLITS)
    for (modality, split), (samples, _) in layout.items():
        assert Counter(s.label for s in samples) == dict(enumerate(summary[modality][split])), (
            modality,
            split,
        )
    assert class_counts(SynthOptions(per_class=8), "train", "fundus") == [8] * NUM_CLASSES
    with pytest.raises(ValueError, match="--fundus-per-class 0"):
        SynthOptions(fundus_per_class=0)


def test_synth_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--per-class",
        "--fundus-per-class",
        "--imbalance",
        "--seed",
        "--workers",
        "--oct-image-size",
    ):
        assert option in text
    assert "findings" in text


def test_oct_image_size_sets_the_oct_resolution_only(tmp_path):
    base = SynthOptions(per_class=1, image_size=32, workers=1)
    generate(tmp_path / "a", base)
    generate(tmp_path / "b", replace(base, oct_image_size=32))
    a = _digest(tmp_path / "a")
    assert _digest(tmp_path / "b") == a  # None means the same as image_size
    out = tmp_path / "c"
    argv = ["synth", "--out", str(out), "--per-class", "1", "--image-size", "32"]
    assert main([*argv, "--oct-image-size", "48"]) == 0
    layout = read_layout(out, ("fundus", "oct"), SPLITS)
    for (modality, _), (samples, _) in layout.items():
        for s in samples:
            with Image.open(s.path) as img:
                assert img.size == ((48, 36) if modality == "oct" else (32, 32))
    c = _digest(out)
    fundus = [k for k in a if k.startswith("assemble/")]
    assert fundus and all(c[k] == a[k] for k in fundus)  # fundus pictures unchanged
    with pytest.raises(ValueError, match="--oct-image-size 16: must be >= 32"):
        SynthOptions(oct_image_size=16)


# ----------------------------------------------------------------- the pretraining pool


def _content(path: Path) -> bytes:
    """A file's content: decoded pixels (with mode and size) for PNGs, else its bytes."""
    if path.suffix == ".png":
        with Image.open(path) as img:
            return f"{img.mode} {img.size}".encode() + img.tobytes()
    return path.read_bytes()


def _content_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(_content(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _findings_by_name(root: Path, modality: str, split: str) -> dict[str, str]:
    lines = findings_file(root, modality, split).read_text().splitlines()
    return dict(ln.split() for ln in lines)


def test_data_unchanged_by_the_pool_option(tmp_path):
    """Regression pin of the non-pool output (the demo's published numbers depend on it). The
    digests were taken with synth.py as it was before the pretraining pool was added."""
    generate(tmp_path, SynthOptions(per_class=2, image_size=32, seed=0))
    digests = _content_digests(tmp_path)
    tree = hashlib.sha256()
    for rel, digest in digests.items():
        tree.update(rel.encode() + b"\0" + bytes.fromhex(digest))
    fundus = "assemble/train/ImageData/cfp-clahe-224x224/fundus-train-0-000000.png"
    oct_ = "assemble_oct/train/ImageData/oct-filter-448x448/oct-train-3-000006.png"
    assert digests[fundus] == "b544e3834b54c41bb9098147ccb6d87e187e49f08d194af7efda372862f68ad2"
    assert digests[oct_] == "1cbb5a6a79aff8415413037c55629db58cb94027e57714bd2518601244baed78"
    assert tree.hexdigest() == "bd9ed1e4227fc9ec542e2a67ca24c4a7316b6e140c4831f20381d8fc7d3169ee"


def test_pool_is_disjoint_from_the_data_of_the_same_seed(tmp_path):
    opts = SynthOptions(per_class=2, image_size=32, seed=0)
    generate(tmp_path / "data", opts)
    summary = generate(tmp_path / "pool", replace(opts, pool=True))
    data = read_layout(tmp_path / "data", ("fundus", "oct"), SPLITS)
    pool = read_layout(tmp_path / "pool", ("fundus", "oct"), SPLITS)
    data_names = {s.path.name for samples, _ in data.values() for s in samples}
    data_pixels = {
        hashlib.sha256(_content(s.path)).hexdigest()
        for samples, _ in data.values()
        for s in samples
    }
    for (modality, split), (samples, bad) in pool.items():
        assert not bad
        assert Counter(s.label for s in samples) == dict(enumerate(summary[modality][split]))
        for s in samples:
            assert s.path.name.startswith(f"pool-{modality}-{split}-")
            assert s.path.name not in data_names
            assert hashlib.sha256(_content(s.path)).hexdigest() not in data_pixels, s.path.name
        # The findings are drawn apart too (same index, other findings), and so is the listing.
        side = _findings_by_name(tmp_path / "pool", modality, split)
        unprefixed = {k.removeprefix("pool-"): v for k, v in side.items()}
        assert unprefixed != _findings_by_name(tmp_path / "data", modality, split)
        assert list(unprefixed) != list(_findings_by_name(tmp_path / "data", modality, split))
    # Still deterministic for a seed, whatever the worker count.
    generate(tmp_path / "pool2", replace(opts, pool=True, workers=2))
    assert _digest(tmp_path / "pool2") == _digest(tmp_path / "pool")


def test_synth_cli_pool_writes_pool_names(tmp_path, capsys):
    out = tmp_path / "pool"
    assert (
        main(["synth", "--out", str(out), "--pool", "--per-class", "2", "--image-size", "32"]) == 0
    )
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert pngs and all(n.startswith("pool-") for n in pngs)
    for modality in ("fundus", "oct"):
        for split in SPLITS:
            lines = label_file(out, modality, split).read_text().splitlines()
            assert lines and all(ln.startswith(f"pool-{modality}-{split}-") for ln in lines)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "--pool" in capsys.readouterr().out
