"""Scoring a model on a shard split with the release's metrics; runs with or without ranks.

Each rank scores its share of the split (:class:`EvalStream` gives every sample to exactly one
rank and worker), rank 0 gathers the records and computes :func:`metrics.evaluate` on all of
them. No DeepSpeed: the ``eval`` command and the trainer share this code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from multieye_dist.data.batch import Batch, DataError
from multieye_dist.data.prepare import BatchPreparer
from multieye_dist.data.schema import FINDINGS
from multieye_dist.data.stream import EvalStream, ShardSet, gather_records, make_loader
from multieye_dist.model.concept_model import param_dtype
from multieye_dist.model.concepts import concept_findings as bank_concept_findings
from multieye_dist.track.metrics import concept_auc, evaluate
from multieye_dist.track.records import write_records

logger = logging.getLogger(__name__)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "eval",
    prepare: Callable[[Batch], Batch] | None = None,
) -> tuple[list[dict], int]:
    """Records {key, label, probs} for every sample the loader yields (and, for a sample whose
    shard record has ``findings``, those and its level-1 concept similarities ``sims``: the
    concept readout's inputs), and the number of undecodable samples (each worker's counters
    are cumulative: keep the last per worker).
    `prepare` turns a batch on the device into model input (uint8 batches of
    ``data.augment_on=device``: :class:`~multieye_dist.data.prepare.BatchPreparer`)."""
    was_training = model.training
    model.eval()
    dtype = param_dtype(model)  # bf16 weights take bf16 inputs
    records: list[dict] = []
    per_worker: dict[int, int] = {}
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, mininterval=2, leave=False):
            per_worker[batch.stats.worker] = batch.stats.bad
            if not len(batch):
                continue
            batch = batch.to(device, non_blocking=True)
            if prepare is not None:
                batch = prepare(batch)
            x = batch.image.to(dtype=dtype)
            with _autocast(device, autocast_dtype):
                logits, sims = model(x)
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            s1 = sims[:, 0].float().cpu().numpy()
            for k, y, p, s, m in zip(
                batch.keys, batch.label.tolist(), probs, s1, batch.meta, strict=True
            ):
                record = {"key": k, "label": int(y), "probs": p.tolist()}
                if m.get(FINDINGS) is not None:
                    record.update(findings=list(m[FINDINGS]), sims=s.tolist())
                records.append(record)
    finally:
        model.train(was_training)
    return records, sum(per_worker.values())


def evaluate_split(
    model: nn.Module,
    shard_dir: str | Path,
    modality: str,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_bad_fraction: float = 0.01,
    progress: bool = False,
    augment_on: str = "auto",
    records_path: Path | None = None,
    concept_findings: list[int] | None = None,
) -> dict | None:
    """Metrics of `model` on `modality`-`split` (on rank 0; None on other ranks). The result is
    :func:`metrics.evaluate`'s dict plus ``split``, ``modality``, ``listed`` (the manifest's
    sample count), ``scored`` and ``bad`` (samples that could not be scored: undecodable,
    mislabelled or missing from their shard, up to `max_bad_fraction`). Every listed sample is
    scored or counted bad: a result on part of a split without saying so is a DataError.
    `records_path`: rank 0 also writes the per-sample records there
    (:func:`multieye_dist.track.records.write_records`): the pictures are redrawn from them.

    Where every scored sample's shard record has ``findings`` (the synthetic data), the result
    also has the concept readout (:func:`multieye_dist.track.metrics.concept_auc`: ``concept_auc``
    and ``concept_auc_per_finding``), with ``concept_findings`` the finding of each concept
    (None: concept k is finding k, when the bank has one concept per finding)."""
    shards = ShardSet.from_manifest(shard_dir, modality, split)  # a directory or a URL prefix
    n_model = getattr(getattr(model, "module", model), "num_classes", None)
    if n_model is not None and n_model != shards.num_classes:  # scores would mean other classes
        raise ValueError(
            f"the model has {n_model} classes but {shards.manifest} lists {shards.num_classes} "
            f"({', '.join(shards.class_names)}); evaluate on shards of the classes it was "
            "trained on"
        )
    stream = EvalStream(
        shards, image_size, batch_size, max_bad_fraction=max_bad_fraction, augment_on=augment_on
    )
    records, bad = predict(
        model,
        make_loader(stream, num_workers),
        device,
        autocast_dtype=autocast_dtype,
        progress=progress,
        desc=f"eval {modality}-{split}",
        prepare=BatchPreparer(image_size),  # float batches (augment_on=cpu) pass through
    )
    # The bad count rides along as one extra record per rank.
    gathered = gather_records(records + [{"key": "~bad", "bad": bad}])
    if gathered is None:
        return None
    bad = sum(r["bad"] for r in gathered if r["key"] == "~bad")
    rows = [r for r in gathered if r["key"] != "~bad"]
    if len(rows) + bad != shards.listed:  # never a silently smaller split
        raise DataError(
            f"{modality}-{split} ({shard_dir}): {len(rows)} samples scored and {bad} bad, but "
            f"its manifest lists {shards.listed}; check the shards with multieye-dist shards verify"
        )
    if not rows:
        raise ValueError(f"{shard_dir}: no sample of {modality}-{split} could be scored")
    labels = np.array([r["label"] for r in rows])
    probs = np.array([r["probs"] for r in rows])
    names = list(shards.class_names)  # the manifest's (MultiEYE's 9 for older shards)
    result = evaluate(labels, probs, names)
    result.update(split=split, modality=modality, listed=shards.listed, scored=len(rows), bad=bad)
    result.update(_concept_readout(rows, shards, concept_findings))
    if records_path is not None:  # after evaluate(): non-finite probabilities never get here
        write_records(records_path, rows, split=split, modality=modality, class_names=names)
    if bad:
        logger.warning(
            "%s-%s: %d of %d listed sample(s) were not scored (undecodable, mislabelled or "
            "missing from their shard)",
            modality,
            split,
            bad,
            shards.listed,
        )
    return result


def _concept_readout(rows: list[dict], shards: ShardSet, mapping: list[int] | None) -> dict:
    """The concept readout of scored records (empty where it does not apply: records without
    findings, or a bank whose concepts are not tied to the data's findings)."""
    if not all("findings" in r for r in rows):
        return {}
    k = len(rows[0]["sims"])
    names = list(shards.finding_names or [])
    if not names:  # a findings sidecar without findings.json: name them by index
        names = [
            f"finding{i}" for i in range(1 + max(max(r["findings"], default=-1) for r in rows))
        ]
    mapping = mapping if mapping is not None else bank_concept_findings({}, k, len(names))
    if mapping is None:
        logger.info(
            "no concept readout: the %d concepts are not tied to the %d findings", k, len(names)
        )
        return {}
    sims = np.array([r["sims"] for r in rows])
    return concept_auc(sims, [r["findings"] for r in rows], mapping, names)
