"""`multieye-dist` command line: synth, shards, train, config, eval, explain, concepts, import,
demo."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import re
import sys
import time
from pathlib import Path

from multieye_dist import __version__

logger = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500', '64k', '100MB', '1GiB' -> bytes (k/M/G/T are powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 100MB or 1GiB")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * 1024**power)


def bounded(kind: type, low: float, *, strict: bool = False, text: str = ""):
    """An argparse ``type=`` for `kind` (int or float) values >= `low` (> with `strict`); NaN
    and infinities are refused too. argparse puts the option's name before the message."""

    def parse(arg: str):
        try:
            value = kind(arg)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{arg!r} is not {text}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{arg}: must be {text}")
        return value

    return parse


positive_int = bounded(int, 1, text="a positive integer")
nonneg_int = bounded(int, 0, text="an integer >= 0")
positive_float = bounded(float, 0, strict=True, text="a number > 0")


def positive_size(text: str) -> int:
    """parse_size, at least one byte."""
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1 byte")
    return size


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t for t in text.split(",") if t)
        for t in items:
            if t not in choices:
                raise argparse.ArgumentTypeError(f"{t!r}: choose from {', '.join(choices)}")
        return items

    return parse


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic dataset in the released MultiEYE layout",
        description="Write a synthetic MultiEYE (fundus and OCT, train/dev/test) in the released "
        "layout. Each class is a combination of latent findings (drusen, fluid, haemorrhage, "
        "exudates, disc cupping, membrane, CNV, myopic thinning), drawn clearly on OCT and "
        "faintly on fundus; each image's findings go to a findings.txt sidecar next to its "
        "label file, and ROOT/findings.json lists their names and captions.",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--per-class",
        type=positive_int,
        default=40,
        help="train images per class and modality (default 40); dev and test get a quarter "
        "(at least 2)",
    )
    p.add_argument(
        "--fundus-per-class",
        type=positive_int,
        default=None,
        help="fundus train images per class (default: --per-class); scarce fundus labels, "
        "OCT train and dev/test unchanged",
    )
    p.add_argument(
        "--fundus-visibility",
        type=positive_float,
        default=1.0,
        help="multiplier of the findings' fundus opacity (default 1: faint, for long runs)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--image-size", type=int, default=128, help="fundus side and OCT width (default 128)"
    )
    p.add_argument(
        "--oct-image-size",
        type=int,
        default=None,
        metavar="PX",
        help="OCT B-scan width (height 3/4 of it; default: --image-size); the release's "
        "resolutions are --image-size 224 --oct-image-size 448",
    )
    p.add_argument(
        "--imbalance",
        type=bounded(float, 1, text="a number >= 1"),
        default=1.0,
        help="most/least frequent class ratio (default 1: balanced)",
    )
    p.add_argument("--workers", type=positive_int, default=1, help="processes (default 1)")
    p.add_argument(
        "--pool",
        action="store_true",
        help="write a pretraining pool: names prefixed pool-, images and findings drawn apart "
        "from the data of the same --seed; for train.stage=align",
    )
    p.set_defaults(func=cmd_synth)


