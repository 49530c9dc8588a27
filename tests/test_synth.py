from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from multieye_dist.data.classes import NUM_CLASSES
from multieye_dist.data.layout import SPLITS, image_dir, label_file, read_layout
from multieye_dist.data.synth import SynthOptions, class_counts, generate


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
    opts = SynthOptions(per_class=2, seed=7, image_size=32)
    generate(tmp_path / "a", opts)
    generate(tmp_path / "b", SynthOptions(per_class=2, seed=7, image_size=32, workers=2))
    generate(tmp_path / "c", SynthOptions(per_class=2, seed=8, image_size=32))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_oct_is_grey_and_wider_than_tall(synth_root):
    samples, _ = read_layout(synth_root, ("oct",), ("dev",))[("oct", "dev")]
    with Image.open(samples[0].path) as img:
        assert img.mode == "L" and img.size[0] > img.size[1]


def test_class_signal_is_in_the_pixels(synth_root):
    """A nearest-class-mean classifier on raw OCT pixels must beat chance by far on dev: the
    class is learnable from pixels (and clearer on OCT than on fundus)."""

    def accuracy(modality: str) -> float:
        layout = read_layout(synth_root, (modality,), ("train", "dev"))

        def load(split):
            samples = layout[(modality, split)][0]
            x = np.stack(
                [np.asarray(Image.open(s.path).convert("L"), np.float32).ravel() for s in samples]
            )
            return x, np.array([s.label for s in samples])

        xt, yt = load("train")
        xd, yd = load("dev")
        means = np.stack([xt[yt == c].mean(0) for c in range(NUM_CLASSES)])
        pred = ((xd[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        return float((pred == yd).mean())

    oct_acc, fundus_acc = accuracy("oct"), accuracy("fundus")
    assert oct_acc > 0.6, oct_acc
    assert oct_acc > fundus_acc


def test_imbalance():
    counts = class_counts(SynthOptions(per_class=100, imbalance=100), "train")
    assert counts[0] == 100 and counts[-1] == 1
    assert counts == sorted(counts, reverse=True)
