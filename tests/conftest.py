"""Shared fixtures: small synthetic MultiEYE roots made by the project itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from multieye_dist.data.synth import SynthOptions, generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A read-only reference dataset: 9 classes x (6 train, 2 dev, 2 test) per modality."""
    root = tmp_path_factory.mktemp("synth") / "raw"
    generate(root, SynthOptions(per_class=6, seed=1, image_size=48, workers=2))
    return root


@pytest.fixture
def fresh_root(synth_root, tmp_path) -> Path:
    """A private copy of the dataset that a test may damage."""
    root = tmp_path / "raw"
    shutil.copytree(synth_root, root)
    return root
