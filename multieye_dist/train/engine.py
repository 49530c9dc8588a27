"""The one module that owns DeepSpeed: process group, engine, and resumable checkpoints.

Precision (``train.precision``):

* ``autocast-bf16`` (default): DeepSpeed's ``torch_autocast`` mode. Weights, BatchNorm and the
  optimizer stay fp32; convolutions and matmuls run in bf16 under ``torch.autocast``. Exported
  weights are the exact fp32 ones. Chosen by measurement: see BENCHMARKS.md ("Precision").
* ``bf16``: DeepSpeed's bf16 mode. The module's weights are bf16 with fp32 master copies in the
  optimizer; inputs are cast to bf16.
* ``fp32``: no mixed precision.

Checkpoints: ``<out_dir>/checkpoints/<tag>/`` holds DeepSpeed's files and our
``trainer_state.json``; ``<out_dir>/checkpoints/latest`` names the newest *complete* one. Every
state file, and DeepSpeed's ``zero_to_fp32.py`` recovery scripts, are written through
:mod:`multieye_dist.core.atomic`, ``latest`` is replaced only after every rank has
finished writing, and loading uses ``torch.load(weights_only=True)`` with exactly the DeepSpeed
classes its optimizer state holds allow-listed (no arbitrary unpickling).

Faults: a save that fails on any rank (disk full...) raises on every rank, the failing rank's
error naming the file, with `latest` and the earlier checkpoints untouched and the incomplete
tag directory removed. ``trainer_state.json`` records each DeepSpeed file's size; resuming
("auto") checks them, and the zip files' CRCs, before loading, and falls back, with a warning
naming the damaged checkpoint, to the newest whole one before it (also when loading fails).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import sys
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from multieye_dist.config import DeepSpeedConfig, OptimConfig, merge_dicts
from multieye_dist.core.atomic import (
    is_temp_name,
    move_into_place,
    open_atomic,
    remove_temp_files,
    write_bytes,
    write_text,
)
from multieye_dist.core.distributed import DistEnv, backend_for, export_env, initialized, world_size
from multieye_dist.model.concept_model import param_groups
from multieye_dist.track.records import STATE_FILE
from multieye_dist.train.schedule import lr_at

logger = logging.getLogger(__name__)

LATEST = "latest"


# DeepSpeed's C++ ops that it compiles at first use into torch's extension folder
# (use_own_extensions_dir) when its wheel was built without them (install.sh: DS_BUILD_OPS=0),
# by the builder's name: what the user waits for. On the CPU accelerator, the process group's
# shared-memory op is built by init_distributed (measured: 35-55 s on 2 cores); cpu_adam is
# never built here (the optimizer is torch's AdamW).
_JIT_OPS = {"ShareMemCommBuilder": "about a minute"}


def use_own_extensions_dir() -> str:
    """Point torch's extension cache at this Python environment's own folder, unless the user
    chose one (TORCH_EXTENSIONS_DIR). The default, ~/.cache/torch_extensions, is shared by every
    environment of the user: a build made from another environment's DeepSpeed has other include
    paths, so torch rebuilds it (a silent minute or more at every start, back and forth when two
    environments alternate, and on every node of a cluster with a shared $HOME)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        prefix = Path(sys.prefix)
        own = prefix / "var" / "torch_extensions"
        if not os.access(prefix, os.W_OK):  # a system installation: a folder per environment
            tag = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
            own = Path.home() / ".cache" / "torch_extensions" / f"env-{tag}"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(own)
    return os.environ["TORCH_EXTENSIONS_DIR"]


def jit_builds_pending() -> list[tuple[str, str]]:
    """(name, expected duration) of the DeepSpeed ops that joining the process group will
    compile now: compatible with this machine, not in DeepSpeed's wheel nor in torch's
    extension cache."""
    import glob

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    root = use_own_extensions_dir()  # the folder torch builds into, set if it was not
    pending = []
    for builder_name in _JIT_OPS:
        builder = get_accelerator().create_op_builder(builder_name)
        name = getattr(builder, "NAME", None)
        if name is None or not deepspeed.ops.__compatible_ops__.get(name, False):
            continue  # DeepSpeed will not build it either
        if installed_ops.get(name):
            continue  # in the wheel
        if glob.glob(f"{glob.escape(root)}/{name}/{name}*.so"):  # torch builds in <root>/<name>/
            continue
        pending.append((name, _JIT_OPS[builder_name]))
    return pending


