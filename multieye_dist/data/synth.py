"""Synthetic MultiEYE: fundus-like and OCT-like pictures of latent findings, in the released layout.

The generative model (a class reaches the pixels only through its findings: ``y -> F -> X``)

1. **Findings.** :data:`FINDINGS` lists 8 latent findings (drusen, subretinal fluid, intraretinal
   haemorrhage, hard exudates, optic disc cupping, epiretinal membrane, choroidal
   neovascularisation, myopic thinning), each with a short name and one caption sentence (the
   concept bank ``configs/concepts/synth-findings-minilm.safetensors`` encodes the captions).
2. **Class -> findings.** Each class is a characteristic *combination* of findings
   (:data:`CLASS_FINDINGS`): every finding is present independently with probability
   ``FINDING_PROBS[class, finding]``: 0.9 for a class's core findings, 0.1-0.3 for its secondary
   ones, 0.02 for any other (a stray finding; normal eyes too). Findings are shared between
   classes (drusen: dry and wet AMD; haemorrhage: DR and RVO; fluid: CSC, RVO, wet AMD; ...), so
   one finding rarely names the class: the combination does. Every class has its own most likely
   combination; a reader who sees the findings perfectly is right ~86% of the time on balanced
   classes (:func:`bayes_accuracy`), the rest being missed core or stray findings.
3. **Findings -> pixels.** Given its findings, an image is drawn without looking at the class:
   each present finding gets a random severity (uniform 0.5..1) and a random location (never
   class-coded, so crops and flips keep the signal), drawn on a random eye (tint, left or right
   eye, vessels, band height, tilt, thickness, brightness, speckle and noise). Fundus and OCT
   images are unpaired, as in MultiEYE: the same class, different eyes.

   ============================  ==============================  ================================
   finding                       OCT B-scan (clear)              fundus photograph (faint)
   ============================  ==============================  ================================
   drusen                        small domes lifting the RPE     a cluster of small yellow dots
   subretinal fluid              dark pocket under the lifted    a grey round blister
                                 retina, above the RPE
   intraretinal haemorrhage      bright blots in the inner       dark red blots
                                 retina casting shadow columns
   hard exudates                 bright dots in the outer        small bright yellow-white dots
                                 plexiform band                  in a partial ring
   optic disc cupping            a deep dip of the inner         a large pale cup in the disc
                                 surface, thinned retina around
   epiretinal membrane           a taut bright line just above   a wrinkled whitish sheen
                                 the wrinkled inner surface
   choroidal neovascularisation  a bright mass between retina    a grey-green patch with a dark
                                 and RPE, lifting the retina     red rim
   myopic thinning, staphyloma   thin retina and choroid, the    tessellation (choroidal vessel
                                 RPE bowed backwards             stripes), a pale crescent at
                                                                 the disc
   ============================  ==============================  ================================

   OCT findings are drawn at full contrast over speckle; fundus findings are blended in at low
   opacity (:data:`FUNDUS_OPACITY` times the severity) under heavy noise: learnable, but hard
   from few labels. What an OCT teacher learns to see (the findings) is exactly what a fundus
   student needs. Measured at 64 px with a 4-layer CNN from scratch (batch 32): each finding's
   detection AUC from 100 labelled images per class is 0.96-1.0 on OCT and 0.65-0.9 on fundus.
   The class from cross-entropy alone is learnt more slowly than the findings: with 240 images
   per class, 49% dev accuracy after 1,000 steps and 76% after 2,500 on OCT, 42% after 2,500 on
   fundus (the ceiling is 86%).

Per-image findings are written next to each label file (``<top>/<split>/findings.txt``, one
``NAME i,j,k`` or ``NAME -`` line per image, 0-based indices into :data:`FINDINGS`) and their
names and captions to ``ROOT/findings.json``; ``shards convert`` copies them into every sample's
json record. Every image is drawn from its own generators seeded by (seed, modality, split,
index): the output does not depend on the worker count.

**Pretraining pool.** ``SynthOptions(pool=True)`` (``synth --pool``) writes the same layout with
every name prefixed ``pool-`` and every image's findings and picture drawn from generators keyed
apart (:data:`POOL_KEY`): for the same seed, images and findings that no student trains on. It is
the stand-in for the captioned images of concept-alignment pre-training (``train.stage=align``),
as FLAIR was pretrained on other fundus collections than the ones it is evaluated on.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from multieye_dist.core.atomic import open_atomic, write_text
from multieye_dist.data.classes import NUM_CLASSES
from multieye_dist.data.layout import (
    FINDINGS_FILE,
    FINDINGS_JSON,
    LABEL_FILE,
    LAYOUT,
    MODALITIES,
    SPLITS,
    format_findings,
    image_dir,
)
from multieye_dist.data.workers import process_pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    name: str
    caption: str  # one sentence; "A fundus photograph of {caption}" must read well


FINDINGS: tuple[Finding, ...] = (
    Finding("drusen", "drusen, small yellow deposits beneath the pigment epithelium"),
    Finding("subretinal fluid", "subretinal fluid, a dome-shaped serous detachment"),
    Finding(
        "intraretinal haemorrhage", "intraretinal haemorrhages, dark red dot and blot bleeding"
    ),
    Finding("hard exudates", "hard exudates, bright waxy lipid deposits in a ring"),
    Finding("optic disc cupping", "an enlarged optic disc cup with loss of the nerve fibre layer"),
    Finding(
        "epiretinal membrane",
        "an epiretinal membrane, a glistening cellophane sheen with surface wrinkling",
    ),
    Finding(
        "choroidal neovascularisation",
        "choroidal neovascularisation, a grey-green membrane of new vessels",
    ),
    Finding(
        "myopic thinning", "myopic thinning with a tessellated fundus and a posterior staphyloma"
    ),
)
NUM_FINDINGS = len(FINDINGS)
_F = {f.name: i for i, f in enumerate(FINDINGS)}

CORE, STRAY = 0.9, 0.02
# class -> {finding: probability}; every finding not listed has probability STRAY.
CLASS_FINDINGS: tuple[dict[str, float], ...] = (
    {},  # 0 normal
    {"drusen": CORE},  # 1 dry AMD
    {"subretinal fluid": CORE},  # 2 CSC
    {"intraretinal haemorrhage": CORE, "hard exudates": CORE, "subretinal fluid": 0.25},  # 3 DR
    {"optic disc cupping": CORE},  # 4 glaucoma
    {"epiretinal membrane": CORE},  # 5 epiretinal membrane
    {"myopic thinning": CORE, "choroidal neovascularisation": 0.1},  # 6 myopia
    {"intraretinal haemorrhage": CORE, "subretinal fluid": CORE, "hard exudates": 0.1},  # 7 RVO
    {  # 8 wet AMD
        "choroidal neovascularisation": CORE,
        "subretinal fluid": CORE,
        "drusen": CORE,
        "intraretinal haemorrhage": 0.3,
    },
)
FINDING_PROBS = np.full((NUM_CLASSES, NUM_FINDINGS), STRAY)
for _c, _probs in enumerate(CLASS_FINDINGS):
    for _name, _p in _probs.items():
        FINDING_PROBS[_c, _F[_name]] = _p
FINDING_PROBS.setflags(write=False)

# Opacity of each finding on fundus at full severity (times the severity, 0.5..1): set so that
# a small CNN detects each about equally badly from 100 labelled images per class (detection
# AUC ~0.7-0.9) and much better from 240 (findings spread over the whole fundus, the membrane's
# sheen and the myopic stripes, get less). And the noise levels.
FUNDUS_OPACITY: dict[str, float] = {
    "drusen": 0.3,
    "subretinal fluid": 0.36,
    "intraretinal haemorrhage": 0.36,
    "hard exudates": 0.28,
    "optic disc cupping": 0.18,
    "epiretinal membrane": 0.21,
    "choroidal neovascularisation": 0.3,
    "myopic thinning": 0.15,
}
FUNDUS_NOISE = 20.0
OCT_NOISE = 6.0

# Appended to every seed-sequence key of the pretraining pool (never to the data's: those keys
# and so the data's bytes are as before the pool existed). "POOL" in ASCII.
POOL_KEY = 0x504F4F4C
POOL_PREFIX = "pool-"


def sample_findings(rng: np.random.Generator, label: int) -> tuple[int, ...]:
    """The findings of one image of class `label` (sorted indices into FINDINGS)."""
    return tuple(int(i) for i in np.flatnonzero(rng.random(NUM_FINDINGS) < FINDING_PROBS[label]))


def bayes_accuracy(priors: np.ndarray | None = None) -> float:
    """Accuracy of the best classifier that sees every image's findings exactly."""
    priors = np.full(NUM_CLASSES, 1 / NUM_CLASSES) if priors is None else np.asarray(priors)
    combos = np.array(list(itertools.product((0, 1), repeat=NUM_FINDINGS)), dtype=bool)
    p = FINDING_PROBS[None]
    lik = np.where(combos[:, None, :], p, 1 - p).prod(-1) * priors[None]  # [combos, classes]
    return float(lik.max(1).sum())


