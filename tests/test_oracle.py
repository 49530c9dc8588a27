"""The oracle teachers (multieye_dist/model/oracle.py) and the concept readout
(metrics.concept_auc): the controls of the efficacy study, checked against their definitions on
fixed data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from multieye_dist.data.synth import FINDING_PROBS, NUM_FINDINGS
from multieye_dist.model.concepts import ConceptBankError, concept_findings
from multieye_dist.model.oracle import KINDS, OracleTeacher, finding_derangement
from multieye_dist.track.metrics import concept_auc, to_log_dict

META = [{"findings": [2, 3]}, {"findings": []}, {"findings": [1, 2, 6]}, {"findings": [7]}]
LABELS = torch.tensor([3, 0, 8, 6])
IDENTITY = list(range(NUM_FINDINGS))
PARAPHRASED = [f for f in range(NUM_FINDINGS) for _ in range(3)]  # 3 concepts per finding


def multi_hot(meta) -> np.ndarray:
    f = np.zeros((len(meta), NUM_FINDINGS))
    for i, m in enumerate(meta):
        f[i, m["findings"]] = 1
    return f


@pytest.mark.parametrize("mapping", [IDENTITY, PARAPHRASED])
def test_oracle_sims_are_2f_minus_1_of_the_partners_findings_at_both_levels(mapping):
    logits, sims = OracleTeacher("oracle", mapping, 9, seed=0)(META, LABELS)
    want = 2 * multi_hot(META)[:, mapping] - 1
    assert sims.shape == (4, 2, len(mapping)) and sims.dtype == torch.float32
    np.testing.assert_array_equal(sims[:, 0].numpy(), want)
    np.testing.assert_array_equal(sims[:, 1].numpy(), want)


def test_oracle_logits_are_the_bayes_posterior_of_the_findings():
    logits, _ = OracleTeacher("oracle", IDENTITY, 9, seed=0)(META, LABELS)
    f = multi_hot(META)
    lik = np.where(f[:, None, :] == 1, FINDING_PROBS[None], 1 - FINDING_PROBS[None]).prod(-1)
    posterior = lik / lik.sum(1, keepdims=True)  # uniform prior
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), posterior, rtol=1e-4, atol=1e-6)
    assert logits.argmax(1).tolist()[:3] == [3, 0, 8]  # DR, normal, wet AMD: their core findings


def test_oracle_class_reads_the_class_rates_and_shuffled_deranges_findings():
    mapping = PARAPHRASED
    real_logits, _ = OracleTeacher("oracle", mapping, 9, seed=3)(META, LABELS)
    logits, sims = OracleTeacher("oracle-class", mapping, 9, seed=3)(META, LABELS)
    want = 2 * FINDING_PROBS[LABELS.numpy()][:, mapping] - 1
    np.testing.assert_allclose(sims[:, 0].numpy(), want, rtol=1e-6)
    torch.testing.assert_close(logits, real_logits)  # the gate sees the same teacher
    logits, sims = OracleTeacher("oracle-shuffled", mapping, 9, seed=3)(META, LABELS)
    sigma = finding_derangement(NUM_FINDINGS, 3)
    assert not (sigma == np.arange(NUM_FINDINGS)).any()
    np.testing.assert_array_equal(sims[:, 0].numpy(), 2 * multi_hot(META)[:, sigma[mapping]] - 1)
    torch.testing.assert_close(logits, real_logits)


def test_oracle_refuses_what_it_cannot_answer():
    with pytest.raises(ValueError, match="9 classes, but the training data has 4"):
        OracleTeacher("oracle", IDENTITY, 4, seed=0)
    with pytest.raises(ValueError, match="one of the synthetic data's 8 findings"):
        OracleTeacher("oracle", [0, 8], 9, seed=0)
    with pytest.raises(ValueError, match="oracle is one of"):
        OracleTeacher("teacher", IDENTITY, 9, seed=0)
    oracle = OracleTeacher(KINDS[0], IDENTITY, 9, seed=0)
    with pytest.raises(ValueError, match="OCT partner oct-train-3-000007 has no 'findings'"):
        oracle([{"findings": [1]}, {}], torch.tensor([0, 1]), ["a", "oct-train-3-000007"])


def test_concept_findings_from_bank_metadata():
    assert concept_findings({}, 8, 8) == IDENTITY  # one row per finding
    assert concept_findings({}, 98, 8) is None  # the release bank: not tied to findings
    assert concept_findings({"concept_findings": "[0, 0, 1]"}, 3, 8) == [0, 0, 1]
    with pytest.raises(ConceptBankError, match="list of 3 non-negative ints"):
        concept_findings({"concept_findings": "[0, 1]"}, 3, 8, "bank.safetensors")
    with pytest.raises(ConceptBankError, match="names finding 9, but the data has 8"):
        concept_findings({"concept_findings": "[0, 9]"}, 2, 8)


def test_concept_auc_equals_sklearn_per_finding_and_its_mean():
    rng = np.random.default_rng(0)
    n = 200
    has = rng.random((n, 3)) < [0.3, 0.5, 0.1]
    findings = [list(np.flatnonzero(row)) for row in has]
    mapping = [0, 0, 1, 2, 2, 2]
    sims = rng.normal(size=(n, 6)) + 0.8 * has[:, mapping]
    out = concept_auc(sims, findings, mapping, ["a", "b", "c"])
    want = {
        name: roc_auc_score(
            has[:, f], sims[:, [k for k, g in enumerate(mapping) if g == f]].mean(1)
        )
        for f, name in enumerate("abc")
    }
    assert out["concept_auc_per_finding"] == pytest.approx(want, abs=1e-12)
    assert out["concept_auc"] == pytest.approx(np.mean(list(want.values())), abs=1e-12)
    logged = to_log_dict(
        {**out, "per_class": {}, **dict.fromkeys(("accuracy", "precision", "recall",
         "specificity", "f1", "auc", "map", "kappa"))}, "test/best/"
    )  # fmt: skip
    assert logged["test/best/concept_auc"] == out["concept_auc"]
    assert logged["test/best/concept_auc/c"] == want["c"]


def test_concept_auc_leaves_out_undefined_findings():
    sims = np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.5]])
    findings = [[1], [], [1]]  # finding 0 never present: no AUC; finding 2: no concept
    out = concept_auc(sims, findings, [0, 1], ["a", "b", "c"])
    assert out["concept_auc_per_finding"] == {"a": None, "b": 1.0, "c": None}
    assert out["concept_auc"] == 1.0
    with pytest.raises(ValueError, match="not all finite"):
        concept_auc(np.full((3, 2), np.nan), findings, [0, 1], ["a", "b", "c"])
