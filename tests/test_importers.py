"""`multieye-dist import flair|release`: safe checkpoint reading and the key mapping.

The checkpoints are built from module trees with exactly the released code's attribute names
(FLAIR's FLAIRModel / VisionModel / TextModel / ProjectionLayer, MultiEYE's FLAIRMultiLayer and
FLAIRConceptClassifier), written here from the key names, with random weights; a tiny BERT stands
in for BioClinicalBERT. They are saved the way the release saves them (torch.save of a dict with
a real AdamW after one step and an argparse.Namespace). The reference forward runs these trees
(torchvision's ResNet-50 under the original names); our ConceptModel, built from the imported
files, must give the same numbers.
"""

from __future__ import annotations

import argparse
import builtins
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multieye_dist import cli
from multieye_dist.model.checkpoint import load_inference
from multieye_dist.model.concept_model import ConceptModel, ModelConfig
from multieye_dist.model.concepts import load_bank, save_bank
from multieye_dist.model.importers import (
    CheckpointImportError,
    StandIn,
    import_flair,
    import_release,
    read_checkpoint,
)

K, D, HID = 98, 512, 32
VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a fundus photograph of retina optic disc cup swelling "
    "drusen hemorrhage vessel thin thick fluid , ."
).split()


# ----------------------------------------------------------------------------- module trees


class ProjectionLayer(nn.Module):  # FLAIR: normalise, project, normalise
    def __init__(self, i: int, o: int):
        super().__init__()
        self.projection = nn.Linear(i, o, bias=False)

    def forward(self, x):
        x = x / x.norm(dim=-1, keepdim=True)
        x = self.projection(x)
        return x / x.norm(dim=-1, keepdim=True)


class VisionModel(nn.Module):
    def __init__(self):
        import torchvision

        super().__init__()
        self.model = torchvision.models.resnet50(weights=None)
        self.model.fc = nn.Identity()
        self.projection_head_vision = ProjectionLayer(2048, D)


class TextModel(nn.Module):
    def __init__(self, bert: nn.Module):
        super().__init__()
        self.model = bert
        self.projection_head_text = ProjectionLayer(HID, D)


class FLAIRModel(nn.Module):
    def __init__(self, bert: nn.Module):
        super().__init__()
        self.vision_model = VisionModel()
        self.text_model = TextModel(bert)
        self.logit_scale = nn.Parameter(torch.log(torch.tensor(1 / 0.07)))


class ReleaseModel(nn.Module):
    """FLAIRMultiLayer (student, with project_4) or FLAIRConceptClassifier (teacher)."""

    def __init__(self, bert: nn.Module, student: bool):
        super().__init__()
        self.flair_model = FLAIRModel(bert)
        self.concept_classifier = nn.Linear(K, 9)
        if student:
            self.project_4 = nn.Linear(2048, D)

    def forward(self, x, concepts):
        vm = self.flair_model.vision_model
        h = vm.model(x)
        s = vm.projection_head_vision(h) @ concepts.t()
        logits = self.concept_classifier(s)
        s2 = self.project_4(h) @ concepts.t() if hasattr(self, "project_4") else None
        return logits, s, s2


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, so a swapped buffer changes the output."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
            m.num_batches_tracked.fill_(7)


def _old_transformers_keys(sd: dict, prefix: str) -> dict:
    """transformers 4.27 (the release's pin) saved BERT's position_ids buffer too."""
    sd = OrderedDict(sd)
    sd[f"{prefix}text_model.model.embeddings.position_ids"] = torch.arange(128)[None]
    return sd