@dataclass(frozen=True)
class SynthOptions:
    per_class: int = 40  # train images per class and modality; dev and test get a quarter
    seed: int = 0
    image_size: int = 128  # fundus side; OCT width too unless oct_image_size is set
    imbalance: float = 1.0  # ratio of the most to the least frequent class (geometric in between)
    workers: int = 1
    fundus_per_class: int | None = None  # fundus train images per class (None: per_class)
    # Multiplies every finding's fundus opacity (FUNDUS_OPACITY, capped at 1): how faint the
    # fundus signal is. 1 = calibrated for long runs; short CPU runs (the demo) need more.
    fundus_visibility: float = 1.0
    # OCT B-scan width (height 3/4 of it; zero-padded to this square at conversion). None: the
    # same as image_size. The release ships fundus at 224 px and OCT at 448 px.
    oct_image_size: int | None = None
    # A pretraining pool: names prefixed "pool-", every image drawn from generators keyed apart
    # from the data of the same seed (POOL_KEY).
    pool: bool = False

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise ValueError(f"--per-class {self.per_class}: must be >= 1")
        if self.fundus_per_class is not None and self.fundus_per_class < 1:
            raise ValueError(f"--fundus-per-class {self.fundus_per_class}: must be >= 1")
        if self.image_size < 32:
            raise ValueError(f"--image-size {self.image_size}: must be >= 32")
        if self.oct_image_size is not None and self.oct_image_size < 32:
            raise ValueError(f"--oct-image-size {self.oct_image_size}: must be >= 32")
        if self.imbalance < 1:
            raise ValueError(f"--imbalance {self.imbalance}: must be >= 1")
        if self.fundus_visibility <= 0:
            raise ValueError(f"--fundus-visibility {self.fundus_visibility}: must be > 0")