def add_convert_options(p: argparse.ArgumentParser) -> None:
    """Conversion options, shared with shards/convert_slurm.py."""
    from multieye_dist.data.layout import LABEL_FILE, SPLITS

    p.add_argument(
        "--root",
        type=Path,
        required=True,
        help="MultiEYE root (assemble/, ...), an ImageFolder tree (ROOT/SPLIT/CLASS/IMAGE; val "
        "is read as dev) or a path,label,split,modality CSV file",
    )
    p.add_argument(
        "--input-format",
        choices=("auto", "multieye", "imagefolder", "csv"),
        default="auto",
        help="what --root is (default auto: a .csv file is csv, a root with assemble/ or "
        "assemble_oct/ is multieye, one with train/dev/val/test folders is imagefolder)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    p.add_argument("--modality", choices=("fundus", "oct", "both"), default="both")
    p.add_argument("--splits", type=_csv(SPLITS), default=SPLITS, help="e.g. train,dev")
    p.add_argument("--shard-samples", type=positive_int, default=1000, help="samples per shard")
    p.add_argument(
        "--shard-bytes",
        type=positive_size,
        default=0,
        help="target shard size (e.g. 256MB); overrides --shard-samples",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize every image to PX x PX after zero-padding to square, up or down (default: "
        "keep each image's size, never upscale; the training transforms resize anyway)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="PX",
        help="shrink (bicubic) images whose padded square is larger than PX to PX; smaller "
        "ones keep their size (not with --image-size)",
    )
    p.add_argument("--format", dest="fmt", choices=("png", "jpg", "webp"), default="png")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--clahe", action="store_true", help="apply CLAHE to fundus (release: applied)")
    p.add_argument(
        "--median",
        type=int,
        default=0,
        help="OCT median filter kernel size (release: applied; default 0 = off)",
    )
    p.add_argument("--workers", type=nonneg_int, default=0, help="processes (default 0: all cores)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="convert the rest and record every bad sample in the manifest",
    )
    p.add_argument("--label-file", default=LABEL_FILE)


def convert_options(args: argparse.Namespace):
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions

    modalities = ("fundus", "oct") if args.modality == "both" else (args.modality,)
    pp = Preprocess(
        image_size=args.image_size,
        max_size=args.max_size,
        fmt=args.fmt,
        quality=args.quality,
        clahe=args.clahe,
        median=args.median,
    )
    return ConvertOptions(
        modalities=modalities,
        splits=args.splits,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        preprocess=pp,
        workers=args.workers,
        skip_bad=args.skip_bad,
        label_file=args.label_file,
        input_format=getattr(args, "input_format", "auto"),
    )


def _add_shards(sub) -> None:
    shards = sub.add_parser("shards", help="convert to / verify WebDataset shards")
    ssub = shards.add_subparsers(dest="shards_cmd", required=True)
    conv = ssub.add_parser(
        "convert", help="MultiEYE layout, ImageFolder tree or CSV -> WebDataset tar shards"
    )
    add_convert_options(conv)
    conv.add_argument("--no-progress", action="store_true")
    conv.set_defaults(func=cmd_convert)
    ver = ssub.add_parser("verify", help="re-read every shard and check it against its manifest")
    ver.add_argument("--shards", type=Path, required=True)
    ver.add_argument(
        "--workers", type=nonneg_int, default=0, help="processes (default 0: all cores)"
    )
    ver.set_defaults(func=cmd_verify)
    pre = ssub.add_parser(
        "preview", help="a PNG grid of the first samples of each class of a converted split"
    )
    pre.add_argument("shard_dir", metavar="SHARD_DIR", help="directory of converted shards")
    pre.add_argument("--modality", choices=("fundus", "oct"), required=True)
    pre.add_argument("--split", choices=("train", "dev", "test"), required=True)
    pre.add_argument(
        "--per-class", type=positive_int, default=6, help="images per class (default 6)"
    )
    pre.add_argument("--out", type=png_path, required=True, metavar="FILE", help="PNG to write")
    pre.set_defaults(func=cmd_preview)


def cmd_preview(args: argparse.Namespace) -> int:
    from multieye_dist.track.plots import draw_shard_preview

    print(draw_shard_preview(args.shard_dir, args.modality, args.split, args.per_class, args.out))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default (synthetic, CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument(
        "--per-class",
        type=positive_int,
        default=100,
        help="train images per class (OCT; fundus too)",
    )
    p.add_argument(
        "--fundus-per-class",
        type=positive_int,
        default=30,
        help="fundus train images per class (default 30: scarce labels)",
    )
    p.add_argument(
        "--fundus-visibility",
        type=positive_float,
        default=None,
        help="multiplier of the synthetic findings' fundus opacity (default: the demo's, "
        "learnable in a short CPU run)",
    )
    p.add_argument(
        "--pool-per-class",
        type=positive_int,
        default=None,
        help="pretraining pool images per class and modality (default: --per-class): the "
        "concept alignment's data, disjoint from the students'",
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--workers", type=nonneg_int, default=0, help="data-tool processes (0 = all cores)"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides for every training stage (train.epochs=2)"
    )
    p.set_defaults(func=cmd_demo)


def _add_concepts(sub) -> None:
    from multieye_dist.model import concepts

    c = sub.add_parser("concepts", help="concept banks (text embeddings of the concept sentences)")
    csub = c.add_subparsers(dest="concepts_cmd", required=True)
    enc = csub.add_parser("encode", help="encode concept sentences with a local text encoder")
    concepts.add_encode_arguments(enc)
    enc.set_defaults(func=concepts.run_from_args)
    st = csub.add_parser(
        "stats", help="a bank's K, D, mean off-diagonal cosine and participation ratio"
    )
    st.add_argument("bank", type=Path, metavar="BANK", help="concept bank .safetensors")
    st.set_defaults(func=concepts.stats_main)


def _add_import(sub) -> None:
    from multieye_dist.model.concepts import DEFAULT_PROMPT, DEFAULT_SENTENCES

    p = sub.add_parser("import", help="map real weights (FLAIR, the released checkpoints) in")
    isub = p.add_subparsers(dest="import_cmd", required=True)
    f = isub.add_parser("flair", help="FLAIR's ResNet-50 + projection -> an init file")
    f.add_argument("checkpoint", type=Path, metavar="CKPT", help="FLAIR's weights (.pth)")
    f.add_argument("--out", type=Path, required=True, help="init .safetensors (model.weights=)")
    f.add_argument("--backbone", default="resnet50", help="timm name (default: %(default)s)")
    f.add_argument("--text-encoder", type=Path, help="local dir: FLAIR's BERT config+tokenizer")
    f.add_argument("--bank-out", type=Path, help="concept bank to write (with --text-encoder)")
    f.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES, help="one per line")
    f.add_argument("--prompt", default=DEFAULT_PROMPT, help="must contain {} (%(default)r)")
    f.set_defaults(func=cmd_import)
    r = isub.add_parser("release", help="a released OCT-CoDA checkpoint -> an inference export")
    r.add_argument("checkpoint", type=Path, metavar="CKPT", help="checkpoint_best.pth")
    r.add_argument("--out", type=Path, required=True, help="inference .safetensors")
    r.add_argument("--role", choices=("student", "teacher"), required=True)
    r.add_argument("--bank", type=Path, help="concept bank file (the release saves none)")
    r.add_argument("--image-size", type=positive_int, default=512, help="default: %(default)s")
    r.add_argument("--backbone", default="resnet50", help="timm name (default: %(default)s)")
    r.add_argument("--seed", type=nonneg_int, default=0, help="a teacher's random level-2 init")
    r.set_defaults(func=cmd_import)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain fundus images by concept")
    p.add_argument("--checkpoint", type=Path, required=True, help="inference .safetensors")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--topk", type=positive_int, default=5, help="concepts listed per image")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--plot",
        type=png_path,
        metavar="FILE",
        help="also draw FILE (.png): each image beside a bar chart of its top concept "
        "contributions to the predicted class",
    )
    _add_device(p)
    p.set_defaults(func=cmd_explain)


def png_path(text: str) -> Path:
    """An argparse ``type=`` for a picture to write: the pictures are PNG files."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text!r}: pictures are PNG, give a name ending in .png")
    return Path(text)


def _add_plots(sub) -> None:
    p = sub.add_parser(
        "plots",
        help="(re)draw a training run's pictures into RUN_DIR/plots/",
        description="Draw RUN_DIR/plots/*.png from the run's files: curves.png from "
        "metrics.jsonl (loss terms, dev metrics, learning rate against the step), and for each "
        "eval/NAME.records.json (the last dev evaluation, the test scores of the best and last "
        "models) confusion_NAME.png and roc_pr_NAME.png.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run's out_dir")
    p.set_defaults(func=cmd_plots)


def cmd_plots(args: argparse.Namespace) -> int:
    from multieye_dist.track.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the OCT teacher or a fundus student (DeepSpeed)")
    tsub = p.add_subparsers(dest="stage", required=True)
    for stage, text in (
        ("align", "stage 0: concept-alignment pre-training of one modality (an init)"),
        ("teacher", "stage 1: the OCT teacher, cross-entropy"),
        ("distill", "stage 2: a fundus student (OCT-CoDA, or loss.name=fundus-only)"),
    ):
        t = tsub.add_parser(stage, help=text)
        add_config_option(t)
        t.add_argument(
            "--resume",
            help='"auto" (default: the latest checkpoint in train.out_dir), '
            '"never", or a checkpoint directory',
        )
        t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
        t.set_defaults(func=cmd_train)


CONFIG_HELP = (
    "a packaged config's name (demo, teacher, distill: `multieye-dist config show --config "
    "NAME` lists its keys) or a YAML file (a diff over the defaults); relative paths are looked "
    "up in the working directory, then in the package"
)


def add_config_option(p: argparse.ArgumentParser) -> None:
    """``--config NAME|PATH``; load_config resolves it (an unknown name: exit 2, listing the
    packaged names and the closest)."""
    p.add_argument("--config", metavar="NAME|PATH", help=CONFIG_HELP)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="inspect run configs")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser(
        "show",
        help="every config key with its type, value, default and help",
        description="Print every key of the resolved config (the defaults, or --config with "
        "its base chain, then the overrides): its type, its value, its default where the value "
        "differs, and one line of help taken from the comments beside each field where its "
        "section is defined.",
    )
    add_config_option(show)
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    show.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    from multieye_dist.config import load_config
    from multieye_dist.confighelp import describe, render
    from multieye_dist.core.resources import find_config

    path = find_config(args.config) if args.config is not None else None
    cfg = load_config(path, args.overrides)
    source = path if path is not None else "the defaults"
    over = f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""
    print(f"# config: {source}{over}")
    print(render(describe(cfg)))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score an inference checkpoint on a shard split")
    p.add_argument("--checkpoint", type=Path, required=True, help="inference .safetensors")
    p.add_argument(
        "--shards",
        required=True,
        help="directory of converted shards, or a URL prefix (http(s)://, file:, pipe:...{name})",
    )
    p.add_argument("--split", default="test", choices=("train", "dev", "test"))
    p.add_argument(
        "--modality", choices=("fundus", "oct"), help="default: the one the model was trained on"
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--workers",
        type=nonneg_int,
        default=0,
        help="loader worker processes (default 0: load in this process)",
    )
    p.add_argument("--json", type=Path, help="also write the full result here")
    _add_device(p)
    p.set_defaults(func=cmd_eval)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        type=device_arg,
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where the model runs (default auto: the first GPU when there is one, else the CPU)",
    )


def device_arg(text: str):
    """An argparse ``type=`` for ``--device``: a torch.device that exists on this machine."""
    import os

    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text != "cpu" and not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda or cuda:N")
    device = torch.device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{text}: no CUDA GPU is visible here (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})"
            )
    return device


def cmd_train(args: argparse.Namespace) -> int:
    from multieye_dist.config import ConfigError, load_config
    from multieye_dist.train.loop import run

    overrides = [f"train.stage={args.stage}", *args.overrides]
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if cfg.train.stage != args.stage:
        raise ConfigError(
            f"train.stage={cfg.train.stage} contradicts the command 'train {args.stage}'"
        )
    summary = run(cfg)
    return 0 if summary is not None else 1


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from multieye_dist.model.checkpoint import load_inference
    from multieye_dist.track.metrics import format_table
    from multieye_dist.train.evaluation import evaluate_split

    model, meta = load_inference(args.checkpoint)
    model = model.to(args.device)
    modality = args.modality or meta.get("extra", {}).get("modality") or "fundus"
    result = evaluate_split(
        model,
        args.shards,
        modality,
        args.split,
        image_size=meta["image_size"],
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        concept_findings=meta.get("extra", {}).get("concept_findings"),
    )
    print(f"{args.checkpoint} on {modality}-{args.split} ({args.shards}):")
    print(format_table(result))
    if args.json:
        from multieye_dist.core.atomic import write_text

        write_text(args.json, json.dumps(result, indent=1))  # creates the parent directories
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from multieye_dist.model.importers import import_flair, import_release

    if args.import_cmd == "flair":
        summary = import_flair(
            args.checkpoint,
            args.out,
            backbone=args.backbone,
            text_encoder=args.text_encoder,
            bank_out=args.bank_out,
            sentences=args.sentences,
            prompt=args.prompt,
        )
    else:
        summary = import_release(
            args.checkpoint,
            args.out,
            role=args.role,
            bank=args.bank,
            image_size=args.image_size,
            backbone=args.backbone,
            seed=args.seed,
        )
    print(summary.text())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from multieye_dist.model.checkpoint import load_inference
    from multieye_dist.model.explain import explain_images

    model, meta = load_inference(args.checkpoint)
    results = explain_images(
        model,
        args.images,
        class_names=meta["class_names"],
        sentences=meta["concept_sentences"],
        image_size=meta["image_size"],
        topk=args.topk,
        device=args.device,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print("\n\n".join(r.text() for r in results))
    if args.plot is not None:
        from multieye_dist.track.plots import plot_explanations

        picture = plot_explanations(results, args.plot)
        print(f"picture: {picture}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from multieye_dist.data.synth import SynthOptions, generate

    opts = SynthOptions(
        per_class=args.per_class,
        seed=args.seed,
        image_size=args.image_size,
        oct_image_size=args.oct_image_size,
        imbalance=args.imbalance,
        workers=args.workers,
        fundus_per_class=args.fundus_per_class,
        fundus_visibility=args.fundus_visibility,
        pool=args.pool,
    )
    t0 = time.perf_counter()
    summary = generate(args.out, opts)
    for modality, splits in summary.items():
        for split, counts in splits.items():
            print(f"{modality}-{split}: {sum(counts)} images, per class {counts}")
    print(f"wrote in {time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from multieye_dist.data.shards import convert

    t0 = time.perf_counter()
    summary = convert(args.root, args.out, convert_options(args), progress=not args.no_progress)
    print(summary.table())
    print(f"converted in {time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from multieye_dist.data.verify import verify
    from multieye_dist.data.workers import resolve_workers

    report = verify(args.shards, workers=resolve_workers(args.workers))
    print(report.text())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from multieye_dist.demo import run_demo

    return run_demo(
        args.out,
        per_class=args.per_class,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
        extra=args.overrides,
        fundus_per_class=args.fundus_per_class,
        fundus_visibility=args.fundus_visibility,
        pool_per_class=args.pool_per_class,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multieye-dist", description=__doc__, epilog=EXIT_STATUS_HELP
    )
    parser.add_argument("--version", action="version", version=f"multieye-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_synth(sub)
    _add_shards(sub)
    _add_demo(sub)
    _add_train(sub)
    _add_config(sub)
    _add_eval(sub)
    _add_explain(sub)
    _add_plots(sub)
    _add_concepts(sub)
    _add_import(sub)
    return parser


EXIT_FAILURE, EXIT_USAGE, EXIT_IOERR = 1, 2, 74  # 74: sysexits.h EX_IOERR
EXIT_STATUS_HELP = (
    "exit status: 0 done; 1 failed (verify found problems, training stopped, bad data, a "
    "checkpoint that cannot be saved or resumed from); 2 usage, configuration or input error, "
    "or a named file that does not exist; 74 an operating-system error reading or writing a "
    "file (disk full, read-only file system, permission denied, a path that is a file): one "
    "line on stderr names the path and the operation."
)
# What failed, by the innermost function of the traceback (the error itself does not say).
_OPERATIONS = {
    "mkdir": "create the directory",
    "makedirs": "create the directory",
    "open": "open",
    "read_text": "read",
    "read_bytes": "read",
    "write_text": "write",
    "write_bytes": "write",
    "touch": "create",
    "unlink": "remove",
    "remove": "remove",
    "rmdir": "remove",
    "rmtree": "remove",
    "rename": "rename",
    "replace": "rename",
    "copyfile": "copy",
    "copy2": "copy",
    "copytree": "copy",
    "chmod": "change the mode of",
    "stat": "read",
    "iterdir": "list",
    "scandir": "list",
    "listdir": "list",
}
_OS_HINTS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a parent of that path is a file",
    errno.EEXIST: "a file is in the way",
    errno.EACCES: "check the owner and mode, or choose another place",
    errno.EPERM: "check the owner and mode, or choose another place",
}


def _os_error_text(exc: OSError) -> str:
    """One line for the user: ``cannot OPERATION PATH: REASON (HINT)``. Our writers' errors
    carry their own text (``cannot write PATH: ...``, see multieye_dist.core.atomic); an error a
    worker process re-raised has the original on its last line."""
    if exc.filename is None:
        text = exc.strerror if exc.errno is not None and exc.strerror else str(exc)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else type(exc).__name__
    else:
        # The outermost file operation on the way to the error: mkdir(exist_ok=True) fails in
        # the stat it makes after the refused mkdir, and that is still "create the directory".
        op, tb = "access", exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in _OPERATIONS:
                op = _OPERATIONS[tb.tb_frame.f_code.co_name]
                break
            tb = tb.tb_next
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else f"{exc.filename}"
        text = f"cannot {op} {target}: {exc.strerror}"
    hint = _OS_HINTS.get(exc.errno)
    return f"{text} ({hint})" if hint else text


# Libraries whose notices are for whoever debugs them: shown with -v only. DeepSpeed reports
# every engine detail at INFO; torch.distributed and torch's extension builder warn about
# things that do not concern a user of this tool (no CUDA runtime on a CPU machine, gloo's
# hostname resolution).
_QUIET_LOGGERS = {
    "DeepSpeed": logging.WARNING,
    "torch.distributed": logging.ERROR,
    "torch.utils.cpp_extension": logging.ERROR,
}


def _setup_logging(verbose: bool, rank: str) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == "0" else logging.WARNING,  # one voice per job
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    if not verbose:
        for name, quiet in _QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os

    _setup_logging(args.verbose, os.environ.get("RANK", "0"))
    from multieye_dist.data.batch import DataError
    from multieye_dist.data.layout import LayoutError
    from multieye_dist.data.shards import ConversionError

    try:
        return args.func(args)
    except BrokenPipeError:  # `multieye-dist config show | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except KeyboardInterrupt:  # Ctrl-C before train installs its own handler: no traceback
        print("multieye-dist: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:  # a path given that is not there: usage, as before
        text = str(exc) if exc.errno is None else _os_error_text(exc)
        print(f"multieye-dist: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # disk full, read-only, permission, a path that is a file...
        print(f"multieye-dist: error: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_IOERR
    except (LayoutError, ConversionError, ValueError) as exc:
        print(f"multieye-dist: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as exc:
        print(f"multieye-dist: data error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as exc:
        from multieye_dist.train.engine import CheckpointError

        if isinstance(exc, CheckpointError):
            print(f"multieye-dist: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if type(exc).__name__ != "TrainingError":
            raise
        print(f"multieye-dist: training stopped: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