def _announce_jit_builds(env: DistEnv) -> None:
    if not env.is_main:
        return
    try:
        pending = jit_builds_pending()
    except Exception as exc:  # a DeepSpeed layout we do not know: only the notice is lost
        logger.debug("cannot tell whether DeepSpeed will compile ops now: %s", exc)
        return
    for name, duration in pending:
        logger.info(
            "DeepSpeed compiles its %s op now, once per machine (first run only: %s on 2 "
            "cores; cached in %s)",
            name,
            duration,
            use_own_extensions_dir(),
        )


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int = 1800) -> None:
    """Join the process group (gloo on CPU, NCCL on GPU) through DeepSpeed, from `env`."""
    import deepspeed

    export_env(env)
    use_own_extensions_dir()  # before DeepSpeed builds anything
    _announce_jit_builds(env)
    with _prints_to_debug():
        deepspeed.init_distributed(
            dist_backend=backend_for(device),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=timeout_s),
            rank=env.rank,
            world_size=env.world,
        )


@contextlib.contextmanager
def _prints_to_debug() -> Iterator[None]:
    """DeepSpeed print()s some notices ("DeepSpeed deepspeed_shm_comm built successfully")
    besides logging them: to our log at DEBUG (shown with -v), not to the user's console."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                logger.debug("deepspeed: %s", line)


def ds_config(
    optim: OptimConfig, ds: DeepSpeedConfig, precision: str, micro_batch: int, world: int
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro_batch * optim.grad_accum * world,
        "zero_optimization": {"stage": ds.zero_stage},
        # Our optimizer is torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam would need a
        # CUDA extension build at run time.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "autocast-bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return merge_dicts(cfg, ds.extra)


def build_engine(
    model: torch.nn.Module,
    *,
    optim: OptimConfig,
    ds: DeepSpeedConfig,
    precision: str,
    micro_batch: int,
    world: int,
    steps_per_epoch: int,
    epochs: int,
    universal: bool = False,
):
    """DeepSpeed engine over `model` with AdamW and the warm-up + cosine schedule (per step).
    ``universal``: it will resume from a universal checkpoint (:func:`universal_checkpoint`)."""
    import deepspeed

    on_cuda = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(
        param_groups(model, optim.weight_decay, optim.lr, optim.lr_scale),
        lr=optim.lr,
        betas=optim.betas,
        fused=on_cuda,  # one kernel for all parameters on GPU
    )
    warmup, total = optim.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch

    def factor(step: int) -> float:
        return (
            lr_at(step, lr=optim.lr, min_lr=optim.min_lr, warmup_steps=warmup, total_steps=total)
            / optim.lr
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    config = ds_config(optim, ds, precision, micro_batch, world)
    if universal:
        config = merge_dicts(config, {"checkpoint": {"load_universal": True}})
    with _prints_to_debug():
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=config
        )
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    if hasattr(engine.checkpoint_engine, "deferred"):  # ours, not a user-chosen engine
        _install_atomic_recovery_scripts(engine)
    if precision == "bf16":
        # DeepSpeed casts parameters, not buffers: BatchNorm's fp32 running statistics beside
        # bf16 weights make batch_norm fail on CPU ("expected scalar type BFloat16").
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    return engine


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


# ----------------------------------------------------------------------------- checkpoints

# In trainer_state.json: the size of every file DeepSpeed wrote into the tag directory, so that
# a truncated or missing file is found before anything is loaded (see checkpoint_problem).
FILES_KEY = "files"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format; the legacy pickle format is not checked
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed 0.19's, in utils/
# find_checkpoint("auto") -> the checkpoints load_checkpoint tries, in order, if its choice fails.
_FALLBACKS: dict[Path, list[Path]] = {}


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or resumed from; the message names it and why."""