def _save_like_release(model: nn.Module, sd: dict, path: Path, modality: str) -> None:
    """utils/eval.py save_model: the AdamW object itself (after one step) and the Namespace."""
    params = [p for n, p in model.named_parameters() if "project" in n or "classifier" in n]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # lr * weight decay moves the parameters; state holds step, exp_avg, ...
    opt.zero_grad()
    ns = argparse.Namespace(input_size=512, n_classes=9, modality=modality, lr=1e-4)
    torch.save({"model": sd, "optimizer": opt, "epoch": 41, "args": ns}, path)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny BERT and its tokenizer saved with save_pretrained (FLAIR's layout)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("text_encoder")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=HID,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    torch.manual_seed(3)
    bert = BertModel(cfg).eval()
    out = d / "bert"
    bert.save_pretrained(out)
    tok.save_pretrained(out)
    return out, bert


def _build(bert, *, student: bool | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = FLAIRModel(bert) if student is None else ReleaseModel(bert, student)
    _randomise_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def flair(tmp_path_factory, tiny_text):
    """(path, FLAIRModel, state dict): FLAIR's weights file is FLAIRModel.state_dict()."""
    model = _build(tiny_text[1], student=None, seed=1)
    sd = _old_transformers_keys(model.state_dict(), "")
    path = tmp_path_factory.mktemp("flair") / "flair_resnet.pth"
    torch.save(sd, path)
    return path, model, sd


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(5)
    c = F.normalize(torch.randn(K, D, generator=gen), dim=-1)
    path = tmp_path_factory.mktemp("bank") / "flair-bank.safetensors"
    save_bank(path, c, [f"concept {i}" for i in range(K)], {"encoder": "test"})
    return path, c


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_text):
    model = _build(tiny_text[1], student=True, seed=2)
    path = tmp_path_factory.mktemp("release") / "checkpoint_best.pth"
    sd = _old_transformers_keys(model.state_dict(), "flair_model.")
    _save_like_release(model, sd, path, "fundus")
    return path, model, _old_transformers_keys(model.state_dict(), "flair_model.")


def _x(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(9))


def _all_accounted(summary, sd) -> None:
    seen = [s for s, _, _ in summary.mapped] + [k for v in summary.reported.values() for k in v]
    assert sorted(seen) == sorted(sd)  # every tensor once, mapped or reported


# ----------------------------------------------------------------------------- safe reading


class _System:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _Exec:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.sentinel)!r}, 'w').close()",))


def test_plain_state_dict_is_read_weights_only(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3)}
    torch.save(sd, tmp_path / "sd.pth")
    got = read_checkpoint(tmp_path / "sd.pth")
    assert got.loader == "weights_only" and got.replaced == [] and got.other == {}
    assert set(got) == set(sd) and torch.equal(got["a.weight"], sd["a.weight"])


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_read_safely(tmp_path, zip_format):
    sentinel1, sentinel2, sentinel3 = (tmp_path / f"SENTINEL{i}" for i in (1, 2, 3))
    lin = nn.Linear(4, 3)
    state = OrderedDict(lin.state_dict())
    state["evil"] = _System(sentinel3)  # a non-tensor inside the state dict itself
    obj = {"model": state, "payload": _System(sentinel1), "more": [_Exec(sentinel2)]}
    torch.save(obj, tmp_path / "evil.pth", _use_new_zipfile_serialization=zip_format)
    # the file really carries the payload: a plain pickle load would run it
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        torch.load(tmp_path / "evil.pth", weights_only=True)

    got = read_checkpoint(tmp_path / "evil.pth")
    assert got.loader == "restricted"
    assert set(got) == {"weight", "bias"}
    assert torch.equal(got["weight"], lin.weight.detach())
    assert not sentinel1.exists() and not sentinel2.exists() and not sentinel3.exists()
    assert any(n.endswith(".system") for n in got.replaced)  # posix.system on Linux
    assert "builtins.exec" in got.replaced
    assert got.other["payload"].startswith("stand-in for ") and "system" in got.other["payload"]
    assert "system" in got.other["model.evil"]
    payload = got.entries["payload"]
    assert isinstance(payload, StandIn) and payload.args == (f"touch {sentinel1}",)
    assert isinstance(got.entries["more"][0], StandIn)
    assert got.entries["more"][0].target == "builtins.exec"


