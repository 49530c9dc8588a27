"""The training objectives (multieye_dist.train.objectives): registry and config errors, what each
objective computes, and the step's single host sync."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import random_batch, run_ranks, spawn_single

from multieye_dist import config
from multieye_dist.config import ConfigError, load_config
from multieye_dist.core import distributed as D
from multieye_dist.model.concept_model import ConceptModel, FrozenTeacher, ModelConfig
from multieye_dist.model.concepts import load_bank
from multieye_dist.model.losses import octcoda_loss
from multieye_dist.train import objectives as O

BANK = Path(__file__).resolve().parents[1] / "configs/concepts/minilm-l6.safetensors"
CPU = torch.device("cpu")


def _model(seed: int = 0) -> ConceptModel:
    torch.manual_seed(seed)
    return ConceptModel(ModelConfig(backbone="test_resnet"), load_bank(BANK)[0])


def _cfg(*overrides: str):
    return load_config(None, ["perf.channels_last=false", "loss.impl=torch", *overrides])


# ----------------------------------------------------------------------------- registry


def test_each_stage_and_loss_name_selects_its_objective():
    cases = {
        ("distill", "octcoda"): O.OctCoda,
        ("distill", "fundus-only"): O.FundusOnly,
        ("teacher", "octcoda"): O.TeacherCE,  # the teacher stage has one objective
    }
    for (stage, name), cls in cases.items():
        cfg = _cfg(f"train.stage={stage}", f"loss.name={name}")
        assert O.objective_class(stage, cfg.loss) is cls
    assert (O.OctCoda.modality, O.OctCoda.partner, O.OctCoda.needs_teacher) == (
        "fundus",
        "oct",
        True,
    )
    assert (O.FundusOnly.partner, O.FundusOnly.needs_teacher) == (None, False)
    assert (O.TeacherCE.modality, O.TeacherCE.needs_teacher) == ("oct", False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["loss.name=kd"],
            r"loss.name='kd'.*choose one of concept-align, fundus-only, octcoda, teacher-ce",
        ),
        (["train.stage=teacher", "loss.name=kd"], r"loss.name='kd'"),  # a typo is never ignored
        (["loss.name=teacher-ce"], r"loss.name='teacher-ce' for train.stage=distill.*octcoda"),
        (["loss.variant=offical"], r"loss.variant='offical' for loss.name=octcoda.*official"),
        (["loss.name=fundus-only", "loss.variant=x"], r"loss.variant='x'.*paper"),
    ],
)
def test_unknown_name_or_variant_names_the_option_and_choices(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_a_registered_objective_becomes_a_config_choice(monkeypatch):
    monkeypatch.setattr(O, "OBJECTIVES", {k: dict(v) for k, v in O.OBJECTIVES.items()})
    choices = {k: dict(v) for k, v in config.OBJECTIVE_CHOICES.items()}
    monkeypatch.setattr(config, "OBJECTIVE_CHOICES", choices)
    with pytest.raises(ConfigError, match="loss.name='toy'"):
        load_config(None, ["loss.name=toy"])
    O.register(ToyObjective)
    cfg = load_config(None, ["loss.name=toy"])
    assert isinstance(O.build_objective(cfg, CPU), ToyObjective)


# ----------------------------------------------------------------------------- what they compute


@pytest.mark.parametrize("train_level2", [False, True])
def test_teacher_objective_reaches_level2_only_when_asked(train_level2):
    model = _model()
    cfg = _cfg("train.stage=teacher", f"teacher.train_level2={str(train_level2).lower()}")
    objective = O.build_objective(cfg, CPU)
    objective.freeze_unreached(model)
    assert all(p.requires_grad == train_level2 for p in model.level2.parameters())
    batch = random_batch(4, paired=False)
    total, terms = objective(model, None, batch)
    logits, _ = model(batch.image)
    assert terms["cls"].item() == pytest.approx(F.cross_entropy(logits, batch.label).item())
    assert set(terms) == ({"cls", "level2"} if train_level2 else {"cls"})
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()))
    if train_level2:
        model.zero_grad()
        terms["level2"].backward()  # the level-2 term alone
        assert model.level2.weight.grad.abs().sum() > 0
        classifier = model.classifier.weight.grad
        assert classifier is None or not classifier.any()  # it must not move the classifier


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_octcoda_objective_is_the_octcoda_loss_on_student_and_teacher(variant):
    model, teacher = _model(0), FrozenTeacher(_model(1), dtype=torch.float32)
    objective = O.build_objective(_cfg(f"loss.variant={variant}"), CPU)
    batch = random_batch()
    total, terms = objective(model, teacher, batch)
    zf, sf = model(batch.image)
    zo, so = teacher(batch.partner_image)
    ref = octcoda_loss(zf, sf, batch.label, zo, so, batch.partner_label, variant=variant)
    assert total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    assert list(terms) == ["cls", "prototype", "contrastive", "gate_open", "level2_rms"]
    assert terms["gate_open"].item() == float(bool(ref.gated))
    assert terms["level2_rms"].item() == pytest.approx(sf[:, 1].pow(2).mean().sqrt().item())
    assert all(t.device == CPU and t.ndim == 0 for t in terms.values())


def test_fundus_only_objective_reads_no_partner_and_logs_only_cls():
    model = _model()
    objective = O.build_objective(_cfg("loss.name=fundus-only"), CPU)
    objective.freeze_unreached(model)
    assert not any(p.requires_grad for p in model.level2.parameters())
    batch = random_batch(paired=False)
    total, terms = objective(model, None, batch)
    logits, _ = model(batch.image)
    assert list(terms) == ["cls"]
    assert total.item() == pytest.approx(F.cross_entropy(logits, batch.label).item())


# ----------------------------------------------------------------------------- one sync per step


def _flag_ranks(rank: int, world: int) -> None:
    finite, bad = torch.tensor(1.0), torch.tensor(float("nan"))
    assert D.step_flags(finite, stop=False) == (True, False)
    assert D.step_flags(bad if rank == 1 else finite, stop=False) == (False, False)
    assert D.step_flags(finite, stop=rank == 0) == (True, True)  # one rank asks: all stop


@pytest.mark.slow
def test_step_flags_agree_over_ranks():
    run_ranks(_flag_ranks, 2)


class ToyObjective(O.Objective):
    """A loss the project does not ship: label-smoothed cross-entropy plus a logit penalty.
    Module-level so spawned training processes can import it."""

    name = "toy"
    stage = "distill"

    def __call__(self, model, teacher, batch):
        logits, _ = model(self.inputs(batch.image))
        terms = {
            "smoothed_ce": F.cross_entropy(logits.float(), batch.label, label_smoothing=0.1),
            "logit_l2": 1e-3 * logits.float().pow(2).mean(),
        }
        return terms["smoothed_ce"] + terms["logit_l2"], terms


def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.backbone=test_resnet",
        f"data.shards={shards}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.samples_per_epoch=64",
        "data.num_workers=0",
        "data.augment=false",
        "train.epochs=1",
        f"train.out_dir={out}",
        "train.log_every_steps=1",
        "train.precision=fp32",
        "train.progress=false",
        "train.plots=false",
        "optim.warmup_epochs=0",
        "teacher.dtype=fp32",
        "tracking.wandb.mode=disabled",
        *extra,
    ]


def _train_toy(rank: int, world: int, overrides: list[str]) -> None:
    from multieye_dist.train.loop import run

    O.register(ToyObjective)  # in this process only: multieye_dist.train is not touched
    run(load_config(None, overrides))


@pytest.mark.slow
def test_a_toy_objective_trains_without_touching_train_py(shards, tmp_path):
    from multieye_dist.track.records import read_metrics

    out = tmp_path / "toy"
    over = _overrides(shards, out, "loss.name=toy", "train.stop_after_steps=2")
    spawn_single(_train_toy, over)
    steps = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # logged terms are the objective's own keys
        assert r["train/loss"] == pytest.approx(r["train/smoothed_ce"] + r["train/logit_l2"])
        assert "train/contrastive" not in r


_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def _count_syncs_and_collectives(rank: int, world: int, overrides: list[str], out: Path) -> None:
    """Run real training steps on two gloo ranks while counting, per step, the host syncs
    (tensor reads to Python) and the collectives that the project's own code makes."""
    import json
    import os
    import sys

    import torch.distributed as dist

    from multieye_dist.train import loop as train

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    )  # the group exists already (helpers.run_ranks); DeepSpeed joins it
    root = str(Path(train.__file__).resolve().parents[1])  # the package: multieye_dist
    counts: dict[str, int] = {"syncs": 0, "collectives": 0, "steps": 0}
    where: list[str] = []
    active = [False]

    def ours(depth: int = 2) -> str | None:
        frame = sys._getframe(depth)
        name = frame.f_code.co_filename
        return f"{Path(name).name}:{frame.f_lineno}" if name.startswith(root) else None

    def counting(kind: str, fn):
        def wrapper(*a, **k):
            site = ours() if active[0] else None
            if site is not None:
                counts[kind] += 1
                where.append(f"{kind} {site}")
            return fn(*a, **k)

        return wrapper

    for m in _SYNC_METHODS:
        setattr(torch.Tensor, m, counting("syncs", getattr(torch.Tensor, m)))
    for c in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object"):
        setattr(dist, c, counting("collectives", getattr(dist, c)))
    real_step = train.train_step

    def step(*a, **k):
        active[0] = True
        try:
            return real_step(*a, **k)
        finally:
            active[0] = False
            counts["steps"] += 1

    train.train_step = step
    train.run(load_config(None, overrides))
    if rank == 0:
        (out / "counts.json").write_text(json.dumps({**counts, "where": where}))