def _safe_checkpoint_engine(current):
    """DeepSpeed's torch checkpoint engine with atomic saves and weights-only loads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    if type(current) is not TorchCheckpointEngine:  # a user-chosen engine (nebula, ...): keep
        logger.warning("checkpoint engine %s kept as configured", type(current).__name__)
        return current

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        # A list while save_checkpoint runs DeepSpeed's save: this rank's write errors are kept
        # there, not raised, so that it still reaches DeepSpeed's closing barrier with the others.
        deferred: list[Exception] | None = None

        def makedirs(self, path, exist_ok=False) -> None:
            try:
                super().makedirs(path, exist_ok=exist_ok)
            except OSError as exc:
                _defer(self, exc)

        def save(self, state_dict, path: str) -> None:
            # DeepSpeed writes every model, optimizer and ZeRO state file through this method:
            # torch.save streams into the atomic writer's file, so no rank leaves half a file.
            try:
                with open_atomic(path, "wb") as fh:
                    torch.save(
                        state_dict, fh, _use_new_zipfile_serialization=self.zipfile_serialization
                    )
            except Exception as exc:
                _defer(self, exc)

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    return safe


def _defer(checkpoint_engine, exc: Exception) -> None:
    """Keep `exc` for save_checkpoint while DeepSpeed saves; raise it at any other time."""
    errors = getattr(checkpoint_engine, "deferred", None)
    if errors is None:
        raise exc
    errors.append(exc)


def _install_atomic_recovery_scripts(engine) -> None:
    """DeepSpeed copies its zero_to_fp32.py recovery scripts into the checkpoint directory with
    a plain copyfile at every save, over the previous copies: a full disk would leave half a
    script. Write them atomically instead, only when missing or different, errors deferred
    like those of the state files."""
    import deepspeed

    source = Path(deepspeed.__file__).parent / "utils"

    def copy(save_path: str) -> None:
        for name in _RECOVERY_SCRIPTS:
            src, dst = source / name, Path(save_path) / name
            try:
                data = src.read_bytes()
                if dst.is_file() and dst.read_bytes() == data:
                    continue
                write_bytes(dst, data)
                os.chmod(dst, dst.stat().st_mode | stat.S_IXUSR)  # as DeepSpeed does
            except FileNotFoundError as exc:
                if exc.filename == str(src):
                    continue  # a DeepSpeed without this script
                _defer(engine.checkpoint_engine, exc)
            except OSError as exc:
                _defer(engine.checkpoint_engine, exc)

    engine._copy_recovery_script = copy


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed's optimizer state files hold (checked on 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _any_rank(failed: bool, device: torch.device) -> bool:
    """Collective: whether `failed` is true on some rank (every rank gets the same answer)."""
    if not (initialized() and world_size() > 1):
        return failed
    import torch.distributed as dist

    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _raise_first(errors: list[Exception], what: str) -> None:
    """This rank's first error (an OS error names the file), or, if another rank failed, an
    error saying so: every rank stops together."""
    if errors:
        raise errors[0]
    raise CheckpointError(f"{what}: failed on another rank (its error says why)")


def save_checkpoint(engine, ckpt_dir: Path, tag: str, state: dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank writes its part; `latest` moves to `tag` once all are done. With
    ``keep`` > 0, rank 0 then deletes all but the newest ``keep`` complete checkpoints (by
    step; `latest` is always among them): a run's disk use stays bounded.

    A failure on any rank (disk full, read-only file system...) raises on every rank: the
    failing rank's own error, naming the file; `latest` and the previous checkpoints are left
    as they were, and the incomplete tag directory is removed (it has no trainer state)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / tag
    ce = engine.checkpoint_engine
    errors: list[Exception] = []
    if hasattr(ce, "deferred"):
        ce.deferred = errors
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={}, save_latest=False)
    except Exception as exc:  # not one of ours: DeepSpeed's own (the others may be waiting)
        errors.append(exc)
    finally:
        if hasattr(ce, "deferred"):
            ce.deferred = None
    if _any_rank(bool(errors), engine.device):
        if engine.global_rank == 0:
            _remove_incomplete(path)
        _raise_first(errors, f"saving checkpoint {path}")
    if engine.global_rank == 0:
        try:
            _commit(ckpt_dir, tag, state, keep)
        except Exception as exc:
            errors.append(exc)
            _remove_incomplete(path)
    if _any_rank(bool(errors), engine.device):
        _raise_first(errors, f"saving checkpoint {path}")
    return path


def _commit(ckpt_dir: Path, tag: str, state: dict[str, Any], keep: int) -> None:
    """Rank 0, once every rank's files are written: the trainer state (with the files' sizes;
    its presence marks the checkpoint complete), then `latest`, then pruning."""
    path = ckpt_dir / tag
    files = {
        p.name: p.stat().st_size
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != STATE_FILE and not is_temp_name(p.name)
    }
    write_text(path / STATE_FILE, json.dumps({**state, FILES_KEY: files}, indent=1))
    write_text(ckpt_dir / LATEST, tag)
    logger.info("checkpoint %s saved (step %s)", path, state.get("step"))
    if keep > 0:
        prune_checkpoints(ckpt_dir, keep)


def _remove_incomplete(path: Path) -> None:
    """Delete the tag directory of a failed save, unless a complete checkpoint (one with a
    trainer state: the same tag saved earlier) is there."""
    import shutil

    if path.is_dir() and not (path / STATE_FILE).is_file():
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed the incomplete checkpoint %s", path)


def _read_state(path: Path) -> dict[str, Any] | None:
    """The trainer state of the checkpoint at `path`, or None if it is missing or damaged."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    return state if isinstance(state, dict) else None


