"""The device augmentation against timm's CPU transform: per-sample randomness, determinism, the
distribution of every draw (timm's own objects on the other side, with negative controls that
show each test fails a wrong distribution), each op against PIL on fixed parameters, the whole
RandAugment stage against timm's op functions sample by sample, grey inputs, bad strings."""

from __future__ import annotations

import dataclasses
import math
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import auto_augment as aa
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from multieye_dist.data import device_augment as da
from multieye_dist.data.device_augment import AugmentParams, EvalResize, TrainAugment

S = 48  # small output size: the tests run on one CPU core
N_DRAWS = 3000  # per side of each distribution test
P_MIN = 1e-3  # a right distribution passes (fixed seeds); the negative controls reach < 1e-6
INT_ARG_OPS = {"Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def texture(h: int, w: int, seed: int, grey: bool = False) -> np.ndarray:
    """uint8 [h, w, 3] (or [h, w]): waves, noise, a flat block, channels that differ."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 70 * np.sin(xx / 5.0 + seed) * np.cos(yy / 7.0) + r.normal(0, 20, (h, w))
    if grey:
        base[h // 8 : h // 3, w // 2 : w // 2 + w // 4] = 210
        return base.clip(0, 255).astype(np.uint8)
    img = np.stack([base, 0.6 * np.roll(base, 9, 1) + 40, 230 - 0.8 * base], -1)
    img[h // 8 : h // 3, w // 2 : w // 2 + w // 4] = [200, 30, 90]
    return img.clip(0, 255).astype(np.uint8)


def batch(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images))
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """Integer-valued float [C, H, W] -> int [H, W, C]."""
    return x.permute(1, 2, 0).numpy().astype(np.int64)


def pil_op(img: Image.Image, name: str, arg: float) -> Image.Image:
    """timm's op function, called as AugmentOp calls it in transforms_imagenet_train."""
    fn = aa.NAME_TO_OP[name]
    kwargs = dict(fillcolor=da.FILL, resample=Image.BICUBIC)
    if aa.LEVEL_TO_ARG[name] is None:
        return fn(img, **kwargs)
    return fn(img, int(arg) if name in INT_ARG_OPS else float(arg), **kwargs)


def apply_op(images: torch.Tensor, name: str, args: list[float]) -> torch.Tensor:
    """One device op by timm's name (the function TrainAugment runs for it), each sample with its
    own argument as timm's op function takes it (degrees, factor, bits, ...), on uint8
    ``[n, C, S, S]``; returns float32. Geometric ops need three channels (timm's fill colour is
    not grey)."""
    x = images.to(torch.float32)
    n, c, h, w = x.shape
    assert len(args) == n and (name not in da.GEOMETRIC_OPS or (c == 3 and h == w))
    arg = torch.tensor([float(a) for a in args], dtype=torch.float64)
    affine = torch.tensor([da.affine_coeffs(name, float(a), w) for a in args], dtype=torch.float64)
    fill = torch.tensor(da.FILL[:c], dtype=torch.float32)
    return da._device_op(name)(x, arg, affine.view(n, 6), fill)


def chi2_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square (homogeneity) on category counts."""
    table = np.stack([a, b])
    table = table[:, table.sum(0) > 0]
    return float(stats.chi2_contingency(table)[1])


def same_params(p: AugmentParams, q: AugmentParams) -> bool:
    host = (p.crops, p.op_counts, p.erase_seed, p.n_erased) == (
        q.crops,
        q.op_counts,
        q.erase_seed,
        q.n_erased,
    )
    return host and all(torch.equal(getattr(p, f), getattr(q, f)) for f in AugmentParams.TENSORS)


# --------------------------------------------------------------------------- randomness


def test_every_sample_gets_its_own_augmentation():
    aug = TrainAugment(S)
    x = batch([texture(70, 90, 0)] * 8)
    p = aug.draw(np.random.default_rng(0), [(70, 90)] * 8)
    out = aug(x, p)
    assert out.shape == (8, 3, S, S) and out.dtype == torch.float32
    flat = out.flatten(1)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(flat[i], flat[j]), (i, j)
    assert len(set(p.crops)) == 8
    for layer in p.ops:
        assert len(set(layer.tolist())) >= 3  # ops drawn per sample, not per batch
    assert 0 < int(p.flip.sum()) < 8


def test_same_seed_same_params_and_output():
    aug = TrainAugment(S, re_prob=0.5)
    x = batch([texture(60, 80, i) for i in range(8)])
    sizes = [(60, 80)] * 8
    p1, p2 = aug.draw(np.random.default_rng(5), sizes), aug.draw(np.random.default_rng(5), sizes)
    p3 = aug.draw(np.random.default_rng(6), sizes)
    assert same_params(p1, p2) and not same_params(p1, p3)
    assert p1.n_erased > 0  # the erasing noise is part of what must repeat
    out = aug(x, p1)
    assert torch.equal(out, aug(x, p2)) and torch.equal(out, aug(x, p1))
    assert not torch.equal(out, aug(x, p3))


def test_map_tensors_moves_every_tensor():
    p = TrainAugment(S).draw(np.random.default_rng(0), [(50, 50)] * 4)
    q = p.map_tensors(lambda t: t.to(torch.float16))
    assert all(getattr(q, f).dtype == torch.float16 for f in AugmentParams.TENSORS)
    assert (q.crops, q.op_counts, q.erase_seed) == (p.crops, p.op_counts, p.erase_seed)


# --------------------------------------------------------------------------- distributions


class _Recorder:
    """Wraps a timm AugmentOp: logs (name, args), args None when the op's p=0.5 skips it."""

    def __init__(self, op: aa.AugmentOp, log: list):
        self.op, self.log = op, log

        def record(img, *args, **kwargs):
            log[-1][1] = args
            return img

        op.aug_fn = record

    def __call__(self, img):
        self.log.append([self.op.name, None])
        return self.op(img)


def timm_rand_augment_records(n: int) -> list[list]:
    """Per image, the two layers' (name, args) from timm's RandAugment as the release builds it."""
    hparams = dict(translate_const=int(S * 0.45), img_mean=da.FILL, interpolation=Image.BICUBIC)
    ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    log: list = []
    ra.ops = [_Recorder(op, log) for op in ra.ops]
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (8, 8))
    records = []
    for _ in range(n):
        log.clear()
        ra(img)
        records.append([tuple(r) for r in log])
    return records


