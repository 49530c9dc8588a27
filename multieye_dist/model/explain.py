"""Concept explanations: which concepts drove a prediction.

The classifier is linear over the level-1 concept similarities, so the logit of class c is
sum_k W_c[c, k] * s_k + b_c exactly: each term is the contribution of concept k to class c.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multieye_dist.data.preprocess import open_image
from multieye_dist.data.transforms import eval_transform
from multieye_dist.model.concept_model import ConceptModel


@dataclass
class Explanation:
    image: str
    predicted: int
    predicted_name: str
    probabilities: dict[str, float]
    concepts: list[dict]  # top-k: {concept, similarity, weight, contribution}, largest first
    bias: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    def text(self) -> str:
        lines = [
            f"{self.image}: predicted {self.predicted_name} "
            f"(p={self.probabilities[self.predicted_name]:.3f})"
        ]
        ranked = sorted(self.probabilities.items(), key=lambda kv: -kv[1])
        lines.append("  probabilities: " + ", ".join(f"{n} {p:.3f}" for n, p in ranked))
        lines.append(f"  concepts for {self.predicted_name} (weight x similarity = contribution):")
        for c in self.concepts:
            lines.append(
                f"    {c['contribution']:+8.4f} = {c['weight']:+.3f} x {c['similarity']:+.3f}"
                f"  {c['concept']}"
            )
        return "\n".join(lines)


@torch.no_grad()
def explain_images(
    model: ConceptModel,
    paths: list[Path],
    *,
    class_names: list[str],
    sentences: list[str],
    image_size: int,
    topk: int = 5,
    device: torch.device | None = None,
) -> list[Explanation]:
    """Each image's prediction and its `topk` concept contributions; on `device` (default:
    where the model is)."""
    device = device or next(model.parameters()).device
    model = model.to(device).eval()
    tf = eval_transform(image_size)
    out = []
    for path in paths:
        # open_image: the bomb limit and 16-bit scaling as in conversion; a BadImageError
        # (a ValueError) names the file
        with open_image(path, str(path)) as img:
            x = tf(img.convert("RGB")).unsqueeze(0).to(device)
        logits, sims = model(x)
        probs = logits.softmax(-1)[0]
        pred = int(probs.argmax())
        contrib = model.contributions(sims[:, 0])[0, pred]  # [K]
        weights = model.classifier.weight[pred]
        order = contrib.argsort(descending=True)[:topk]
        out.append(
            Explanation(
                image=str(path),
                predicted=pred,
                predicted_name=class_names[pred],
                probabilities={n: float(p) for n, p in zip(class_names, probs, strict=True)},
                concepts=[
                    {
                        "concept": sentences[k],
                        "similarity": float(sims[0, 0, k]),
                        "weight": float(weights[k]),
                        "contribution": float(contrib[k]),
                    }
                    for k in order.tolist()
                ],
                bias=float(model.classifier.bias[pred]),
            )
        )
    return out