def _step(state: dict[str, Any] | None) -> int | None:
    step = None if state is None else state.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints under ``ckpt_dir`` (ordered by
    their trainer state's step; the one `latest` names is never deleted, nor one whose trainer
    state is damaged). Returns the deleted. A deletion that fails is a warning: the checkpoints
    kept are whole, only the disk use grows."""
    import shutil

    latest_file = ckpt_dir / LATEST
    latest = latest_file.read_text(encoding="utf-8").strip() if latest_file.is_file() else None
    steps = {d: _step(_read_state(d)) for d in ckpt_dir.iterdir() if d.is_dir()}
    done = [d for d, step in steps.items() if step is not None]
    old = sorted(done, key=steps.__getitem__, reverse=True)[keep:]
    old = [d for d in old if d.name != latest]
    for d in old:
        try:
            shutil.rmtree(d)
        except OSError as exc:
            logger.warning(
                "checkpoint %s not deleted (train.keep_checkpoints=%d): %s", d, keep, exc
            )
            continue
        logger.info("checkpoint %s deleted (train.keep_checkpoints=%d)", d, keep)
    return old


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, found without loading it, or None
    if it looks whole: its trainer state parses, every file it lists is there at its saved
    size, and each torch zip file reads with every CRC-32 right (:func:`_zip_problem`).
    Checkpoints saved before the sizes were recorded get the zip check of their ``*.pt`` files
    only."""
    state = _read_state(path)
    if state is None:
        if not (path / STATE_FILE).is_file():
            return f"{STATE_FILE} is missing (an incomplete save)"
        return f"{STATE_FILE} is damaged (not a JSON object)"
    files = state.get(FILES_KEY)
    if files is None:
        files = {p.name: None for p in sorted(path.glob("*.pt"))}
    if not isinstance(files, dict) or not all(isinstance(n, str) for n in files):
        return f"{STATE_FILE}: {FILES_KEY!r} is not a mapping of file names to sizes"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror})"
        if size is not None and actual != size:
            return f"{name} is {actual} bytes, {size} when saved (truncated or overwritten)"
        problem = _zip_problem(path / name)
        if problem:
            return f"{name} {problem}"
    return None