@pytest.fixture(scope="module")
def ra_samples():
    """(timm records, our params) for N_DRAWS images."""
    ours = TrainAugment(S).draw(np.random.default_rng(1), [(S, S)] * N_DRAWS)
    return timm_rand_augment_records(N_DRAWS), ours


def _op_counts(ids: np.ndarray) -> np.ndarray:
    return np.bincount(ids, minlength=len(da.RAND_INCREASING_OPS) + 1)


def test_op_frequencies_match_timm(ra_samples):
    records, ours = ra_samples
    names = list(da.RAND_INCREASING_OPS)
    assert names == aa._RAND_INCREASING_TRANSFORMS
    ref = np.array(
        [[names.index(r[0]) if r[1] is not None else 15 for r in rec] for rec in records]
    ).T  # [layer, image]: 15 = the layer's p = 0.5 skipped it
    for layer in range(2):
        mine = ours.ops[layer].numpy()
        p = chi2_p(_op_counts(ref[layer]), _op_counts(mine))
        assert p > P_MIN, (layer, p)
        assert abs((mine == 15).mean() - 0.5) < 0.04
    pooled = _op_counts(ref.ravel())
    assert chi2_p(pooled, _op_counts(ours.ops.numpy().ravel())) > P_MIN
    # negative controls, same sample size: a skewed op choice, another p per layer
    rng, n = np.random.default_rng(2), ref.size
    weights = np.ones(15)
    weights[[3, 11]] = 2.0  # Rotate and ShearX twice as likely
    chosen = rng.choice(15, n, p=weights / weights.sum())
    skewed = np.where(rng.random(n) < 0.5, chosen, 15)
    assert chi2_p(pooled, _op_counts(skewed)) < 1e-6
    other_p = np.where(rng.random(n) < 0.6, rng.integers(0, 15, n), 15)
    assert chi2_p(pooled, _op_counts(other_p)) < 1e-6


def _timm_args(records, name: str) -> np.ndarray:
    return np.array([r[1][0] for rec in records for r in rec if r[0] == name and r[1] is not None])


def _our_args(params: AugmentParams, name: str) -> np.ndarray:
    ops, args = params.ops.numpy(), params.args.numpy()
    return args[ops == da.RAND_INCREASING_OPS.index(name)]


