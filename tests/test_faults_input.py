"""Issue 16, part B: images as they come, label files as they come, command-line values.

Every fault is provoked with real files (PNG/TIFF bytes written here, label files edited on a
copy of the synthetic root) and every test checks the message names the place and that nothing
was lost: converted pixels are the faithful ones, nothing half-written is left behind.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multieye_dist.cli import build_parser, main
from multieye_dist.core.atomic import is_temp_name
from multieye_dist.data.decode import decode_pil, decode_uint8
from multieye_dist.data.layout import (
    LayoutError,
    attach_findings,
    findings_file,
    label_file,
    read_layout,
    read_split,
)
from multieye_dist.data.preprocess import BadImageError, load_image
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.stream import EvalStream, ShardSet
from multieye_dist.data.tario import iter_samples, write_samples
from multieye_dist.data.verify import verify

SIDE = 48  # the synthetic root's fundus side: replaced images keep the stored size
RNG = np.random.default_rng(16)

# ------------------------------------------------------------------ image files, byte by byte


def _png(arr: np.ndarray, bit_depth: int, color_type: int, chunks: tuple = ()) -> bytes:
    """A PNG with exactly these samples (big-endian for 16 bits): PIL cannot write 16-bit
    colour, and the point is to read what other tools write."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = arr.astype(dtype).reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    body = b"".join(chunk(k, d) for k, d in chunks)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + body
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _tiff(width: int, height: int, bits: int, data: bytes) -> bytes:
    """A minimal little-endian grey TIFF, one strip (PIL cannot write 12-bit samples)."""
    entries = [
        (256, width), (257, height), (258, bits), (259, 1), (262, 1),
        (273, 0), (277, 1), (278, height), (279, len(data)),
    ]  # fmt: skip
    offset = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, value in entries:
        value = offset if tag == 273 else value
        out += struct.pack("<HHII", tag, 4, 1, value)  # LONG values
    return out + b"\x00\x00\x00\x00" + data


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, (SIDE, SIDE, *shape), dtype=np.uint16).squeeze()


def _over_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.int64)[..., None] if color.ndim == 3 else alpha.astype(np.int64)
    return ((color.astype(np.int64) * a + 127) // 255).astype(np.uint8)


def _grey16_png():
    a = _u16()
    return _saved(Image.fromarray(a), "PNG"), "L", (a >> 8).astype(np.uint8)


def _grey16b_tiff():
    a = _u16()
    img = Image.frombytes("I;16B", (SIDE, SIDE), a.astype(">u2").tobytes())
    return _saved(img, "TIFF"), "L", (a >> 8).astype(np.uint8)


def _grey12_tiff():
    a = RNG.integers(0, 4096, (SIDE, SIDE), dtype=np.uint16)
    pairs = a.reshape(SIDE, SIDE // 2, 2).astype(np.uint32)
    packed = (pairs[..., 0] << 12) | pairs[..., 1]  # two 12-bit samples in 3 bytes
    data = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], -1).astype(np.uint8)
    return _tiff(SIDE, SIDE, 12, data.tobytes()), "L", (a >> 4).astype(np.uint8)


def _int32_tiff():
    a = RNG.integers(0, 2**31, (SIDE, SIDE), dtype=np.int32)
    return _saved(Image.fromarray(a), "TIFF"), "L", (a >> 23).astype(np.uint8)


def _float_tiff():
    a = RNG.random((SIDE, SIDE), dtype=np.float32)
    return _saved(Image.fromarray(a), "TIFF"), "F", np.rint(a * 255).astype(np.uint8)


def _rgb16_png():
    a = _u16(3)
    return _png(a, 16, 2), "RGB", (a >> 8).astype(np.uint8)


def _rgba16_png():
    a = _u16(4)
    b = (a >> 8).astype(np.uint8)
    return _png(a, 16, 6), "RGB", _over_black(b[..., :3], b[..., 3])


def _la16_png():
    a = _u16(2)
    b = (a >> 8).astype(np.uint8)
    return _png(a, 16, 4), "L", _over_black(b[..., 0], b[..., 1])