def _zip_problem(path: Path) -> str | None:
    """What is wrong with a torch zip file: no central directory (truncated), or a member
    whose CRC-32 differs (torch.load does not check them: damaged tensor bytes would load as
    wrong weights). One read of the file, about 1 GB/s; loading then reads it from the cache."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != _ZIP_MAGIC:
                return None
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return f"is not a whole torch file ({exc})"
    return None if bad is None else f"is damaged (member {bad} fails its CRC check)"


def find_checkpoint(resume: str, ckpt_dir: Path) -> Path | None:
    """`resume`: "auto" (the latest complete one under ckpt_dir, if any), "never", or a path to a
    checkpoint tag directory. A named checkpoint that is not there, or damaged, is an error.

    "auto" checks the one `latest` names (:func:`checkpoint_problem`); if it is
    damaged (or `latest` is), it warns, naming it and why, and takes the newest whole one
    before it; if none is whole, that is an error. The older ones stay candidates should
    loading fail (:func:`load_checkpoint`). Nothing is written or deleted here: a refused
    command must leave the run directory as it was (:func:`remove_stale_temps` tidies once the
    run holds its lock)."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"train.resume={resume!r}: not a checkpoint directory (no {STATE_FILE}); use "
                "'auto', 'never' or a path like <out_dir>/checkpoints/<tag>"
            )
        problem = checkpoint_problem(path)
        if problem:
            raise FileNotFoundError(
                f"train.resume={resume!r}: the checkpoint is damaged: {problem}; name another "
                "one, or use 'auto' or 'never'"
            )
        return path
    candidates, why_not = _auto_candidates(ckpt_dir)
    skipped: list[str] = [] if why_not is None else [why_not]
    for i, path in enumerate(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s: %s", path, "; ".join(skipped))
            _FALLBACKS[path.resolve()] = candidates[i + 1 :]
            return path
        skipped.append(f"{path} is damaged: {problem}")
    if not skipped:
        return None  # nothing saved yet
    raise FileNotFoundError(
        f"no whole checkpoint to resume from in {ckpt_dir}: {'; '.join(skipped)}; "
        "remove the damaged ones, or start over with train.resume=never"
    )


def _auto_candidates(ckpt_dir: Path) -> tuple[list[Path], str | None]:
    """The checkpoints "auto" may resume from, best first: the one `latest` names, then the
    complete ones older than it by step, newest first (all of them if its step is unknown);
    and what is wrong with `latest` itself, if anything."""
    latest = ckpt_dir / LATEST
    tag = latest.read_text(encoding="utf-8", errors="replace").strip() if latest.is_file() else ""
    steps = {d: _step(_read_state(d)) for d in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else ())}
    named = ckpt_dir / tag if tag and "/" not in tag and tag not in (".", "..") else None
    if named is not None and not named.is_dir():
        named = None
    why_not = None
    if named is None and latest.is_file():
        why_not = f"{latest} is damaged (it names {tag[:80]!r}, not a checkpoint directory)"
    elif named is None and any(s is not None for s in steps.values()):
        why_not = f"{latest} is missing"
    limit = steps.get(named) if named is not None else None
    older = sorted(
        (d for d, s in steps.items() if s is not None and d != named),
        key=steps.__getitem__,
        reverse=True,
    )
    older = [d for d in older if limit is None or steps[d] < limit]
    return ([named] if named is not None else []) + older, why_not