@pytest.mark.parametrize("name", ["Rotate", "ColorIncreasing", "TranslateXRel"])
def test_continuous_args_match_timm(ra_samples, name):
    records, ours = ra_samples
    ref, mine = _timm_args(records, name), _our_args(ours, name)
    assert len(ref) > 150 and len(mine) > 150
    assert stats.ks_2samp(ref, mine).pvalue > P_MIN
    assert (mine < 0).any() == (ref < 0).any()
    if name == "Rotate":  # negative controls: no magnitude noise, or no random sign
        fixed = TrainAugment(S, auto_augment="rand-m9-mstd0-inc1")
        p = fixed.draw(np.random.default_rng(1), [(S, S)] * N_DRAWS)
        assert stats.ks_2samp(np.abs(ref), np.abs(_our_args(p, name))).pvalue < 1e-6
        assert stats.ks_2samp(ref, np.abs(mine)).pvalue < 1e-6


@pytest.mark.parametrize("name", ["SolarizeIncreasing", "PosterizeIncreasing", "SolarizeAdd"])
def test_discrete_args_match_timm(ra_samples, name):
    records, ours = ra_samples
    ref, mine = _timm_args(records, name).astype(int), _our_args(ours, name).astype(int)
    values = np.union1d(ref, mine)
    count = [np.array([(v == x).sum() for x in values]) for v in (ref, mine)]
    assert chi2_p(*count) > P_MIN, (name, values, count)


def _crop_features(crops, h: int, w: int) -> dict[str, np.ndarray]:
    c = np.asarray(crops, dtype=np.float64)  # top, left, h, w
    return {
        "scale": c[:, 2] * c[:, 3] / (h * w),
        "log_aspect": np.log(c[:, 3] / c[:, 2]),
        "centre_y": (c[:, 0] + c[:, 2] / 2) / h,
        "centre_x": (c[:, 1] + c[:, 3] / 2) / w,
    }


@pytest.mark.parametrize("size", [(300, 400), (600, 150)])  # (600, 150): often the fallback
def test_crop_distribution_matches_timm(size):
    h, w = size
    random.seed(0)
    img = Image.new("L", (w, h))
    ref_crops = [
        RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        for _ in range(N_DRAWS)
    ]
    aug = TrainAugment(S)
    mine_crops = aug.draw(np.random.default_rng(3), [size] * N_DRAWS).crops
    ref, mine = _crop_features(ref_crops, h, w), _crop_features(mine_crops, h, w)
    for key in ref:
        assert stats.ks_2samp(ref[key], mine[key]).pvalue > P_MIN, key
    fallback = aug._centre_crop(h, w)
    n_fb = [sum(tuple(c) == fallback for c in cs) for cs in (ref_crops, mine_crops)]
    assert (
        chi2_p(np.array([n_fb[0], N_DRAWS - n_fb[0]]), np.array([n_fb[1], N_DRAWS - n_fb[1]]))
        > P_MIN
    )
    if size == (300, 400):  # negative control: scale range (0.25, 1)
        aug.scale = (0.25, 1.0)
        wrong = _crop_features(aug.draw(np.random.default_rng(3), [size] * N_DRAWS).crops, h, w)
        assert stats.ks_2samp(ref["scale"], wrong["scale"]).pvalue < 1e-6
    else:
        assert n_fb[1] > 100


def _timm_erase_boxes(n: int, s: int) -> list[tuple[int, int, int, int] | None]:
    random.seed(0)
    torch.manual_seed(0)
    re_ = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    boxes = []
    for _ in range(n):
        t = torch.zeros(3, s, s)
        re_(t)
        hit = t.abs().sum(0) > 0
        if not hit.any():
            boxes.append(None)
            continue
        rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
        boxes.append((int(rows[0]), int(cols[0]), len(rows), len(cols)))
    return boxes