def _palette(grey: bool, alpha: bool):
    index = RNG.integers(0, 16, (SIDE, SIDE), dtype=np.uint8)
    colours = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    if grey:
        colours[:, 1] = colours[:, 2] = colours[:, 0]
    chunks = [(b"PLTE", colours.tobytes())]
    rgb = colours[index]
    if alpha:
        alphas = RNG.integers(0, 256, 16, dtype=np.uint8)
        chunks.append((b"tRNS", alphas.tobytes()))
        rgb = _over_black(rgb, alphas[index])
    return _png(index, 8, 3, tuple(chunks)), "L" if grey else "RGB", rgb[..., 0] if grey else rgb


def _cmyk_tiff():
    a = RNG.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    nk = 255 - a[..., 3:].astype(np.int64)
    rgb = nk - np.rint(a[..., :3] * nk / 255).astype(np.int64)  # naive CMYK, no ICC profile
    return _saved(Image.fromarray(a, "CMYK"), "TIFF"), "RGB", rgb.astype(np.uint8)


def _la_png():
    a = RNG.integers(0, 256, (SIDE, SIDE, 2), dtype=np.uint8)
    return _png(a, 8, 4), "L", _over_black(a[..., 0], a[..., 1])


def _rgba_png():
    a = RNG.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    return _png(a, 8, 6), "RGB", _over_black(a[..., :3], a[..., 3])


def _bilevel_png():
    a = RNG.integers(0, 2, (SIDE, SIDE)).astype(bool)
    img = Image.fromarray(a)
    assert img.mode == "1"
    return _saved(img, "PNG"), "L", np.where(a, 255, 0).astype(np.uint8)


def _plain(channels: int):
    a = RNG.integers(0, 256, (SIDE, SIDE, channels), dtype=np.uint8).squeeze()
    return _saved(Image.fromarray(a), "PNG"), "L" if channels == 1 else "RGB", a


# name -> () -> (file bytes, expected mode, expected uint8 pixels)
CASES: dict[str, Callable[[], tuple[bytes, str, np.ndarray]]] = {
    "I;16 png": _grey16_png,
    "I;16B tiff": _grey16b_tiff,
    "12-bit tiff": _grey12_tiff,
    "I 32-bit tiff": _int32_tiff,
    "F tiff 0..1": _float_tiff,
    "16-bit RGB png": _rgb16_png,
    "16-bit RGBA png": _rgba16_png,
    "16-bit LA png": _la16_png,
    "P colour": lambda: _palette(grey=False, alpha=False),
    "P grey": lambda: _palette(grey=True, alpha=False),
    "P transparency": lambda: _palette(grey=False, alpha=True),
    "CMYK tiff": _cmyk_tiff,
    "LA png": _la_png,
    "RGBA png": _rgba_png,
    "1-bit png": _bilevel_png,
    "L png": lambda: _plain(1),
    "RGB png": lambda: _plain(3),
}
GENERATED = {name: make() for name, make in CASES.items()}