def picture_size(options: SynthOptions, modality: str) -> int:
    """The side of a modality's pictures (OCT: the B-scan's width)."""
    if modality == "oct" and options.oct_image_size is not None:
        return options.oct_image_size
    return options.image_size


def class_counts(options: SynthOptions, split: str, modality: str = "oct") -> list[int]:
    """Images per class. Train: per_class (fundus: fundus_per_class when set); dev and test:
    per_class // 4 (at least 2) in both modalities."""
    if split != "train":
        n = max(2, options.per_class // 4)
    elif modality == "fundus" and options.fundus_per_class is not None:
        n = options.fundus_per_class
    else:
        n = options.per_class
    decay = options.imbalance ** (1 / (NUM_CLASSES - 1))
    return [max(1, round(n / decay**c)) for c in range(NUM_CLASSES)]


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _streams(rng: np.random.Generator) -> tuple[np.random.Generator, list, np.random.Generator]:
    """Independent streams: the eye, one per finding, the noise. A finding's severity and place
    do not depend on which other findings are present, and the eye and noise not on any: the
    same generator with and without a finding gives the same picture but for that finding."""
    scene, lesions, noise = rng.spawn(3)
    return scene, lesions.spawn(NUM_FINDINGS), noise


def _blobs(
    xx: np.ndarray, yy: np.ndarray, centres: np.ndarray, radii: np.ndarray, sharp: float = 2.0
) -> np.ndarray:
    """Max over soft round blobs: 1 inside, falling off over about a radius."""
    d2 = (xx[None] - centres[:, 0, None, None]) ** 2 + (yy[None] - centres[:, 1, None, None]) ** 2
    return np.exp(-((d2 / radii[:, None, None] ** 2) ** sharp)).max(0)


def _blend(arr: np.ndarray, mask: np.ndarray, colour, opacity: float) -> None:
    a = (opacity * mask)[..., None]
    arr *= 1 - a
    arr += a * np.asarray(colour, np.float32)


def fundus_image(
    rng: np.random.Generator,
    findings: tuple[int, ...],
    size: int,
    *,
    noise: bool = True,
    visibility: float = 1.0,
) -> Image.Image:
    """A colour fundus photograph with the given findings drawn faintly (``noise=False``: the
    same picture without its noise, for tests and figures)."""
    scene, lesion_rngs, noise_rng = _streams(rng)
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    c = size / 2 + scene.normal(0, size * 0.01, 2)
    r = size * 0.46
    tint = scene.integers(-20, 20, 3)
    base = tuple(int(v) for v in np.clip(np.array([190, 80, 35]) + tint, 0, 255))
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=base)
    side = 1 if scene.random() < 0.5 else -1  # left or right eye
    od = np.array([c[0] + side * r * 0.5, c[1] + scene.normal(0, size * 0.02)])
    for _ in range(6):  # vessels fanning out of the optic disc
        ang = scene.uniform(0, 2 * math.pi)
        pts = [tuple(od)]
        for step in range(1, 5):
            ang += scene.normal(0, 0.3)
            reach = r * 0.22 * step
            pts.append((od[0] + math.cos(ang) * reach, od[1] + math.sin(ang) * reach))
        draw.line(pts, fill=(120, 30, 20), width=max(1, size // 80))
    odr = r * 0.14
    draw.ellipse([od[0] - odr, od[1] - odr, od[0] + odr, od[1] + odr], fill=(235, 190, 120))
    cup = odr * 0.35  # a normal, small physiological cup
    draw.ellipse([od[0] - cup, od[1] - cup, od[0] + cup, od[1] + cup], fill=(250, 230, 180))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(size / 160)), dtype=np.float32).copy()

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist_c = np.hypot(xx - c[0], yy - c[1])
    fundus = dist_c <= r

    def place(g: np.random.Generator, reach: float = 0.55) -> np.ndarray:
        """A random point of the posterior pole (uniform in a disc around the centre)."""
        a, d = g.uniform(0, 2 * math.pi), r * reach * math.sqrt(g.random())
        return c + d * np.array([math.cos(a), math.sin(a)])

    for k in findings:
        g, name = lesion_rngs[k], FINDINGS[k].name
        sev = g.uniform(0.5, 1.0)
        alpha = min(1.0, FUNDUS_OPACITY[name] * visibility) * sev
        if name == "drusen":
            n = int(6 + 10 * sev)
            pts = place(g) + g.normal(0, r * 0.15, (n, 2))
            _blend(
                arr, _blobs(xx, yy, pts, size * g.uniform(0.015, 0.028, n)), (240, 220, 110), alpha
            )
        elif name == "subretinal fluid":
            rad = r * (0.12 + 0.08 * sev)
            m = _blobs(xx, yy, place(g)[None], np.array([rad]), sharp=3.0)
            _blend(arr, m, (150, 130, 120), alpha)
        elif name == "intraretinal haemorrhage":
            n = int(3 + 6 * sev)
            pts = place(g) + g.normal(0, r * 0.2, (n, 2))
            _blend(arr, _blobs(xx, yy, pts, size * g.uniform(0.02, 0.04, n)), (90, 5, 5), alpha)
        elif name == "hard exudates":
            n = int(6 + 8 * sev)
            ring = r * g.uniform(0.1, 0.16)
            ang = g.uniform(0, 2 * math.pi) + g.uniform(0, 1.5 * math.pi, n)
            pts = place(g) + ring * np.stack([np.cos(ang), np.sin(ang)], 1)
            _blend(
                arr, _blobs(xx, yy, pts, size * g.uniform(0.013, 0.022, n)), (255, 245, 170), alpha
            )
        elif name == "optic disc cupping":
            m = _blobs(xx, yy, od[None], np.array([odr * (0.6 + 0.3 * sev)]), sharp=3.0)
            _blend(arr, m, (255, 255, 245), alpha)
        elif name == "epiretinal membrane":
            p, theta, freq = place(g, 0.4), g.uniform(0, math.pi), g.uniform(0.6, 1.0)
            wave = np.sin(((xx - p[0]) * math.cos(theta) + (yy - p[1]) * math.sin(theta)) * freq)
            m = _blobs(xx, yy, p[None], np.array([r * (0.25 + 0.1 * sev)]), sharp=1.0)
            _blend(arr, m * (0.6 + 0.4 * wave), (255, 255, 250), alpha)
        elif name == "choroidal neovascularisation":
            p, rad = place(g, 0.4), r * (0.07 + 0.05 * sev)
            d = np.hypot(xx - p[0], yy - p[1])
            _blend(arr, np.exp(-(((d - rad * 1.25) / (rad * 0.3)) ** 2)), (100, 15, 10), alpha)
            _blend(arr, _blobs(xx, yy, p[None], np.array([rad]), 3.0), (120, 135, 95), alpha * 1.3)
        elif name == "myopic thinning":
            theta, freq = g.uniform(0, math.pi), size / g.uniform(5, 8)
            u = (xx * math.cos(theta) + yy * math.sin(theta)) / freq * 2 * math.pi
            stripes = 0.5 + 0.5 * np.sin(
                u + 1.5 * np.sin(yy * 3 / size * math.pi + g.uniform(0, 6))
            )
            _blend(arr, stripes, (120, 45, 20), alpha * 0.4)
            d = np.hypot(xx - od[0], yy - od[1])
            towards = ((xx - od[0]) * -side) > 0  # the crescent is on the macular side
            crescent = towards * np.exp(-(((d - odr * (1.2 + 0.3 * sev)) / (odr * 0.3)) ** 2))
            _blend(arr, crescent, (245, 215, 170), alpha)
    if noise:
        arr += noise_rng.normal(0, FUNDUS_NOISE, arr.shape).astype(np.float32)
    arr *= fundus[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# Intensity of the neurosensory retina against relative depth (0 = inner surface, 1 = outer):
# nerve fibre layer, ganglion cells and inner plexiform, inner nuclear, outer plexiform, outer
# nuclear, ellipsoid zone.
_RETINA_U = np.array([0.0, 0.1, 0.14, 0.3, 0.34, 0.44, 0.48, 0.56, 0.6, 0.82, 0.86, 0.92, 0.96, 1])
_RETINA_V = np.array([0.85, 0.8, 0.55, 0.5, 0.3, 0.3, 0.6, 0.6, 0.2, 0.2, 0.75, 0.75, 0.35, 0.4])


def oct_image(
    rng: np.random.Generator, findings: tuple[int, ...], size: int, *, noise: bool = True
) -> Image.Image:
    """A B-scan, wider than tall (zero-padded to square at conversion, as the release did),
    with the given findings drawn clearly (``noise=False``: without speckle and noise)."""
    scene, lesion_rngs, noise_rng = _streams(rng)
    w, h = size, size * 3 // 4
    x = (np.arange(w, dtype=np.float32) + 0.5) / w
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    # Bruch's membrane (bottom of the RPE), retinal thickness, choroid thickness, per column.
    bruch = h * (0.64 + scene.uniform(-0.05, 0.05)) + h * scene.uniform(-0.06, 0.06) * (x - 0.5)
    bruch = bruch + h * 0.02 * np.sin(2 * math.pi * (x * scene.uniform(0.5, 1.2) + scene.random()))
    thick = np.full(w, h * 0.26 * scene.uniform(0.9, 1.1), np.float32)
    choroid = np.full(w, h * 0.14, np.float32)
    rpe_t = max(1.5, h * 0.035)
    lift_rpe = np.zeros(w, np.float32)  # drusen
    mass = np.zeros(w, np.float32)  # CNV, between RPE and retina
    gap = np.zeros(w, np.float32)  # fluid, between the above and the retina
    dots: list[tuple[float, float, float, float]] = []  # (x, depth u, radius, value)
    shadows: list[tuple[float, float, float]] = []  # (x, half width, depth u)
    membrane = None
    p = {}
    for k in findings:
        g = lesion_rngs[k]
        p[FINDINGS[k].name] = (g, g.uniform(0.5, 1.0), g.uniform(0.22, 0.78))

    def dome(centre: float, half: float, height: float) -> np.ndarray:
        return height * np.sqrt(np.clip(1 - ((x - centre) / half) ** 2, 0, None))

    if "myopic thinning" in p:
        g, sev, xc = p["myopic thinning"]
        thick *= 0.75 - 0.25 * sev
        choroid *= 0.3
        bruch = bruch + h * 0.12 * sev * np.clip(1 - ((x - xc) / 0.6) ** 2, 0, None)
    if "drusen" in p:
        g, sev, xc = p["drusen"]
        for _ in range(int(2 + 3 * sev)):
            lift_rpe += dome(xc + g.uniform(-0.14, 0.14), g.uniform(0.025, 0.04), h * 0.06 * sev)
        lift_rpe = np.minimum(lift_rpe, h * 0.08)
    if "choroidal neovascularisation" in p:
        g, sev, xc = p["choroidal neovascularisation"]
        mass += dome(xc, g.uniform(0.06, 0.1), h * (0.07 + 0.06 * sev))
    if "subretinal fluid" in p:
        g, sev, xc = p["subretinal fluid"]
        gap += dome(xc + g.uniform(-0.03, 0.03), g.uniform(0.09, 0.15), h * (0.06 + 0.06 * sev))
    if "optic disc cupping" in p:
        g, sev, xc = p["optic disc cupping"]
        cupw = g.uniform(0.06, 0.08)
        thick *= 1 - (0.7 + 0.25 * sev) * np.exp(-(((x - xc) / cupw) ** 4))
        thick *= 1 - 0.2 * sev * np.exp(-(((x - xc) / 0.12) ** 2))  # nerve fibre thinning
    if "intraretinal haemorrhage" in p:
        g, sev, xc = p["intraretinal haemorrhage"]
        for _ in range(int(2 + 3 * sev)):
            xi, u = xc + g.uniform(-0.15, 0.15), g.uniform(0.25, 0.5)
            dots.append((xi, u, h * 0.03, 0.95))
            shadows.append((xi, g.uniform(0.012, 0.025), u))
    if "hard exudates" in p:
        g, sev, xc = p["hard exudates"]
        for _ in range(int(5 + 6 * sev)):
            xi = xc + g.uniform(-0.15, 0.15)
            dots.append((xi, g.uniform(0.42, 0.62), max(1.3, h * 0.03), 1.2))
    rpe_top = bruch - rpe_t - lift_rpe
    bottom = rpe_top - mass - gap  # the retina's outer surface
    top = bottom - thick
    if "epiretinal membrane" in p:
        g, sev, xc = p["epiretinal membrane"]
        half = g.uniform(0.15, 0.25)
        span = np.abs(x - xc) < half
        taut = top.copy()  # the membrane spans the wrinkles it pulls up
        top = top + span * h * 0.015 * sev * np.sin(x * g.uniform(40, 70) + g.uniform(0, 6))
        membrane = (span, taut - h * (0.03 + 0.02 * sev))

    # Compose, row by column.
    u = (y - top) / (bottom - top)
    img = np.where((u >= 0) & (u <= 1), np.interp(u, _RETINA_U, _RETINA_V), 0.03)
    img = np.where((y > bottom) & (y <= bottom + gap), 0.02, img)  # fluid: dark
    img = np.where((y > bottom + gap) & (y <= rpe_top), 0.85, img)  # CNV mass: bright
    img = np.where((y > rpe_top) & (y <= rpe_top + rpe_t), 1.0, img)  # RPE
    img = np.where((y > rpe_top + rpe_t) & (y <= bruch), 0.5, img)  # drusen material
    chor = (y > bruch) & (y <= bruch + choroid)
    texture = 0.45 + 0.15 * np.sin(x * scene.uniform(25, 45) + y * 0.3 + scene.uniform(0, 6))
    img = np.where(chor, texture, img)
    if membrane is not None:
        span, line = membrane
        img = np.where(span & (np.abs(y - line) <= max(0.7, h * 0.012)), 1.1, img)
    for xi, half, ud in shadows:
        depth = top + ud * (bottom - top)
        img = np.where((np.abs(x - xi) < half) & (y > depth), img * 0.3, img)
    for xi, ud, rad, val in dots:
        col = min(w - 1, max(0, int(xi * w)))
        yd = top[col] + ud * (bottom[col] - top[col])
        d = ((x - xi) * w / rad) ** 2 + ((y - yd) / rad) ** 2
        img = np.maximum(img, val * np.exp(-(d**2)))
    arr = img * 200 * scene.uniform(0.85, 1.1)
    if noise:
        arr = arr * noise_rng.gamma(4.0, 0.25, arr.shape) + noise_rng.normal(
            0, OCT_NOISE, arr.shape
        )
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _generators(seed: int, modality: str, split: str, index: int, pool: bool = False):
    """(findings generator, picture generator) of one image (`pool`: of the pretraining pool,
    keyed apart by POOL_KEY; the data's keys are unchanged)."""
    key = [seed, MODALITIES.index(modality), SPLITS.index(split), index]
    if pool:
        key.append(POOL_KEY)
    return np.random.default_rng([*key, 0]), np.random.default_rng([*key, 1])


def _draw(job: tuple[str, str, int, tuple[int, ...], int, int, float, bool, str]) -> None:
    modality, split, index, findings, seed, size, visibility, pool, path = job
    _, rng = _generators(seed, modality, split, index, pool)
    if modality == "fundus":
        img = fundus_image(rng, findings, size, visibility=visibility)
    else:
        img = oct_image(rng, findings, size)
    # Whole or absent even if the user interrupts the run (the rename does that). No fsync: only a
    # power loss needs it, the set is regenerable, and one per image adds ~15% to drawing it on a
    # local disk (more on network file systems).
    with open_atomic(path, "wb", fsync=False) as fh:
        img.save(fh, format="PNG", compress_level=6)


def _draw_many(jobs: list) -> None:
    for job in jobs:
        _draw(job)


def findings_json() -> str:
    entries = [{"index": i, "name": f.name, "caption": f.caption} for i, f in enumerate(FINDINGS)]
    return json.dumps({"findings": entries}, indent=1) + "\n"


def generate(out: Path, options: SynthOptions) -> dict[str, dict[str, list[int]]]:
    """Write the dataset; returns {modality: {split: per-class counts}}."""
    out = Path(out)
    prefix = POOL_PREFIX if options.pool else ""
    jobs, summary = [], {}
    for modality in MODALITIES:
        image_dir(out, modality).mkdir(parents=True, exist_ok=True)
        summary[modality] = {}
        for split in SPLITS:
            counts = class_counts(options, split, modality)
            summary[modality][split] = counts
            lines, sidecar, index = [], [], 0
            for label, n in enumerate(counts):
                for _ in range(n):
                    name = f"{prefix}{modality}-{split}-{label}-{index:06d}"
                    path = image_dir(out, modality) / f"{name}.png"
                    rng, _ = _generators(options.seed, modality, split, index, options.pool)
                    findings = sample_findings(rng, label)
                    jobs.append(
                        (
                            modality,
                            split,
                            index,
                            findings,
                            options.seed,
                            picture_size(options, modality),
                            options.fundus_visibility,
                            options.pool,
                            path,
                        )
                    )
                    lines.append(f"{name} {label}\n")
                    sidecar.append(f"{name} {format_findings(findings)}\n")
                    index += 1
            # Shuffle the listing (deterministically): real label files are not sorted by class.
            shuffle_key = [options.seed, 99, SPLITS.index(split)]
            if options.pool:
                shuffle_key.append(POOL_KEY)
            order = np.random.default_rng(shuffle_key).permutation(len(lines))
            split_dir = out / LAYOUT[modality][0] / split
            split_dir.mkdir(parents=True, exist_ok=True)
            write_text(split_dir / LABEL_FILE, "".join(lines[i] for i in order))
            write_text(split_dir / FINDINGS_FILE, "".join(sidecar[i] for i in order))
    write_text(out / FINDINGS_JSON, findings_json())
    jobs = [(*job[:-1], str(job[-1])) for job in jobs]
    if options.workers > 1:
        chunks = [jobs[i : i + 64] for i in range(0, len(jobs), 64)]
        with process_pool(options.workers) as pool:
            list(pool.map(_draw_many, chunks))
    else:
        _draw_many(jobs)
    logger.info("wrote %d synthetic images under %s", len(jobs), out)
    return summary
