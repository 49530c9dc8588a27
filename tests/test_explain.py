"""Inference checkpoint round trip and `multieye-dist explain` on a synthetic image."""

from __future__ import annotations

import json

import pytest
import torch

from multieye_dist.cli import main
from multieye_dist.core.atomic import temp_files
from multieye_dist.data.classes import CLASS_NAMES
from multieye_dist.data.layout import read_layout
from multieye_dist.model.checkpoint import export_inference, load_inference
from multieye_dist.model.concept_model import ConceptModel, ModelConfig

K, D = 12, 16
SENTENCES = [f"concept number {i}" for i in range(K)]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18")
    bank = torch.nn.functional.normalize(torch.randn(K, D), dim=-1)
    model = ConceptModel(cfg, bank)
    path = tmp_path / "model.safetensors"
    export_inference(path, model, cfg, concept_sentences=SENTENCES, image_size=48)
    return path, model


def test_checkpoint_round_trip(checkpoint):
    path, model = checkpoint
    loaded, meta = load_inference(path)
    assert meta["concept_sentences"] == SENTENCES and meta["image_size"] == 48
    assert meta["class_names"] == list(CLASS_NAMES)
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x), strict=True):
            torch.testing.assert_close(a, b)
    assert not temp_files(path.parent)


def test_corrupt_or_missing_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_inference(bad)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_inference(tmp_path / "nope.safetensors")


def test_explain_cli_is_readable_and_consistent(checkpoint, synth_root, capsys):
    path, model = checkpoint
    image = read_layout(synth_root, ("fundus",), ("test",))[("fundus", "test")][0][0].path
    assert main(["explain", "--checkpoint", str(path), str(image), "--topk", "3"]) == 0
    text = capsys.readouterr().out
    assert str(image) in text and "predicted" in text and "concept number" in text
    assert main(["explain", "--checkpoint", str(path), str(image), "--json", "--topk", "3"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["predicted_name"] == CLASS_NAMES[result["predicted"]]
    probs = result["probabilities"]
    assert abs(sum(probs.values()) - 1) < 1e-5
    assert max(probs, key=probs.get) == result["predicted_name"]
    top = [c["contribution"] for c in result["concepts"]]
    assert len(top) == 3 and top == sorted(top, reverse=True)
    for c in result["concepts"]:
        assert c["contribution"] == pytest.approx(c["weight"] * c["similarity"], rel=1e-5)
        assert c["concept"] in SENTENCES


def test_explain_names_unreadable_image(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["explain", "--checkpoint", str(path), str(junk)]) == 2
    assert "junk.png" in capsys.readouterr().err