def _mode_of(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return img.mode


def _as_hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy().squeeze(-1) if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_each_mode_converts_to_the_faithful_pixels(name, tmp_path):
    data, source_mode, expected = GENERATED[name]
    path = tmp_path / "image.png"
    path.write_bytes(data)
    img = load_image(path)
    mode = "L" if expected.ndim == 2 else "RGB"
    assert img.mode == mode, (name, _mode_of(data), img.mode)
    np.testing.assert_array_equal(np.asarray(img), expected, err_msg=name)
    # the loaders read shards of other tools by the same rules (grey kept to one channel)
    np.testing.assert_array_equal(_as_hwc(decode_uint8(data)), expected, err_msg=name)
    rgb = np.asarray(decode_pil(data))
    np.testing.assert_array_equal(rgb, expected if mode == "RGB" else np.dstack([expected] * 3))


def test_pillow_opens_the_sources_as_the_table_says():
    """What Pillow 12 makes of each source: if a Pillow upgrade changes it, the rules above
    need a look (16-bit RGB PNGs open as RGB by their high byte, 16-bit LA as RGBA)."""
    modes = {name: _mode_of(data) for name, (data, _, _) in GENERATED.items()}
    assert modes["I;16 png"] == "I;16" and modes["I;16B tiff"] == "I;16B"
    assert modes["12-bit tiff"] == "I;16" and modes["I 32-bit tiff"] == "I"
    assert modes["F tiff 0..1"] == "F" and modes["16-bit RGB png"] == "RGB"
    assert modes["16-bit LA png"] == "RGBA" and modes["P transparency"] == "P"
    assert modes["CMYK tiff"] == "CMYK" and modes["1-bit png"] == "1"


def _bad_sources() -> dict[str, tuple[bytes, str]]:
    negative = np.full((4, 4), -5, dtype=np.int32)
    raw = np.full((4, 4), 200.0, dtype=np.float32)
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    return {
        "negative I": (_saved(Image.fromarray(negative), "TIFF"), "pixel values -5..-5 outside"),
        "F 0..255": (_saved(Image.fromarray(raw), "TIFF"), "floating-point pixels in [200, 200]"),
        "F nan": (_saved(Image.fromarray(nan), "TIFF"), "floating-point pixels in [nan, nan]"),
        "LAB": (_saved(Image.new("LAB", (4, 4)), "TIFF"), "unsupported image mode 'LAB'"),
    }


@pytest.mark.parametrize("name", ["negative I", "F 0..255", "F nan", "LAB"])
def test_pixels_without_a_faithful_8bit_scale_are_an_error_naming_the_file(name, tmp_path):
    data, what = _bad_sources()[name]
    path = tmp_path / "odd.png"
    path.write_bytes(data)
    with pytest.raises(BadImageError, match="odd.png") as exc:
        load_image(path)
    assert what in str(exc.value) and "\n" not in str(exc.value)


def _replace_images(root: Path, modality: str, split: str, sources: list[bytes]) -> list[str]:
    """Overwrite the first images listed in a split with `sources`; returns their names."""
    samples, _ = read_split(root, modality, split, seen={})
    for s, data in zip(samples, sources, strict=False):
        s.path.write_bytes(data)
    return [s.name for s in samples[: len(sources)]]


def test_converted_shards_hold_the_faithful_pixels_and_verify_agrees(fresh_root, tmp_path):
    names = _replace_images(fresh_root, "fundus", "dev", [d for d, _, _ in GENERATED.values()])
    expected = dict(zip(names, [e for _, _, e in GENERATED.values()], strict=True))
    out = tmp_path / "shards"
    opts = ConvertOptions(modalities=("fundus",), splits=("dev",), shard_samples=7, workers=1)
    summary = convert(fresh_root, out, opts, progress=False)
    assert summary.table()  # converted
    seen = {}
    for tar in sorted(out.glob("fundus-dev-*.tar")):
        for sample in iter_samples(tar):
            name = json.loads(sample["json"])["name"]
            with Image.open(io.BytesIO(sample["png"])) as img:
                seen[name] = np.asarray(img.convert(img.mode))
    manifest = json.loads((out / "fundus-dev.manifest.json").read_text())
    assert manifest["num_samples"] == len(seen) == 18 and not manifest["skipped"]
    for name, want in expected.items():
        np.testing.assert_array_equal(seen[name], want, err_msg=name)
    report = verify(out)
    assert report.ok, report.text()


# ------------------------------------------------------------------ decompression bombs


def _bomb_png(width: int, height: int) -> bytes:
    """A grey PNG header of width x height with a token IDAT: PIL's limit is checked on the
    header, before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# PIL's default limit is 89,478,485 pixels; it raises over twice that and only warns between.
WARN_TIER = (10_000, 10_000)  # 1.0e8 pixels
ERROR_TIER = (20_000, 10_000)  # 2.0e8 pixels


@pytest.mark.parametrize("size", [WARN_TIER, ERROR_TIER], ids=["warning-tier", "error-tier"])
def test_conversion_refuses_a_decompression_bomb_naming_the_file(size, tmp_path):
    assert Image.MAX_IMAGE_PIXELS < size[0] * size[1]
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(*size))
    with pytest.raises(BadImageError, match=r"bomb\.png: .*decompression-bomb limit") as exc:
        load_image(path)
    assert f"{size[0] * size[1]} pixels" in str(exc.value)


def test_bomb_in_a_conversion_stops_it_and_skip_bad_records_it(fresh_root, tmp_path, capsys):
    [name] = _replace_images(fresh_root, "fundus", "dev", [_bomb_png(*WARN_TIER)])
    path = str(read_split(fresh_root, "fundus", "dev", seen={})[0][0].path)
    argv = ["shards", "convert", "--root", str(fresh_root), "--modality", "fundus"]
    argv += ["--splits", "dev", "--workers", "1", "--no-progress"]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert path in err and "decompression-bomb limit" in err, err
    names = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not [n for n in names if n.endswith(".manifest.json") or is_temp_name(n)], names
    skipped_out = tmp_path / "skipped"
    assert main([*argv, "--out", str(skipped_out), "--skip-bad"]) == 0
    manifest = json.loads((skipped_out / "fundus-dev.manifest.json").read_text())
    [skipped] = manifest["skipped"]
    assert skipped["name"] == name and "decompression-bomb limit" in skipped["reason"]
    assert manifest["num_samples"] == manifest["num_listed"] - 1


def test_explain_refuses_a_bomb_and_reads_16bit_as_its_8bit_equivalent(
    teacher_ckpt, tmp_path, capsys
):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(*WARN_TIER))
    assert main(["explain", "--checkpoint", str(teacher_ckpt), str(bomb)]) == 2
    err = capsys.readouterr().err
    assert str(bomb) in err and "decompression-bomb limit" in err, err
    grey = _u16()
    deep, flat, clipped = (tmp_path / f"{n}.png" for n in ("deep", "flat", "clipped"))
    deep.write_bytes(_saved(Image.fromarray(grey), "PNG"))
    Image.fromarray((grey >> 8).astype(np.uint8)).save(flat)
    Image.fromarray(np.minimum(grey, 255).astype(np.uint8)).save(clipped)  # PIL's convert("L")
    images = [str(deep), str(flat), str(clipped)]
    assert main(["explain", "--checkpoint", str(teacher_ckpt), "--json", *images]) == 0
    probs = [r["probabilities"] for r in json.loads(capsys.readouterr().out)]
    assert probs[0] == probs[1] and probs[0] != probs[2]


@pytest.fixture
def small_limit(monkeypatch) -> int:
    """PIL's documented limit lowered so that a real, fully decodable image is over it: the
    loaders must refuse it rather than decode it (old behaviour in the warning tier)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    return 64 * 64


def test_loaders_refuse_images_over_the_limit(small_limit):
    for side in (80, 100):  # warning tier (6,400 px), error tier (10,000 px > 2 x 4,096)
        data = _saved(Image.new("L", (side, side), 7), "PNG")
        for decode in (decode_uint8, decode_pil):
            with pytest.raises(BadImageError, match="decompression-bomb limit"):
                decode(data)
    assert decode_uint8(_saved(Image.new("L", (64, 64), 7), "PNG")).shape == (1, 64, 64)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_stream_counts_a_bomb_sample_with_shard_and_key(
    shards, tmp_path, small_limit, augment_on, caplog
):
    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    shard = d / json.loads((d / "fundus-dev.manifest.json").read_text())["shards"][0]["name"]
    samples = list(iter_samples(shard))
    for s, side in zip(samples[:2], (80, 100), strict=True):
        s["png"] = _saved(Image.new("RGB", (side, side), (9, 9, 9)), "PNG")
    with open(shard, "wb") as fh:
        write_samples(fh, samples)
    bombs = [s["__key__"] for s in samples[:2]]
    stream = EvalStream(
        ShardSet.from_manifest(d, "fundus", "dev"), 32, 4, rank=0, world=1,
        max_bad_fraction=0.5, augment_on=augment_on,
    )  # fmt: skip
    batches = list(stream)
    keys = [k for b in batches for k in b.keys]
    assert not set(bombs) & set(keys) and len(keys) == 18 - 2
    assert batches[-1].stats.bad == 2
    assert batches[-1].stats.bad_examples == [f"{shard}:{k}" for k in bombs]
    logged = caplog.text
    assert all(k in logged for k in bombs) and str(shard) in logged


# ------------------------------------------------------------------ label files


def _label_lines(root: Path, split: str = "dev") -> list[str]:
    return label_file(root, "fundus", split).read_text(encoding="utf-8").splitlines()


def _write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())