def remove_stale_temps(ckpt_dir: Path) -> None:
    """Delete the temporary files a killed save left in ckpt_dir and its tag directories. Call
    it holding the run directory's lock (train.setup does, on rank 0): then no save of another
    job can be writing them."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    remove_temp_files(ckpt_dir)
    for d in ckpt_dir.iterdir():
        if d.is_dir():
            remove_temp_files(d)


def load_checkpoint(
    engine, path: Path, fallbacks: list[Path] | None = None, universal: bool = False
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and DeepSpeed's counters; return our trainer state.
    ``universal``: through the checkpoint's universal form (another number of ranks; the
    engine was built with ``build_engine(universal=True)``).

    If loading fails on any rank, every rank warns and moves on together to the next whole
    checkpoint of `fallbacks` (default: those find_checkpoint("auto") left for `path`; none
    for a checkpoint named explicitly); if none is left, :class:`CheckpointError`."""
    path = Path(path)
    queue = list(_FALLBACKS.pop(path.resolve(), []) if fallbacks is None else fallbacks)
    while True:
        error = _try_load(engine, path, universal)
        if not _any_rank(error is not None, engine.device):
            break
        reason = _first_line(error) if error is not None else "failed on another rank"
        following = _next_whole(queue)
        if following is None:
            raise CheckpointError(
                f"cannot resume from {path}: {reason}; name another checkpoint with "
                "train.resume=<dir>, or start over with train.resume=never"
            )
        logger.warning(
            "checkpoint %s does not load (%s): resuming from %s", path, reason, following
        )
        path = following
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    state.pop(FILES_KEY, None)
    logger.info("resumed from %s (step %s)", path, state.get("step"))
    return state


def _try_load(engine, path: Path, universal: bool) -> Exception | None:
    try:
        if universal:  # collective; raises on every rank alike
            universal_checkpoint(path, engine.device)
        with _weights_only_loads() if universal else contextlib.nullcontext():
            loaded, _ = engine.load_checkpoint(
                str(path) if universal else str(path.parent),
                tag=UNIVERSAL if universal else path.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
    except Exception as exc:  # torch's reader, DeepSpeed's checks, a missing key...
        return exc
    return None if loaded is not None else CheckpointError("DeepSpeed found no model file")


def _next_whole(queue: list[Path]) -> Path | None:
    """Pop checkpoints off `queue` until one passes checkpoint_problem (warning for the others)."""
    while queue:
        path = queue.pop(0)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged: %s", path, problem)
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- elastic resume

UNIVERSAL = "universal"  # <tag>/universal: DeepSpeed's universal form of checkpoint <tag>


def universal_checkpoint(path: Path, device: torch.device) -> Path:
    """Collective: DeepSpeed's *universal* checkpoint of `path` (converted by rank 0 the first
    time, into ``<path>/universal``), which a different number of ranks can load: each rank then
    takes its own ZeRO partition of every parameter's fp32 weights and Adam moments.

    Why this and not a consolidated state saved at every checkpoint: the conversion runs once,
    at the resume that needs it, so ordinary saves stay per-rank and cheap; and it is
    DeepSpeed's own format for resharding ZeRO 1/2 optimizer state. Its converter unpickles
    the checkpoint's files with ``weights_only=False``; here it runs with every ``torch.load``
    forced to weights-only with DeepSpeed's classes allow-listed (as our own loads), in
    process (one worker), output first into ``universal.partial`` and renamed when complete.
    """
    import shutil

    out = path / UNIVERSAL
    error: Exception | None = None
    if not initialized() or torch.distributed.get_rank() == 0:
        if not out.is_dir():
            partial = path / f"{UNIVERSAL}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                _convert_to_universal(path, partial)
                move_into_place(partial, out)
                logger.info("converted %s to DeepSpeed's universal checkpoint %s", path, out)
            except Exception as exc:  # every rank must hear of it: they wait for this one
                error = exc
                shutil.rmtree(partial, ignore_errors=True)
    if _any_rank(error is not None, device):
        _raise_first(
            [CheckpointError(f"cannot convert {path} for another number of ranks: {error}")]
            if error is not None
            else [],
            f"converting {path}",
        )
    return out


def _convert_to_universal(path: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(out),
        num_extract_workers=1,  # in this process: the weights-only loads below apply
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our models carry no Megatron-style parameter patterns
    )
    if not any(path.glob("*optim_states.pt")):
        raise CheckpointError(
            f"{path} has no ZeRO optimizer state files (*optim_states.pt): only ZeRO 1 and 2 "
            "checkpoints (deepspeed.zero_stage=1 or 2, or bf16) can resume on another number "
            "of ranks"
        )
    with _weights_only_loads(), _prints_to_debug(), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in this process (DeepSpeed's converter and universal loader call it
    with ``weights_only=False``) made weights-only, DeepSpeed's state classes allow-listed."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