def test_erasing_distribution_matches_timm():
    ref_boxes = [b for b in _timm_erase_boxes(N_DRAWS, S) if b is not None]
    params = TrainAugment(S).draw(np.random.default_rng(4), [(S, S)] * N_DRAWS)
    mine_boxes = [tuple(b) for b in params.erase.tolist() if b[2] > 0]
    counts = [np.array([len(b), N_DRAWS - len(b)]) for b in (ref_boxes, mine_boxes)]
    assert chi2_p(*counts) > P_MIN
    assert stats.binomtest(len(mine_boxes), N_DRAWS, 0.25).pvalue > P_MIN
    assert params.n_erased == len(mine_boxes)
    ref, mine = np.asarray(ref_boxes, float), np.asarray(mine_boxes, float)
    for f in (
        lambda b: b[:, 2] * b[:, 3] / S**2,  # area
        lambda b: np.log(b[:, 2] / b[:, 3]),  # aspect
        lambda b: b[:, 0] + b[:, 2] / 2,  # centre
    ):
        assert stats.ks_2samp(f(ref), f(mine)).pvalue > P_MIN
    # negative controls: another probability, another area range
    wrong = TrainAugment(S, re_prob=0.35).draw(np.random.default_rng(4), [(S, S)] * N_DRAWS)
    n_wrong = int((wrong.erase[:, 2] > 0).sum())
    assert chi2_p(counts[0], np.array([n_wrong, N_DRAWS - n_wrong])) < 1e-6
    aug = TrainAugment(S)
    aug.re_area = (0.02, 0.5)
    wide = aug.draw(np.random.default_rng(4), [(S, S)] * N_DRAWS).erase.numpy().astype(float)
    wide = wide[wide[:, 2] > 0]
    assert stats.ks_2samp(ref[:, 2] * ref[:, 3], wide[:, 2] * wide[:, 3]).pvalue < 1e-6


# --------------------------------------------------------------------------- ops vs PIL


def _crop_params(aug: TrainAugment, crops, flips) -> AugmentParams:
    p = aug.draw(np.random.default_rng(0), [(1, 1)] * len(crops))
    return dataclasses.replace(p, crops=list(crops), flip=torch.tensor(flips))


def test_crop_resize_and_flip_match_pil():
    img = texture(90, 120, 1)
    crops = [(10, 20, 60, 80), (0, 0, 90, 120), (40, 50, 9, 7), (5, 5, S, S), (1, 2, 70, 31)]
    aug = TrainAugment(S)
    x = batch([img] * len(crops))
    out = aug.crop_flip(x, _crop_params(aug, crops, [False] * len(crops)))
    flipped = aug.crop_flip(x, _crop_params(aug, crops, [True] * len(crops)))
    assert torch.equal(flipped, out.flip(3))
    for i, (top, left, h, w) in enumerate(crops):
        ref = (
            Image.fromarray(img).crop((left, top, left + w, top + h)).resize((S, S), Image.BICUBIC)
        )
        d = np.abs(np.asarray(ref, dtype=np.int64) - to_numpy(out[i]))
        assert d.max() <= 1 and d.mean() < 0.01, ((top, left, h, w), d.max(), d.mean())
        ref_flip = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT), dtype=np.int64)
        assert np.abs(ref_flip - to_numpy(flipped[i])).max() <= 1


OP_ARGS = {
    "Rotate": [27.3, -13.0, 0.0, -30.0],
    "ShearX": [0.27, -0.3, 0.1, 0.0],
    "ShearY": [0.27, -0.3, 0.05, -0.12],
    "TranslateXRel": [0.4, -0.45, 0.123, 0.0],
    "TranslateYRel": [0.4, -0.45, 0.123, -0.01],
    "AutoContrast": [0, 0, 0, 0],
    "Equalize": [0, 0, 0, 0],
    "Invert": [0, 0, 0, 0],
    "PosterizeIncreasing": [0, 1, 2, 4],
    "SolarizeIncreasing": [0, 26, 128, 256],
    "SolarizeAdd": [0, 99, 110, 50],
    "ColorIncreasing": [0.1, 0.19, 1.81, 1.9],
    "ContrastIncreasing": [0.1, 0.37, 1.55, 1.9],
    "BrightnessIncreasing": [0.1, 0.55, 1.45, 1.9],
    "SharpnessIncreasing": [0.1, 0.3, 1.7, 1.9],
    # inc0's names (same PIL functions, other level-to-arg)
    "Posterize": [3, 0, 4, 8],
    "Solarize": [230, 0, 77, 256],
    "Color": [0.1, 1.0, 1.45, 1.9],
}