@pytest.mark.slow
def test_a_training_step_makes_one_host_sync_and_one_collective(shards, teacher_ckpt, tmp_path):
    """On the CPU the GPU's sync debug mode is not available: the test counts the tensor reads
    to the host and the collectives issued from multieye_dist's own code during train_step, on
    two real gloo ranks with the OCT-CoDA objective (gate, prototypes, contrastive term)."""
    import json

    over = _overrides(
        shards, tmp_path / "run", f"teacher.checkpoint={teacher_ckpt}", "train.stop_after_steps=3"
    )
    run_ranks(_count_syncs_and_collectives, 2, over, tmp_path, timeout=240)
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["steps"] == 3
    assert counts["syncs"] == counts["steps"], counts["where"]
    assert counts["collectives"] == counts["steps"], counts["where"]


def test_batch_moves_and_pins_every_tensor():
    batch = random_batch()
    moved = batch.map_tensors(lambda t: t + 0 if t.is_floating_point() else t * 1)
    assert moved.keys == batch.keys and moved.stats is batch.stats
    assert torch.equal(moved.partner_image, batch.partner_image)
    alone = replace(batch, partner_image=None, partner_label=None, partner_keys=None)
    assert not alone.paired and alone.map_tensors(lambda t: t).partner_image is None
    assert len(batch) == 6 and batch.paired


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_objective_forward_and_backward_make_no_host_sync_on_gpu(impl):
    """The GPU check of the one-sync rule: under sync debug mode "error" any operation that
    waits for the GPU raises, so the objective and its backward must run without one, and the
    step's flags (the one intended sync) must be the first thing that trips it."""
    dev = torch.device("cuda")
    model = _model(0).to(dev)
    teacher = FrozenTeacher(_model(1).to(dev), dtype=torch.bfloat16)
    objective = O.build_objective(_cfg(f"loss.impl={impl}", "perf.channels_last=true"), dev)
    assert objective.impl == impl
    batch = random_batch(16).to(dev)
    objective(model, teacher, batch)[0].backward()  # warm-up: cuDNN, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, terms = objective(model, teacher, batch)
        total.backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            D.step_flags(total, stop=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(terms) == {"cls", "prototype", "contrastive", "gate_open"}


# ----------------------------------------------------------------------------- alignment, controls


def _with_findings(batch, findings):
    return replace(batch, meta=[{"findings": f} for f in findings])


def test_multi_positive_nce_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64)
    pos = torch.zeros(4, 5, dtype=torch.float64)
    pos[0, [1, 2]] = 1
    pos[2, 4] = 1
    pos[3, [1, 4]] = 1  # row 1: no finding (a normal eye): a negative only
    rows = []
    for i in (0, 2, 3):
        lp = logits[i].log_softmax(0)
        rows.append(-lp[pos[i] > 0].mean())
    cols = []
    for k in (1, 2, 4):
        lp = logits[:, k].log_softmax(0)
        cols.append(-lp[pos[:, k] > 0].mean())
    want = (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2
    assert O.multi_positive_nce(logits, pos).item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("modality", ["fundus", "oct"])
def test_align_objective_trains_backbone_and_projection_and_probes_the_classifier(modality):
    model = _model()
    cfg = _cfg("train.stage=align", f"align.modality={modality}", "align.temperature=0.5")
    objective = O.build_objective(cfg, CPU)
    assert isinstance(objective, O.ConceptAlign) and objective.modality == modality
    assert objective.partner is None and not objective.needs_teacher
    objective.freeze_unreached(model)
    assert not any(p.requires_grad for p in model.level2.parameters())
    batch = _with_findings(random_batch(4, paired=False), [[0, 3], [], [3], [97]])
    total, terms = objective(model, None, batch)
    assert list(terms) == ["align", "probe"]
    _, sims = model(batch.image)
    pos = torch.zeros(4, 98)
    for i, f in enumerate([[0, 3], [], [3], [97]]):
        pos[i, f] = 1
    want = O.multi_positive_nce(sims[:, 0] / 0.5, pos)
    assert terms["align"].item() == pytest.approx(want.item(), rel=1e-5)
    probe = F.cross_entropy(model.classifier(sims[:, 0]), batch.label)
    assert terms["probe"].item() == pytest.approx(probe.item(), rel=1e-5)
    model.zero_grad()
    terms["probe"].backward(retain_graph=True)
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.proj.weight.grad is None  # the probe does not shape the concept space
    terms["align"].backward()
    assert model.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_align_objective_names_a_sample_without_findings_or_out_of_the_bank():
    objective = O.build_objective(_cfg("train.stage=align"), CPU)
    batch = random_batch(3, paired=False)
    with pytest.raises(ValueError, match=r"sample 0-0 has no 'findings'.*import flair"):
        objective(_model(), None, batch)
    with pytest.raises(ValueError, match=r"sample 0-2 has findings \[98\].*K=98"):
        objective(_model(), None, _with_findings(batch, [[1], [], [98]]))


def test_gate_never_control_computes_the_terms_but_trains_on_cls_alone():
    model, teacher = _model(0), FrozenTeacher(_model(1), dtype=torch.float32)
    batch = random_batch()
    real = O.build_objective(_cfg(), CPU)
    never = O.build_objective(_cfg("loss.control=gate-never"), CPU)
    total, terms = never(model, teacher, batch)
    _, ref = real(model, teacher, batch)
    assert total.item() == terms["cls"].item() and terms["gate_open"].item() == 0
    assert terms["contrastive"].item() == pytest.approx(ref["contrastive"].item())
    model.zero_grad()
    total.backward()
    assert not model.level2.weight.grad.any()  # only distillation reaches W_4


def test_permuted_teacher_control_pairs_other_classes_and_relabels_the_teacher():
    cfg = _cfg("loss.control=permuted-teacher", "train.seed=3")
    objective = O.build_objective(cfg, CPU)
    perm = objective.partner_classes
    assert sorted(perm) == list(range(9)) and all(p != c for c, p in enumerate(perm))
    assert perm == O.derangement(9, 3) and perm != O.derangement(9, 4)
    model, teacher = _model(0), FrozenTeacher(_model(1), dtype=torch.float32)
    batch = random_batch()
    partner_label = torch.tensor([perm[c] for c in batch.label.tolist()])
    batch = replace(batch, partner_label=partner_label)  # what the stream pairs
    total, _ = objective(model, teacher, batch)
    zf, sf = model(batch.image)
    zo, so = teacher(batch.partner_image)
    ref = octcoda_loss(zf, sf, batch.label, zo[:, list(perm)], so, batch.label)
    assert total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="loss.control=permuted-teacher controls the octcoda"):
        load_config(None, ["loss.name=fundus-only", "loss.control=permuted-teacher"])