def test_release_like_checkpoint_is_read(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    model(torch.randn(4, 6)).logsumexp(-1).mean().backward()
    opt.step()
    sd = model.state_dict()
    ns = argparse.Namespace(input_size=512, modality="fundus", n_classes=9)
    torch.save({"model": sd, "optimizer": opt, "epoch": 12, "args": ns}, tmp_path / "r.pth")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(tmp_path / "r.pth", weights_only=True)

    got = read_checkpoint(tmp_path / "r.pth")
    assert got.loader == "restricted" and got.wrapper == "model"
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert "torch.optim.adamw.AdamW" in got.replaced and "argparse.Namespace" in got.replaced
    assert got.other["optimizer"].startswith("stand-in for torch.optim.adamw.AdamW")
    assert got.other["epoch"] == "int: 12"
    assert got.entries["args"].state == vars(ns)  # recorded, never constructed
    opt_state = got.entries["optimizer"].state
    assert set(opt_state) == {"defaults", "state", "param_groups"}


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointImportError, match="missing.pth: checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointImportError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointImportError, match="list.pth: holds a list"):
        read_checkpoint(tmp_path / "list.pth")


# ----------------------------------------------------------------------------- FLAIR


def test_import_flair_init_matches_flair(flair, bank_file, tmp_path):
    from safetensors.torch import load_file

    path, ref, sd = flair
    out = tmp_path / "init.safetensors"
    summary = import_flair(path, out)
    _all_accounted(summary, sd)
    assert len(summary.mapped) == 318 + 1  # the ResNet-50's 318 tensors and the projection
    text = [k for k in sd if k.startswith("text_model.")]
    assert sorted(
        summary.reported["not used: text encoder (FLAIR's BERT and text projection)"]
    ) == (sorted(text))
    assert summary.reported["not used: FLAIR's contrastive temperature"] == ["logit_scale"]

    init = load_file(str(out))
    assert set(init) == {f"backbone.{k}" for k in ref.vision_model.model.state_dict()} | {
        "proj.weight"
    }
    assert init["proj.weight"].shape == (D, 2048)
    assert torch.equal(
        init["backbone.layer3.4.bn2.running_var"], sd["vision_model.model.layer3.4.bn2.running_var"]
    )

    # our model, loaded by hand from the init file, against FLAIR's tree under its own names
    _, c = bank_file
    model = ConceptModel(ModelConfig(backbone="resnet50"), c).eval()
    body = {k[len("backbone.") :]: v for k, v in init.items() if k.startswith("backbone.")}
    model.backbone.load_state_dict(body, strict=True)
    model.proj.load_state_dict({"weight": init["proj.weight"]}, strict=True)
    x = _x()
    with torch.no_grad():
        logits, sims = model(x)
        h = ref.vision_model.model(x)
        v = ref.vision_model.projection_head_vision(h)
        s = v @ c.t()
        want_logits = model.classifier(s)  # the classifier is not part of FLAIR: ours, random
    torch.testing.assert_close(sims[:, 0], s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert "mapped   319 tensors" in summary.text()


def test_flair_init_loads_through_model_weights(flair, bank_file, tmp_path):
    """The init file is what model.weights takes: backbone and projection both load."""
    from safetensors.torch import load_file

    out = tmp_path / "init.safetensors"
    import_flair(flair[0], out)
    init = load_file(str(out))
    model = ConceptModel(ModelConfig(backbone="resnet50", weights=str(out)), bank_file[1])
    assert torch.equal(model.proj.weight, init["proj.weight"])
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, init[f"backbone.{k}"]), k


def _flair_variant(sd, tmp_path, name, *, drop=(), add=None, replace=None) -> Path:
    sd = OrderedDict((k, v) for k, v in sd.items() if k not in drop)
    sd.update(add or {})
    sd.update(replace or {})
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_import_flair_errors_name_the_key(flair, tmp_path):
    _, _, sd = flair
    out = tmp_path / "init.safetensors"
    key = "vision_model.model.layer3.2.bn2.running_var"
    p = _flair_variant(sd, tmp_path, "missing.pth", drop=[key])
    with pytest.raises(CheckpointImportError, match=rf"missing.pth: missing 1 vision key.*{key}"):
        import_flair(p, out)

    extra = "vision_model.model.layer5.0.conv1.weight"
    p = _flair_variant(sd, tmp_path, "extra.pth", add={extra: torch.zeros(3)})
    with pytest.raises(CheckpointImportError, match=rf"extra.pth: unexpected vision key.*{extra}"):
        import_flair(p, out)

    proj = "vision_model.projection_head_vision.projection.weight"
    p = _flair_variant(sd, tmp_path, "shape.pth", replace={proj: torch.zeros(D, 1024)})
    with pytest.raises(CheckpointImportError, match=rf"shape.pth: {proj}.*\[512, 1024\].*2048"):
        import_flair(p, out)

    conv = "vision_model.model.layer2.0.conv2.weight"
    p = _flair_variant(sd, tmp_path, "conv.pth", replace={conv: torch.zeros(128, 128, 1, 1)})
    with pytest.raises(
        CheckpointImportError, match=rf"conv.pth: {conv} has shape \[128, 128, 1, 1\].*3, 3\]"
    ):
        import_flair(p, out)

    other = "image_model.weight"
    p = _flair_variant(sd, tmp_path, "unknown.pth", add={other: torch.zeros(2)})
    with pytest.raises(CheckpointImportError, match=rf"unknown.pth: unexpected key.*{other}"):
        import_flair(p, out)
    assert not out.exists()


def test_import_flair_keeps_fc_as_reported(flair, tmp_path):
    _, _, sd = flair
    fc = {
        "vision_model.model.fc.weight": torch.zeros(10, 2048),
        "vision_model.model.fc.bias": (torch.zeros(10)),
    }
    p = _flair_variant(sd, tmp_path, "fc.pth", add=fc)
    summary = import_flair(p, tmp_path / "init.safetensors")
    assert sorted(summary.reported["not used: the backbone's classification head (fc)"]) == sorted(
        fc
    )


def _flair_bank_by_hand(bert_dir, sd, sentences, *, masked=False):
    """FLAIR's TextModel, by hand: hidden states 1, 2, last; mean over every token position
    (pads included) and over the layers; normalise, project, normalise."""
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(bert_dir)
    bert = BertModel.from_pretrained(bert_dir).eval()
    prompts = [f"A fundus photograph of {s}" for s in sentences]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding present: FLAIR's mean includes it
    with torch.no_grad():
        hs = bert(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].unsqueeze(-1).float()
    if masked:  # what FLAIR does not do
        per_layer = [(hs[i] * m).sum(1) / m.sum(1) for i in (1, 2, len(hs) - 1)]
    else:
        per_layer = [hs[i].mean(dim=1) for i in (1, 2, len(hs) - 1)]
    e = sum(per_layer) / 3
    w = sd["text_model.projection_head_text.projection.weight"]
    return F.normalize(F.normalize(e, dim=-1) @ w.t(), dim=-1)


def test_import_flair_text_encoder_bank(flair, tiny_text, tmp_path):
    path, _, sd = flair
    sentences = ["drusen", "optic disc cup swelling", "thin retina , fluid .", "hemorrhage"]
    (tmp_path / "s.txt").write_text("\n".join(sentences) + "\n")
    out, bank = tmp_path / "init.safetensors", tmp_path / "bank.safetensors"
    summary = import_flair(
        path, out, text_encoder=tiny_text[0], bank_out=bank, sentences=tmp_path / "s.txt"
    )
    _all_accounted(summary, sd)
    assert "used: concept bank (text encoder)" in summary.reported
    c, sents, meta = load_bank(bank)
    assert sents == sentences and c.shape == (len(sentences), D)
    assert meta["prompt"] == "A fundus photograph of {}" and meta["max_length"] == "77"
    torch.testing.assert_close(c, _flair_bank_by_hand(tiny_text[0], sd, sentences))
    masked = _flair_bank_by_hand(tiny_text[0], sd, sentences, masked=True)
    assert not torch.allclose(c, masked, atol=1e-4)  # the test tells the two poolings apart


def test_flair_text_encoder_uses_the_checkpoint_weights(flair, tiny_text, tmp_path):
    """The BERT weights come from the checkpoint (FLAIR's fine-tuned ones), not the directory."""
    _, _, sd = flair
    key = "text_model.model.encoder.layer.2.output.dense.weight"
    p = _flair_variant(sd, tmp_path, "t.pth", replace={key: sd[key] * 2})
    (tmp_path / "s.txt").write_text("drusen\nthin retina\n")
    kw = {"sentences": tmp_path / "s.txt", "text_encoder": tiny_text[0]}
    import_flair(p, tmp_path / "a.safetensors", bank_out=tmp_path / "a-bank.safetensors", **kw)
    import_flair(
        flair[0], tmp_path / "b.safetensors", bank_out=tmp_path / "b-bank.safetensors", **kw
    )
    a, b = (
        load_bank(tmp_path / "a-bank.safetensors")[0],
        load_bank(tmp_path / "b-bank.safetensors")[0],
    )
    assert not torch.allclose(a, b)

    bad = "text_model.model.encoder.layer.1.attention.self.query.weight"
    p = _flair_variant(sd, tmp_path, "tb.pth", drop=[bad])
    with pytest.raises(CheckpointImportError, match=r"tb.pth: .*attention.self.query.weight"):
        import_flair(p, tmp_path / "c.safetensors", bank_out=tmp_path / "c-bank.safetensors", **kw)


# ----------------------------------------------------------------------------- the release


def _check_against_release(model, ref, c, *, level2: bool):
    x = _x()
    with torch.no_grad():
        logits, sims = model(x)
        want_logits, s, s2 = ref(x, c)
    torch.testing.assert_close(sims[:, 0], s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    if level2:
        scale = s2.abs().max().item()
        torch.testing.assert_close(sims[:, 1], s2, rtol=1e-5, atol=1e-5 * max(1.0, scale))


def test_import_release_student(student, bank_file, tmp_path):
    path, ref, sd = student
    bank, c = bank_file
    out = tmp_path / "released-student.safetensors"
    summary = import_release(path, out, role="student", bank=bank)
    _all_accounted(summary, sd)
    assert summary.loader == "restricted"
    assert summary.other["optimizer"].startswith("stand-in for torch.optim.adamw.AdamW")
    assert summary.other["epoch"] == "int: 41"
    dsts = {dst: src for src, dst, _ in summary.mapped}
    assert dsts["classifier.weight"] == "concept_classifier.weight"
    assert dsts["level2.weight"] == "project_4.weight"
    assert (
        dsts["proj.weight"] == "flair_model.vision_model.projection_head_vision.projection.weight"
    )
    assert summary.warnings == []

    model, meta = load_inference(out)
    assert meta["extra"]["modality"] == "fundus" and meta["extra"]["role"] == "student"
    assert meta["extra"]["release_args"]["input_size"] == 512
    assert meta["extra"]["release_epoch"] == 41
    assert meta["concept_sentences"] == [f"concept {i}" for i in range(K)]
    assert meta["image_size"] == 512
    assert torch.equal(model.concepts, c)
    _check_against_release(model, ref, c, level2=True)


def test_import_release_teacher_keeps_random_level2(tiny_text, bank_file, tmp_path):
    bank, c = bank_file
    ref = _build(tiny_text[1], student=False, seed=4)
    sd = _old_transformers_keys(ref.state_dict(), "flair_model.")
    path = tmp_path / "teacher_best.pth"
    _save_like_release(ref, sd, path, "oct")
    out = tmp_path / "released-teacher.safetensors"
    with pytest.warns(UserWarning, match=r"project_4\.weight, project_4\.bias.*random init"):
        summary = import_release(path, out, role="teacher", bank=bank, seed=3)
    _all_accounted(summary, sd)
    assert any("level2.weight, level2.bias" in w for w in summary.warnings)
    m1, meta = load_inference(out)
    assert meta["extra"]["modality"] == "oct" and "random init" in meta["extra"]["level2"]
    torch.manual_seed(3)  # our random init, seeded: the same file every time
    fresh = ConceptModel(ModelConfig(backbone="resnet50"), c)
    assert torch.equal(m1.level2.weight, fresh.level2.weight)
    assert torch.equal(m1.level2.bias, fresh.level2.bias)
    _check_against_release(m1, ref, c, level2=False)


def test_import_release_errors(student, bank_file, tmp_path, tiny_text):
    path, _, sd = student
    bank, c = bank_file
    out = tmp_path / "o.safetensors"

    small = tmp_path / "bank90.safetensors"
    save_bank(small, c[:90], [f"c{i}" for i in range(90)])
    with pytest.raises(CheckpointImportError, match=r"concept_classifier.weight reads K=98.*K=90"):
        import_release(path, out, role="student", bank=small)
    with pytest.raises(CheckpointImportError, match=r"checkpoint_best.pth: .*--bank"):
        import_release(path, out, role="student")

    def variant(name, drop=(), add=None):
        sd2 = OrderedDict((k, v) for k, v in sd.items() if k not in drop)
        sd2.update(add or {})
        torch.save({"model": sd2, "epoch": 1}, tmp_path / name)
        return tmp_path / name

    p = variant("no_w4.pth", drop=["project_4.weight"])
    with pytest.raises(CheckpointImportError, match=r"no_w4.pth: missing project_4.weight"):
        import_release(p, out, role="student", bank=bank)
    p = variant("extra.pth", add={"project_1.weight": torch.zeros(D, 256)})
    with pytest.raises(CheckpointImportError, match=r"extra.pth: unexpected key.*project_1.weight"):
        import_release(p, out, role="student", bank=bank)
    key = "flair_model.vision_model.model.layer4.2.conv3.weight"
    p = variant("no_conv.pth", drop=[key])
    with pytest.raises(CheckpointImportError, match=rf"no_conv.pth: missing 1 vision key.*{key}"):
        import_release(p, out, role="teacher", bank=bank)
    assert not out.exists()


def test_cli_import(student, bank_file, flair, tmp_path, capsys):
    path, _, _ = student
    out = tmp_path / "s.safetensors"
    rc = cli.main(["import", "release", str(path), "--out", str(out), "--role", "student",
                   "--bank", str(bank_file[0])])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "mapped   323 tensors" in printed and "project_4.weight -> level2.weight" in printed
    assert "stand-in for torch.optim.adamw.AdamW" in printed

    p = _flair_variant(flair[2], tmp_path, "bad.pth", drop=["vision_model.model.bn1.running_mean"])
    rc = cli.main(["import", "flair", str(p), "--out", str(tmp_path / "i.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.pth" in err and "vision_model.model.bn1.running_mean" in err