@pytest.mark.parametrize("name", list(OP_ARGS))
def test_op_matches_pil(name):
    """Every op, per-sample arguments in one batch, against timm's op on the PIL image (the
    geometric ops over the whole image, fill included). Measured: identical on x86-64."""
    args = OP_ARGS[name]
    images = [texture(S, S, i) for i in range(len(args))]
    out = apply_op(batch(images), name, args)
    for i, a in enumerate(args):
        ref = np.asarray(pil_op(Image.fromarray(images[i]), name, a), dtype=np.int64)
        d = np.abs(ref - to_numpy(out[i]))
        assert d.max() <= 1 and d.mean() < 0.002, (name, a, d.max(), d.mean())


def test_rand_augment_stage_matches_timm_ops_per_sample():
    """The grouped, batched RandAugment stage against timm's op functions applied sample by
    sample with each sample's drawn ops and arguments, in layer order."""
    aug = TrainAugment(S)
    b = 40
    x = batch([texture(64, 72, i) for i in range(b)])
    p = aug.draw(np.random.default_rng(7), [(64, 72)] * b)
    start = aug.crop_flip(x, p)
    out = aug.rand_augment(start, p)
    applied = {int(o) for o in p.ops.flatten() if o < 15}
    assert len(applied) >= 12  # most ops are exercised
    for i in range(b):
        img = Image.fromarray(to_numpy(start[i]).astype(np.uint8))
        for layer in range(2):
            op = int(p.ops[layer, i])
            if op < 15:
                img = pil_op(img, aug.op_names[op], float(p.args[layer, i]))
        d = np.abs(np.asarray(img, dtype=np.int64) - to_numpy(out[i]))
        assert d.max() <= 1 and d.mean() < 0.002, (i, p.ops[:, i].tolist(), d.max(), d.mean())


@pytest.mark.parametrize("size,shape", [(224, (250, 300)), (S, (90, 70))])
def test_eval_resize_matches_eval_transform(size, shape):
    from multieye_dist.data.transforms import eval_transform

    img = texture(*shape, 3)
    ref = eval_transform(size)(Image.fromarray(img))
    out = EvalResize(size)(batch([img]))[0]
    assert out.shape == ref.shape == (3, size, size)
    d = (out - ref).abs()
    assert d.max() < 0.02 and d.mean() < 1e-3, (d.max(), d.mean())  # one grey level: 0.0175
    grey = batch([texture(*shape, 3, grey=True)])
    assert torch.equal(EvalResize(size)(grey), EvalResize(size)(grey.expand(-1, 3, -1, -1)))


def test_erasing_after_normalisation():
    s = 96
    aug = TrainAugment(s, re_prob=1.0)
    p = aug.draw(np.random.default_rng(8), [(s, s)] * 6)
    assert p.n_erased == 6
    x = torch.from_numpy(np.stack([texture(s, s, i) for i in range(6)])).permute(0, 3, 1, 2)
    x = x.float()
    clean = dataclasses.replace(p, n_erased=0)
    normalised = aug.finish(x, clean)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(normalised, (x / 255 - mean) / std, atol=1e-6)
    out = aug.finish(x, p)
    for i, (top, left, h, w) in enumerate(p.erase.tolist()):
        box = out[i, :, top : top + h, left : left + w]
        assert box.numel() >= 3 * 0.02 * s * s * 0.9
        assert abs(float(box.std()) - 1.0) < 0.15 and abs(float(box.mean())) < 0.15
        rest = torch.ones(s, s, dtype=torch.bool)
        rest[top : top + h, left : left + w] = False
        assert torch.equal(out[i][:, rest], normalised[i][:, rest])


# --------------------------------------------------------------------------- grey, strings


def test_grey_batch_equals_its_rgb_copy():
    aug = TrainAugment(S, re_prob=0.5)
    g = batch([texture(60, 64, i, grey=True) for i in range(16)])
    p = aug.draw(np.random.default_rng(9), [(60, 64)] * 16)
    assert torch.equal(aug(g, p), aug(g.expand(-1, 3, -1, -1), p))
    # a batch whose layers only draw colour ops stays one channel through RandAugment
    geometric = [aug.op_names.index(n) for n in sorted(da.GEOMETRIC_OPS)]
    for seed in range(200):
        p = aug.draw(np.random.default_rng(seed), [(60, 64)] * 3)
        colour_only = not any(c[k] for c in p.op_counts for k in geometric)
        if colour_only and sum(c[15] for c in p.op_counts) <= 3:
            break
    else:
        pytest.fail("no colour-only draw found")
    x1 = aug.rand_augment(aug.crop_flip(g[:3], p), p)
    assert x1.shape[1] == 1
    assert torch.equal(aug(g[:3], p), aug(g[:3].expand(-1, 3, -1, -1), p))