def test_distill_warmup_ramps_alpha_and_beta():
    model, teacher = _model(0), FrozenTeacher(_model(1), dtype=torch.float32)
    batch = random_batch()
    objective = O.build_objective(_cfg("loss.distill_warmup_steps=4"), CPU)
    zf, sf = model(batch.image)
    zo, so = teacher(batch.partner_image)
    for step, share in ((0, 0.0), (1, 0.25), (4, 1.0), (9, 1.0)):
        objective.set_step(step)
        total, _ = objective(model, teacher, batch)
        ref = octcoda_loss(
            zf, sf, batch.label, zo, so, batch.partner_label, alpha=0.6 * share, beta=0.05 * share
        )
        assert total.item() == pytest.approx(ref.total.item(), rel=1e-6), step


FINDINGS_BANK = BANK.parent / "synth-findings-minilm.safetensors"


def _findings_model(seed: int = 0) -> ConceptModel:
    torch.manual_seed(seed)
    return ConceptModel(ModelConfig(backbone="test_resnet"), load_bank(FINDINGS_BANK)[0])


@pytest.mark.parametrize("kind", ["oracle", "oracle-class", "oracle-permuted", "oracle-shuffled"])
def test_oracle_teacher_runs_through_the_octcoda_objective_from_the_partners_records(kind):
    from multieye_dist.model.oracle import OracleTeacher

    cfg = _cfg(f"teacher.kind={kind}", f"concepts.bank={FINDINGS_BANK}", "train.seed=2")
    objective = O.build_objective(cfg, CPU)
    assert not objective.needs_teacher and objective.impl == "torch"
    batch = random_batch(6)
    batch = replace(batch, partner_meta=[{"findings": [i % 8, 7 - i % 8]} for i in range(6)])
    model = _findings_model()
    total, terms = objective(model, None, batch)  # no teacher model at all
    # the same loss computed by hand from the oracle's outputs (relabelled when permuted)
    oracle = OracleTeacher(kind, list(range(8)), 9, seed=2)
    zo, so = oracle(batch.partner_meta, batch.partner_label)
    yo = batch.partner_label
    if kind == "oracle-permuted":
        perm = torch.tensor(objective.partner_classes)
        inverse = torch.argsort(perm)
        zo, yo = zo[:, perm], inverse[yo]
    logits, sims = model(batch.image)
    want = octcoda_loss(logits, sims, batch.label, zo, so, yo, check_labels=False)
    torch.testing.assert_close(total, want.total)
    torch.testing.assert_close(terms["contrastive"], want.contrastive)
    assert (objective.partner_classes is not None) == (kind == "oracle-permuted")


