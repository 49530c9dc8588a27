"""Tests for multieye_dist.model.concept_model: the concept model, the frozen teacher, weight
loading."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from multieye_dist.model.concept_model import (
    ConceptModel,
    FrozenTeacher,
    ModelConfig,
    build_model,
    load_backbone_weights,
    param_groups,
)

K, D = 98, 384


def bank(seed: int = 0, k: int = K, d: int = D) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def images(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def r18() -> ConceptModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18"), bank()).eval()


@functools.cache
def _prototype(backbone: str, seed: int, kw: tuple) -> ConceptModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone=backbone, **dict(kw)), bank())


def make(
    backbone: str = "resnet18", seed: int = 0, *, load_weights: bool = True, **kw
) -> ConceptModel:
    """A fresh model (deep copy of a cached one: building timm models dominates test time)."""
    if "weights" in kw:
        torch.manual_seed(seed)
        return build_model(ModelConfig(backbone=backbone, **kw), bank(), load_weights=load_weights)
    return copy.deepcopy(_prototype(backbone, seed, tuple(sorted(kw.items()))))


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    ("backbone", "width"), [("resnet18", 512), ("resnet50", 2048), ("convnext_atto", 320)]
)
def test_forward_shapes_and_types(backbone, width):
    model = make(backbone, num_classes=9).eval()
    assert model.num_features == width
    assert model.proj.weight.shape == (D, width) and model.proj.bias is None
    assert model.level2.weight.shape == (D, width) and model.level2.bias.shape == (D,)
    assert model.classifier.weight.shape == (9, K)
    with torch.no_grad():
        out = model(images())
    assert isinstance(out, tuple) and len(out) == 2
    logits, sims = out
    assert logits.shape == (2, 9) and sims.shape == (2, 2, K)
    assert logits.dtype == sims.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(sims).all()


def test_concept_dim_from_bank_and_num_classes():
    model = build_model(ModelConfig(backbone="resnet18", num_classes=4), bank(k=7, d=16))
    assert (model.num_concepts, model.concept_dim) == (7, 16)
    logits, sims = model.eval()(images())
    assert logits.shape == (2, 4) and sims.shape == (2, 2, 7)


def test_sims_and_logits_match_independent_formulas(r18):
    x = images()
    with torch.no_grad():
        logits, sims = r18(x)
        h = r18.backbone(x)  # plain pooled feature
        assert h.shape == (2, 512)
        c = bank()  # the bank the model was given, not the model's buffer
        s = F.normalize(h @ r18.proj.weight.t(), dim=-1) @ c.t()
        s2 = (h @ r18.level2.weight.t() + r18.level2.bias) @ c.t()
        z = s @ r18.classifier.weight.t() + r18.classifier.bias
    torch.testing.assert_close(sims[:, 0], s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sims[:, 1], s2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, z, rtol=1e-4, atol=1e-5)
    # level 1 is a cosine-like similarity: |s_k| <= |C_k|
    assert (sims[:, 0].abs() <= c.norm(dim=1) + 1e-4).all()
    # the two levels really differ (level 2 is not normalised)
    assert not torch.allclose(sims[:, 0], sims[:, 1])


def test_contributions_sum_to_logits(r18):
    with torch.no_grad():
        logits, sims = r18(images())
        contrib = r18.contributions(sims[:, 0])
    assert contrib.shape == (2, 9, K)
    torch.testing.assert_close(contrib.sum(-1) + r18.classifier.bias, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(contrib[1, 3, 5], r18.classifier.weight[3, 5] * sims[1, 0, 5])
    with pytest.raises(ValueError, match="sims_level1"):
        r18.contributions(sims)  # [B, 2, K] is not level-1 sims


def test_dropout_only_in_train_mode():
    model = make(drop_rate=0.5)
    x = images()
    model.train()
    torch.manual_seed(0)
    a = model(x)[1]
    torch.manual_seed(1)
    b = model(x)[1]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x)[1], model(x)[1])


# ----------------------------------------------------------------------------- concept bank


def test_concept_bank_is_a_frozen_persistent_buffer(r18):
    names = dict(r18.named_buffers())
    assert "concepts" in names
    assert "concepts" not in dict(r18.named_parameters())
    assert all(p is not r18.concepts for p in r18.parameters())
    assert not r18.concepts.requires_grad
    torch.testing.assert_close(r18.concepts, bank())
    sd = r18.state_dict()
    assert "concepts" in sd
    other = build_model(ModelConfig(backbone="resnet18"), bank(seed=5))
    assert not torch.allclose(other.concepts, r18.concepts)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.concepts, r18.concepts)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x)[1], r18(x)[1])


def test_concept_bank_is_copied_not_aliased():
    c = bank()
    model = build_model(ModelConfig(backbone="resnet18"), c)
    c.zero_()
    assert model.concepts.abs().sum() > 0


@pytest.mark.parametrize(
    ("concepts", "exc", "match"),
    [
        (torch.randn(D), ValueError, "2-D"),
        (torch.randn(2, K, D), ValueError, "2-D"),
        (torch.zeros(0, D), ValueError, "K >= 1"),
        (torch.ones(K, D, dtype=torch.int64), TypeError, "floating"),
        ([[0.0, 1.0]], TypeError, "torch.Tensor"),
        (torch.full((K, D), float("nan")), ValueError, "NaN"),
    ],
)
def test_bad_concept_bank_rejected(concepts, exc, match):
    with pytest.raises(exc, match=match):
        ConceptModel(ModelConfig(backbone="resnet18"), concepts)


def test_concept_dim_mismatch_rejected():
    with pytest.raises(ValueError, match="D=384.*concept_dim=512"):
        build_model(ModelConfig(backbone="resnet18", concept_dim=512), bank())
    model = build_model(ModelConfig(backbone="resnet18", concept_dim=D), bank())
    assert model.concept_dim == D


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"concept_dim": 0}, "concept_dim"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"backbone": ""}, "backbone"),
    ],
)
def test_bad_config_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_unknown_backbone_rejected():
    with pytest.raises(ValueError, match="no_such_net"):
        build_model(ModelConfig(backbone="no_such_net"), bank())


# ----------------------------------------------------------------------------- teacher


def test_teacher_gets_no_grad_but_student_does():
    student = make(seed=1).train()
    teacher = FrozenTeacher(make(seed=2))
    xs, xo = images(seed=3), images(seed=4)
    zf, sf = student(xs)
    zo, so = teacher(xo)
    assert not zo.requires_grad and not so.requires_grad
    # Products save the teacher outputs for backward: this would raise with inference-mode outputs.
    loss = (
        F.cross_entropy(zf, torch.tensor([0, 1]))
        + F.mse_loss(sf, so)
        + (sf * so).mean()
        + (F.softmax(zf, -1) * F.softmax(zo, -1)).sum()
    )
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.proj.weight.grad is not None and student.level2.weight.grad is not None
    assert student.backbone.conv1.weight.grad is not None


def test_teacher_matches_model_and_stays_eval():
    model = make(seed=2)
    x = images()
    with torch.no_grad():
        ref = model.eval()(x)
    teacher = FrozenTeacher(model)
    assert teacher.train() is teacher
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    teacher.train(True)
    assert all(not m.training for m in teacher.modules())
    out = teacher(x)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_teacher_batchnorm_stats_unchanged():
    teacher = FrozenTeacher(make(seed=2))
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for seed in range(3):
        teacher(images(seed=seed) * 5 + 3)
    after = teacher.state_dict()
    bn_keys = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert bn_keys
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_teacher_is_fully_frozen_level2_included():
    frozen = FrozenTeacher(make(seed=2))
    assert not any(p.requires_grad for p in frozen.parameters())
    logits, sims = frozen(images())
    assert not logits.requires_grad and not sims.requires_grad
    assert param_groups(frozen, 1e-3) == []  # nothing for an optimizer


def test_teacher_dtype_autocast():
    model = make(seed=2)
    x = images()
    with torch.no_grad():
        ref = model.eval()(x)
    logits, sims = FrozenTeacher(model, dtype=torch.bfloat16)(x)
    assert logits.dtype == torch.bfloat16 and sims.dtype == torch.bfloat16
    torch.testing.assert_close(sims.float(), ref[1], rtol=0.1, atol=0.5)
    logits32, _ = FrozenTeacher(model, dtype=torch.float32)(x)
    assert logits32.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        FrozenTeacher(model, dtype=torch.int8)


# ----------------------------------------------------------------------------- weight loading


@pytest.fixture(scope="module")
def r18_source():
    """A timm resnet18 with a 1000-class head, like a downloaded checkpoint."""
    torch.manual_seed(123)
    net = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_backbone_equals(model: ConceptModel, sd: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    assert own
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("fmt", ["pt", "pt-module", "pt-wrapped", "safetensors", "st-backbone"])
def test_load_backbone_weights(tmp_path, r18_source, fmt, caplog):
    if fmt == "pt":
        path = tmp_path / "w.pth"
        torch.save(r18_source, path)
    elif fmt == "pt-module":
        path = tmp_path / "w.pt"
        torch.save({f"module.{k}": v for k, v in r18_source.items()}, path)
    elif fmt == "pt-wrapped":
        path = tmp_path / "w.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in r18_source.items()}, "ep": 3}, path)
    elif fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(r18_source, str(path))
    else:
        path = tmp_path / "w.safetensors"
        save_file({f"backbone.{k}": v for k, v in r18_source.items()}, str(path))
    model = make(seed=0)
    assert not torch.equal(model.backbone.conv1.weight, r18_source["conv1.weight"])
    with caplog.at_level(logging.WARNING, logger="multieye_dist.model.concept_model"):
        result = load_backbone_weights(model, path)
    _assert_backbone_equals(model, r18_source)
    assert set(result.unexpected) == {"fc.weight", "fc.bias"}
    assert result.missing == []
    assert "fc.weight" in caplog.text  # unexpected keys are reported


def test_config_weights_loaded_by_build_model(tmp_path, r18_source):
    path = tmp_path / "w.pth"
    torch.save({"model": r18_source}, path)
    model = make(weights=str(path))
    _assert_backbone_equals(model, r18_source)
    skipped = make(weights=str(path), load_weights=False)
    assert not torch.equal(skipped.backbone.conv1.weight, r18_source["conv1.weight"])


def test_partial_weights_report_missing(tmp_path, r18_source, caplog):
    path = tmp_path / "part.pt"
    torch.save({k: v for k, v in r18_source.items() if not k.startswith("layer4")}, path)
    model = make(seed=0)
    with caplog.at_level(logging.WARNING, logger="multieye_dist.model.concept_model"):
        result = load_backbone_weights(model, path)
    assert result.missing and all(k.startswith("layer4") for k in result.missing)
    assert "missing" in caplog.text
    assert torch.equal(model.backbone.conv1.weight, r18_source["conv1.weight"])


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_weights_without_matching_keys_rejected(tmp_path, suffix):
    path = tmp_path / f"wrong.{suffix}"
    sd = {"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)}
    if suffix == "pt":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    with pytest.raises(ValueError, match=str(path)):
        load_backbone_weights(make(), path)


def test_weights_of_wrong_architecture_rejected(tmp_path, r18_source):
    path = tmp_path / "r18.pt"
    torch.save(r18_source, path)
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone_weights(make("resnet50"), path)


def test_missing_or_unreadable_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_backbone_weights(make(), missing)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        make(weights=str(missing))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_backbone_weights(make(), junk)


# ----------------------------------------------------------------------------- param groups


def test_param_groups(r18):
    groups = param_groups(r18, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    no_decay, decay = ({id(p) for p in g["params"]} for g in groups)
    assert not no_decay & decay
    assert no_decay | decay == {id(p) for p in r18.parameters()}
    assert id(r18.backbone.bn1.weight) in no_decay and id(r18.backbone.bn1.bias) in no_decay
    assert id(r18.classifier.bias) in no_decay and id(r18.level2.bias) in no_decay
    for p in (r18.backbone.conv1.weight, r18.proj.weight, r18.level2.weight):
        assert id(p) in decay
    assert id(r18.classifier.weight) in decay
    torch.optim.AdamW(groups, lr=1e-4)  # usable as is


def test_param_groups_skip_frozen_and_no_weight_decay_names():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
            self.lin = torch.nn.Linear(8, 8)
            self.frozen = torch.nn.Linear(8, 8)
            self.frozen.requires_grad_(False)

        def no_weight_decay(self):
            return {"pos_embed"}

    net = Net()
    no_decay, decay = param_groups(net, 0.1)
    assert {id(p) for p in no_decay["params"]} == {id(net.pos_embed), id(net.lin.bias)}
    assert {id(p) for p in decay["params"]} == {id(net.lin.weight)}


def test_embeddings_give_the_same_logits_and_similarities():
    """forward(return_embeddings=True) is what the fused loss reads: sims = emb C^T."""
    from multieye_dist.model.concept_model import FrozenTeacher

    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1)
    model = ConceptModel(ModelConfig(backbone="test_resnet"), bank).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, sims = model(x)
    logits2, emb = model(x, return_embeddings=True)
    assert emb.shape == (3, 2, 16)
    assert torch.allclose(logits, logits2, atol=1e-6)
    assert torch.allclose(torch.einsum("bld,kd->blk", emb, bank), sims, atol=1e-5)
    zt, et = FrozenTeacher(model).embeddings(x)
    assert torch.allclose(et, emb) and not et.requires_grad and not zt.requires_grad


def test_whole_model_init_loads_backbone_projection_and_heads(tmp_path, caplog):
    """An export of the whole model (an alignment run's, or an `import flair` init) loads the
    projection and heads too, not only the backbone; a key the model lacks, a missing backbone
    key or a wrong shape is an error naming it."""
    source = make(seed=3)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "init.safetensors"
    save_file(state, str(path))
    model = make(seed=4, weights=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = images()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x)[0], source.eval()(x)[0], atol=1e-6)

    # backbone + projection only (what `import flair` writes): the heads keep their init
    partial = {k: v for k, v in state.items() if k.startswith(("backbone.", "proj."))}
    save_file(partial, str(path))
    fresh = make(seed=4)
    model = make(seed=4, weights=str(path))
    assert torch.equal(model.proj.weight, source.proj.weight)
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)

    # another bank of the same shape: loaded with a warning, the run's bank kept
    other = dict(state, concepts=state["concepts"] + 1)
    save_file(other, str(path))
    with caplog.at_level(logging.WARNING, logger="multieye_dist.model.concept_model"):
        model = make(seed=4, weights=str(path))
    assert "another concept bank" in caplog.text
    assert torch.equal(model.concepts, bank())

    for bad, match in (
        (dict(state, **{"head.extra": torch.zeros(1)}), "head.extra"),
        ({k: v for k, v in state.items() if k != "backbone.conv1.weight"}, "backbone.conv1"),
        (dict(state, **{"proj.weight": torch.zeros(7, 512)}), r"proj.weight: file \(7, 512\)"),
    ):
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=match):
            make(seed=4, weights=str(path))


def test_lr_scale_gives_modules_groups_of_their_own(r18):
    groups = param_groups(r18, 0.05, lr=1e-3, lr_scale={"level2": 0.1, "classifier": 30})
    by_lr = {}
    for g in groups:
        by_lr.setdefault(round(g.get("lr", 1e-3), 9), set()).update(id(p) for p in g["params"])
    assert by_lr[1e-4] == {id(p) for p in r18.level2.parameters()}
    assert by_lr[3e-2] == {id(p) for p in r18.classifier.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(r18.parameters()))
    level2 = [g for g in groups if g["params"][0] is r18.level2.weight]
    assert [g["weight_decay"] for g in level2] == [0.05]  # decay rules unchanged
    assert all("lr" not in g for g in param_groups(r18, 0.05, lr=1e-3))  # no scale: as before
    with pytest.raises(ValueError, match=r"optim.lr_scale: no module \['head'\].*classifier"):
        param_groups(r18, 0.05, lr=1e-3, lr_scale={"head": 2})


def test_level2_norm_normalises_u_in_sims_and_embeddings():
    model = make(level2_norm=True).eval()
    x = images()
    with torch.no_grad():
        h = model.features(x)
        u = F.normalize(model.level2(h), dim=-1)
        _, sims = model(x)
        _, emb = model(x, return_embeddings=True)
    assert torch.allclose(sims[:, 1], u @ model.concepts.t(), atol=1e-6)
    assert torch.allclose(emb[:, 1], u, atol=1e-6)
    assert sims[:, 1].abs().max() <= bank().norm(dim=1).max() + 1e-5