def test_a_byte_order_mark_is_accepted_in_label_files_sidecars_and_findings_json(fresh_root):
    before = attach_findings(fresh_root, read_layout(fresh_root, ("fundus",), ("dev",)))
    for path in (
        label_file(fresh_root, "fundus", "dev"),
        findings_file(fresh_root, "fundus", "dev"),
    ):
        _write(path, path.read_text(encoding="utf-8").splitlines(), bom=True)
    findings_json = fresh_root / "findings.json"
    findings_json.write_bytes(b"\xef\xbb\xbf" + findings_json.read_bytes())
    after = attach_findings(fresh_root, read_layout(fresh_root, ("fundus",), ("dev",)))
    assert after == before and not after[("fundus", "dev")][1]
    assert after[("fundus", "dev")][0][0].findings is not None


BAD_LABELS = {
    "arabic-indic": ("{name} \u0663", "label '\u0663' is not an integer"),
    "plus": ("{name} +3", "label '+3' is not an integer"),
    "float": ("{name} 3.0", "label '3.0' is not an integer"),
    "underscore": ("{name} 0_3", "label '0_3' is not an integer"),
    "fullwidth": ("{name} \uff13", "label '\uff13' is not an integer"),
    "nbsp-after": ("{name} 3\u00a0", "label '3\\xa0' is not an integer"),
    "nbsp-between": ("{name}\u00a03", "expected 'name label' (2 fields, got 1)"),
    "minus-zero": ("{name} -0", "label -0 outside 0..8"),
    "huge": ("{name} " + "9" * 5000, "label 99999999999999999999... outside 0..8"),
}