def test_oracle_needs_findings_a_findings_bank_and_the_torch_loss():
    cfg = _cfg("teacher.kind=oracle", f"concepts.bank={FINDINGS_BANK}")
    with pytest.raises(ValueError, match="OCT partner o0-0 has no 'findings'"):
        O.build_objective(cfg, CPU)(_findings_model(), None, replace(
            random_batch(4), partner_meta=[{} for _ in range(4)]))  # fmt: skip
    with pytest.raises(ValueError, match="does not say which finding each concept describes"):
        O.build_objective(_cfg("teacher.kind=oracle"), CPU)  # the release's 98 sentences
    with pytest.raises(ConfigError, match="not triton"):
        load_config(None, ["teacher.kind=oracle", "loss.impl=triton"])
    with pytest.raises(ConfigError, match="teacher.kind=oracle is a teacher of the octcoda"):
        load_config(None, ["teacher.kind=oracle", "loss.name=fundus-only"])


def test_gate_open_control_applies_distillation_whatever_the_gate_says():
    model, teacher = _model(), FrozenTeacher(_model(1), dtype=torch.float32)
    batch = random_batch(6)
    out = {}
    for control in ("none", "gate-open", "gate-never"):
        objective = O.build_objective(_cfg(f"loss.control={control}", "loss.beta=5"), CPU)
        out[control] = objective(model, teacher, batch)
    total, terms = out["gate-open"]
    want = terms["cls"] + 5 * terms["prototype"] + 0.6 * terms["contrastive"]
    torch.testing.assert_close(total, want)
    assert terms["gate_open"] == 1.0 and out["gate-never"][1]["gate_open"] == 0.0
    torch.testing.assert_close(out["gate-never"][0], terms["cls"])