@pytest.mark.parametrize(
    "name", ["Equalize", "AutoContrast", "ContrastIncreasing", "SharpnessIncreasing", "Color"]
)
def test_grey_colour_ops_equal_rgb_copy(name):
    g = batch([texture(S, S, i, grey=True) for i in range(3)])
    args = OP_ARGS[name][:3]
    one = apply_op(g, name, args)
    three = apply_op(g.expand(-1, 3, -1, -1), name, args)
    assert one.shape[1] == 1 and torch.equal(one.expand(-1, 3, -1, -1), three)


@pytest.mark.parametrize(
    "text",
    [
        "rand-m9-mstd0.5-inc2",
        "rand-m9-mstd0.5-inc1-p0.3",
        "rand-m9-mstd0.5-inc1-tweights",
        "rand-m9.5-mstd0.5",
        "rand-m9-m8",
        "rand-m9-mstd0.5-mmax15",
        "rand-m9-inc1",
        "rand",
        "augmix-m5-w4",
        "original-mstd0.5",
        "",
    ],
)
def test_bad_auto_augment_string(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        TrainAugment(S, auto_augment=text)


def test_good_auto_augment_strings():
    spec = TrainAugment(S).spec
    assert (spec.magnitude, spec.magnitude_std, spec.increasing, spec.num_layers) == (
        9,
        0.5,
        True,
        2,
    )
    aug = TrainAugment(S, auto_augment="rand-m7-mstd0.5-inc0-n3")
    assert aug.op_names == tuple(aa._RAND_TRANSFORMS) and aug.spec.num_layers == 3
    assert TrainAugment(S, auto_augment="rand-m9-mstd101-inc1").spec.magnitude_std == math.inf
    p = aug.draw(np.random.default_rng(0), [(50, 60)] * 5)
    assert p.ops.shape == (3, 5) and aug(batch([texture(50, 60, 0)] * 5), p).shape == (5, 3, S, S)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_without_host_sync():
    """Nothing in the apply reads a device value on the host (sync debug mode "error"); the GPU
    gives the CPU's pixels: the RandAugment stage bit for bit from the same start, the resizes
    within a grey level (CUDA's antialias weights may flip a rare rounding)."""
    aug, erasing, ev = TrainAugment(S, re_prob=0.0), TrainAugment(S, re_prob=0.5), EvalResize(S)
    rgb = batch([texture(70, 90, i) for i in range(24)])
    grey = batch([texture(70, 90, i, grey=True) for i in range(24)])
    p = aug.draw(np.random.default_rng(11), [(70, 90)] * 24)
    pe = erasing.draw(np.random.default_rng(12), [(70, 90)] * 24)
    dev = torch.device("cuda")
    pd, ped = (q.map_tensors(lambda t: t.pin_memory().to(dev, non_blocking=True)) for q in (p, pe))
    rgb_d, grey_d = rgb.to(dev), grey.to(dev)
    start = aug.crop_flip(rgb, p)
    start_d = start.to(dev)
    aug(rgb_d, pd), erasing(rgb_d, ped), ev(rgb_d)  # warm-up: the per-device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [aug(rgb_d, pd), aug(grey_d, pd), ev(rgb_d), ev(grey_d)]
        erased, stage = erasing(grey_d, ped), aug.rand_augment(start_d, pd)
        crops = aug.crop_flip(rgb_d, pd)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(erased, erasing(grey_d, ped))
    assert torch.equal(stage.cpu(), aug.rand_augment(start, p))
    d = (crops.cpu() - start).abs()
    assert d.max() <= 1 and d.mean() < 0.01
    ref = [aug(rgb, p), aug(grey, p), ev(rgb), ev(grey)]
    for o, r in zip(outs, ref, strict=True):
        d = (o.cpu() - r).abs()
        assert d.mean() < 0.01 and (d > 0.02).float().mean() < 0.01, (d.mean(), d.max())