@pytest.mark.parametrize("kind", list(BAD_LABELS))
def test_labels_are_ascii_digits_or_an_error_naming_file_and_line(
    fresh_root, tmp_path, kind, capsys
):
    lines = _label_lines(fresh_root)
    template, what = BAD_LABELS[kind]
    lines[2] = template.format(name=lines[2].split()[0])
    lf = label_file(fresh_root, "fundus", "dev")
    _write(lf, lines)
    _, bad = read_split(fresh_root, "fundus", "dev", seen={})
    assert len(bad) == 1 and bad[0].line == 3 and what in bad[0].reason, bad
    out = tmp_path / "out"
    argv = ["shards", "convert", "--root", str(fresh_root), "--out", str(out)]
    assert main([*argv, "--modality", "fundus", "--splits", "dev", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{lf}:3" in err and what in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # found before anything is written


def test_documented_label_forms_are_still_accepted(fresh_root):
    lines = _label_lines(fresh_root)
    want = [(ln.split()[0], int(ln.split()[1])) for ln in lines]
    n0, l0 = want[0]
    n1, l1 = want[1]
    n2, l2 = want[2]
    lines[0] = f"{n0}\t{l0}"  # tab
    lines[1] = f"  {n1}   0{l1}  \r"  # blanks around, a leading zero, a CRLF line end
    lines[2] = f"{n2} {l2}"
    _write(label_file(fresh_root, "fundus", "dev"), lines + ["", "   "])
    samples, bad = read_split(fresh_root, "fundus", "dev", seen={})
    assert not bad and [(s.name, s.label) for s in samples] == want


def test_line_numbers_count_newlines_only(fresh_root):
    """A Unicode line separator inside a name is not a line break (str.splitlines() made it
    one, and every later line number was off by one)."""
    lines = _label_lines(fresh_root)
    lines[1] = lines[1].replace(" ", "\u2028x ", 1)
    lines[4] = f"{lines[4].split()[0]} 9"
    _write(label_file(fresh_root, "fundus", "dev"), lines)
    _, bad = read_split(fresh_root, "fundus", "dev", seen={})
    assert [(b.line, b.reason.split(" ")[0]) for b in bad] == [(2, "missing"), (5, "label")]


@pytest.mark.parametrize("index", ["\u0663", "+1", "1_0"])
def test_finding_indices_are_ascii_digits(fresh_root, index):
    side = findings_file(fresh_root, "fundus", "dev")
    lines = side.read_text(encoding="utf-8").splitlines()
    lines[3] = f"{lines[3].split()[0]} {index}"
    _write(side, lines)
    layout = read_layout(fresh_root, ("fundus",), ("dev",))
    with pytest.raises(LayoutError, match=rf"findings\.txt:4 .*{re.escape(repr(index))} is not"):
        attach_findings(fresh_root, layout)


# ------------------------------------------------------------------ command-line values

BAD_VALUES = [
    (["synth", "--out", "{tmp}/s"], "--per-class", "0"),
    (["synth", "--out", "{tmp}/s"], "--fundus-per-class", "-1"),
    (["synth", "--out", "{tmp}/s"], "--workers", "0"),
    (["synth", "--out", "{tmp}/s"], "--seed", "-3"),
    (["synth", "--out", "{tmp}/s"], "--imbalance", "nan"),
    (["synth", "--out", "{tmp}/s"], "--fundus-visibility", "0"),
    (["shards", "convert", "--root", "{tmp}", "--out", "{tmp}/o"], "--workers", "-1"),
    (["shards", "convert", "--root", "{tmp}", "--out", "{tmp}/o"], "--shard-samples", "0"),
    (["shards", "convert", "--root", "{tmp}", "--out", "{tmp}/o"], "--shard-bytes", "0MB"),
    (["shards", "verify", "--shards", "{tmp}"], "--workers", "-2"),
    (["eval", "--checkpoint", "c", "--shards", "{tmp}"], "--batch-size", "0"),
    (["eval", "--checkpoint", "c", "--shards", "{tmp}"], "--workers", "-1"),
    (["explain", "--checkpoint", "c", "img.png"], "--topk", "0"),
    (["demo", "--out", "{tmp}/d"], "--per-class", "-5"),
    (["demo", "--out", "{tmp}/d"], "--workers", "many"),
    (["import", "release", "ckpt", "--out", "o", "--role", "student"], "--image-size", "0"),
]


@pytest.mark.parametrize(
    "argv,option,value", BAD_VALUES, ids=[f"{a[0]}{o}={v}" for a, o, v in BAD_VALUES]
)
def test_bad_numeric_options_exit_2_naming_the_option(argv, option, value, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in argv] + [option, value]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"argument {option}: {value}" in err or f"argument {option}: '{value}'" in err, err
    assert len(err.strip().splitlines()[-1]) < 200
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_documented_zero_values_still_parse(tmp_path):
    parse = build_parser().parse_args
    assert parse(["shards", "verify", "--shards", str(tmp_path), "--workers", "0"]).workers == 0
    assert parse(["demo", "--workers", "0"]).workers == 0
    args = ["shards", "convert", "--root", "r", "--out", "o", "--workers", "0", "--shard-bytes"]
    assert parse([*args, "64k"]).shard_bytes == 65536
    assert parse(["eval", "--checkpoint", "c", "--shards", "s", "--workers", "0"]).workers == 0
    assert parse(["synth", "--out", "o", "--seed", "0", "--imbalance", "1"]).imbalance == 1.0
