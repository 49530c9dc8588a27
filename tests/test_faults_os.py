"""Operating-system faults and damaged checkpoints (issue 16, part C), provoked for real: a full
tmpfs, a read-only mount, a file where a directory should be, an unprivileged user, a writer
killed with SIGKILL, truncated and bit-flipped checkpoint files. Each test checks the message
(one line naming the path and the operation, exit status 74 for OS errors) and that nothing was
lost: old files intact, no temporary file left, previous manifests and checkpoints usable."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from multieye_dist.cli import EXIT_IOERR, EXIT_USAGE, main
from multieye_dist.core.atomic import is_temp_name, open_atomic, remove_temp_files, write_bytes
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import PROGRESS_DIR, ConversionError, ConvertOptions, convert
from multieye_dist.data.verify import verify
from multieye_dist.train import engine as E

NOBODY = 65534


# ----------------------------------------------------------------------------- fixtures


def _run_mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(dir, size, read_only=False): a real tmpfs there (unmounted at the end); skips
    where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(where: Path, size: str, read_only: bool = False) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        proc = _run_mount("-t", "tmpfs", "-o", opts, "tmpfs", str(where))
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip()}): needs root")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def as_nobody():
    """A context manager running its block with the effective uid/gid of `nobody` (root
    ignores file modes, so EACCES needs an unprivileged user)."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")

    @contextlib.contextmanager
    def nobody():
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    return nobody


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def _error_line(capsys) -> str:
    """The one line main() printed on stderr (logging goes to pytest's handler in-process)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte: the filler file it wrote."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (1 << 16, 1 << 12, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk) == chunk:
                    pass
    finally:
        os.close(fd)
    return filler


def _killed_writer(target: Path) -> Path:
    """A real process killed with SIGKILL half-way through an atomic write of `target`: the
    temporary file it leaves behind."""
    code = (
        "import os, signal, sys\n"
        "from multieye_dist.core.atomic import open_atomic\n"
        "with open_atomic(sys.argv[1], 'wb') as fh:\n"
        "    fh.write(b'half of it'); fh.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p for p in target.parent.iterdir() if is_temp_name(p.name)]
    assert len(left) == 1 and left[0].name.startswith(f".{target.name}."), left
    return left[0]


# ----------------------------------------------------------------------------- the writer


def test_full_disk_names_the_target_keeps_the_old_file_and_no_temp(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", "64k")
    target = disk / "data.bin"
    write_bytes(target, b"old contents")
    with pytest.raises(OSError) as info:
        write_bytes(target, os.urandom(256 * 1024))
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).endswith(f"cannot write {target}: No space left on device")
    assert target.read_bytes() == b"old contents" and _temps(disk) == []


def test_torch_save_on_a_full_disk_is_the_os_error_not_torchs(tmp_path, tmpfs):
    """torch.save turns the failed write into RuntimeError('unexpected pos ...'): the writer
    finds the OSError behind it, and so does the checkpoint engine DeepSpeed writes through."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    disk = tmpfs(tmp_path / "disk", "256k")
    big = {"w": torch.zeros(256 * 1024)}  # 1 MiB
    with pytest.raises(OSError, match=f"cannot write {disk / 'a.pt'}: No space left") as info:
        with open_atomic(disk / "a.pt") as fh:
            torch.save(big, fh)
    assert info.value.errno == errno.ENOSPC
    safe = E._safe_checkpoint_engine(TorchCheckpointEngine())
    with pytest.raises(OSError, match=f"cannot write {disk / 'b.pt'}: No space left"):
        safe.save(big, str(disk / "b.pt"))
    assert list(disk.iterdir()) == []


def test_read_only_file_system_names_the_target(tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro", "1m", read_only=True)
    with pytest.raises(OSError, match=f"cannot write {ro / 'x.json'}: Read-only file system"):
        write_bytes(ro / "x.json", b"{}")


def test_temp_files_of_a_killed_writer_are_removed_and_only_those(tmp_path):
    left = _killed_writer(tmp_path / "out.json")
    mine = [tmp_path / n for n in (".notes.tmp", "data.tmp", ".out.json.1234567.tmp", ".x.tmp~")]
    for p in mine:
        p.write_text("a user's file")
    assert remove_temp_files(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in mine)


# ----------------------------------------------------------------------------- commands


def _synth(out: Path) -> list[str]:
    return ["synth", "--out", str(out), "--per-class", "2", "--image-size", "32"]


def _convert(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "shards", "convert", "--root", str(root), "--out", str(out), "--modality", "fundus",
        "--splits", "dev", "--shard-samples", "7", "--workers", "1", "--image-size", "32",
        "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["synth", "convert"])
def test_commands_on_a_full_disk_exit_74_naming_the_file(
    command, synth_root, tmp_path, tmpfs, capsys
):
    disk = tmpfs(tmp_path / "disk", "64k")
    argv = _synth(disk / "x") if command == "synth" else _convert(synth_root, disk / "s")
    assert main(argv) == EXIT_IOERR
    line = _error_line(capsys)
    assert line.startswith(f"multieye-dist: error: cannot write {disk}/")
    assert line.endswith(": No space left on device (disk full)")
    assert _temps(disk) == []
    assert not list(disk.rglob("*.manifest.json"))


@pytest.mark.parametrize("command", ["synth", "convert"])
@pytest.mark.parametrize("fault", ["read-only", "parent is a file", "out is a file"])
def test_commands_on_an_unwritable_place_exit_74_naming_it(
    command, fault, synth_root, tmp_path, tmpfs, capsys
):
    if fault == "read-only":
        place, reason = (
            tmpfs(tmp_path / "ro", "1m", read_only=True) / "out",
            "Read-only file system",
        )
    elif fault == "parent is a file":
        (tmp_path / "file").write_text("a user's file")
        place, reason = (
            tmp_path / "file" / "out",
            "Not a directory (a parent of that path is a file)",
        )
    else:
        place, reason = tmp_path / "file", "Not a directory (a parent of that path is a file)"
        place.write_text("a user's file")  # the message names the first directory below it
    argv = _synth(place) if command == "synth" else _convert(synth_root, place)
    assert main(argv) == EXIT_IOERR
    line = _error_line(capsys)
    assert line.startswith(f"multieye-dist: error: cannot create the directory {place}")
    assert line.endswith(reason)
    if fault != "read-only":
        assert (tmp_path / "file").read_text() == "a user's file"


def test_permission_denied_exits_74_naming_the_path(tmp_path, as_nobody, capsys):
    import multieye_dist.data.synth  # noqa: F401  imported as root: nobody cannot read all

    out = tmp_path / "out"  # under pytest's 0700 directory: nobody may not enter it
    with as_nobody():
        status = main(_synth(out))
    assert status == EXIT_IOERR
    line = _error_line(capsys)
    assert line.startswith(f"multieye-dist: error: cannot create the directory {out}")
    assert line.endswith("Permission denied (check the owner and mode, or choose another place)")
    assert not out.exists()


@pytest.fixture
def public_dir():
    """A directory every user may enter (pytest's own are 0700), removed afterwards."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="multieye-faults-"))
    path.chmod(0o755)
    for parent in path.parents:
        if parent.stat().st_mode & 0o001 == 0:
            pytest.skip(f"{parent} is not searchable by other users")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_eval_of_an_unreadable_checkpoint_exits_74(public_dir, teacher_ckpt, as_nobody, capsys):
    import multieye_dist.track.metrics  # noqa: F401
    import multieye_dist.train.evaluation  # noqa: F401  imported as root

    ckpt = public_dir / "best.safetensors"  # nobody reaches it, but may not read it
    shutil.copy(teacher_ckpt, ckpt)
    ckpt.chmod(0o600)
    with as_nobody():
        status = main(["eval", "--checkpoint", str(ckpt), "--shards", str(public_dir)])
    assert status == EXIT_IOERR
    line = _error_line(capsys)
    assert line == f"multieye-dist: error: cannot open {ckpt}: Permission denied " + (
        "(check the owner and mode, or choose another place)"
    )


def test_a_missing_input_stays_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "nothing.safetensors"
    assert main(["eval", "--checkpoint", str(missing), "--shards", str(tmp_path)]) == EXIT_USAGE
    assert _error_line(capsys) == f"multieye-dist: error: checkpoint {missing} does not exist"


def test_exit_statuses_are_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "74 an operating-system error" in text and "2 usage" in text and "1 failed" in text


# ----------------------------------------------------------------------------- conversion

FUNDUS_DEV = ConvertOptions(
    modalities=("fundus",),
    splits=("dev",),
    shard_samples=7,
    workers=1,
    preprocess=Preprocess(image_size=32),
)


def _snapshot(out: Path) -> dict[str, bytes]:
    """The published state: manifests and shards (not the progress records)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _dev_images(root: Path) -> list[Path]:
    """The fundus dev images, in label-file order (so in shard order)."""
    lines = (root / "assemble" / "dev" / "large9cls.txt").read_text().splitlines()
    images = root / "assemble" / "train" / "ImageData" / "cfp-clahe-224x224"
    return [images / f"{line.split()[0]}.png" for line in lines if line.strip()]


def test_rerun_failing_on_new_bad_input_keeps_the_previous_manifest(fresh_root, tmp_path):
    out = tmp_path / "s"
    convert(fresh_root, out, FUNDUS_DEV, progress=False)
    before = _snapshot(out)
    images = _dev_images(fresh_root)
    # The first shard's input changes (redone, staged), the last shard's becomes undecodable.
    shutil.copy(images[1], images[0])
    images[-1].write_bytes(b"not a png any more")
    with pytest.raises(ConversionError, match=f"{images[-1].stem}.*fix it or pass --skip-bad"):
        convert(fresh_root, out, FUNDUS_DEV, progress=False)
    assert _snapshot(out) == before  # manifest and every shard it lists, byte for byte
    assert verify(out).ok
    assert _temps(out) == []
    staged = sorted(p.name for p in (out / PROGRESS_DIR).glob("*.tar"))
    assert staged == ["fundus-dev-000000.tar"]  # done, waiting for the rest
    # Fixed: the rerun keeps the staged shard, publishes it, and rewrites the manifest.
    shutil.copy(images[2], images[-1])
    again = convert(fresh_root, out, FUNDUS_DEV, progress=False)
    assert again.kept == 2 and again.written == 1  # the staged shard and the unchanged one
    assert verify(out).ok and not list((out / PROGRESS_DIR).glob("*.tar"))
    assert _snapshot(out)["fundus-dev-000000.tar"] != before["fundus-dev-000000.tar"]


def test_rerun_on_a_full_disk_keeps_the_previous_manifest(synth_root, tmp_path, tmpfs, capsys):
    out = tmpfs(tmp_path / "disk", "1m") / "s"
    assert main(_convert(synth_root, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    filler = _fill(out.parent)
    assert main(_convert(synth_root, out, "--format", "jpg")) == EXIT_IOERR  # every shard redone
    assert "No space left on device (disk full)" in _error_line(capsys)
    assert _snapshot(out) == before and verify(out).ok and _temps(out) == []
    filler.unlink()
    assert main(_convert(synth_root, out, "--format", "jpg")) == 0
    assert verify(out).ok and _snapshot(out) != before


def test_temp_files_a_killed_conversion_left_are_removed_by_the_next(synth_root, tmp_path):
    out = tmp_path / "s"
    convert(synth_root, out, FUNDUS_DEV, progress=False)
    left = [
        _killed_writer(out / "fundus-dev-000001.tar"),
        _killed_writer(out / PROGRESS_DIR / "fundus-dev-000001.tar.json"),
    ]
    users = out / ".keep.tmp"
    users.write_text("not ours")
    again = convert(synth_root, out, FUNDUS_DEV, progress=False)
    assert again.written == 0  # the killed writes were rewrites of complete files
    assert not any(p.exists() for p in left) and users.exists()
    assert verify(out).ok


# ----------------------------------------------------------------------------- checkpoints


class FakeDeepSpeed:
    """What save_checkpoint and load_checkpoint use of a DeepSpeed engine, writing and reading
    real torch files through our checkpoint engine in DeepSpeed's layout: rank 0 the model
    file, every rank its ZeRO file, then (as DeepSpeed) a barrier."""

    def __init__(self, rank: int = 0, world: int = 1, zero_dir: Path | None = None) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        self.checkpoint_engine = E._safe_checkpoint_engine(TorchCheckpointEngine())
        self.checkpoint_engine.zipfile_serialization = True  # DeepSpeed's default config
        self.global_rank, self.world, self.device = rank, world, torch.device("cpu")
        self.weights = torch.arange(20_000.0) + rank
        self.zero_dir = zero_dir  # where this rank's ZeRO file goes (default: the tag's)
        self.loaded: str | None = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest) -> bool:
        from multieye_dist.core.distributed import barrier

        ce, tag_dir = self.checkpoint_engine, Path(save_dir) / tag
        ce.makedirs(str(tag_dir), exist_ok=True)
        if self.global_rank == 0:
            ce.save({"module": self.weights}, str(tag_dir / "mp_rank_00_model_states.pt"))
        name = f"zero_pp_rank_{self.global_rank}_mp_rank_00_optim_states.pt"
        ce.save({"optimizer": self.weights * 2}, str((self.zero_dir or tag_dir) / name))
        barrier()
        return True

    def load_checkpoint(self, load_dir, tag, **_):
        path = Path(load_dir) / tag
        self.checkpoint_engine.load(str(path / "mp_rank_00_model_states.pt"))
        for f in sorted(path.glob("zero_pp_rank_*_optim_states.pt")):
            self.checkpoint_engine.load(str(f))
        self.loaded = tag
        return str(path), {}


def _save(ckpt: Path, step: int) -> Path:
    E.save_checkpoint(FakeDeepSpeed(), ckpt, f"step{step:08d}", {"step": step})
    return ckpt / f"step{step:08d}"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # tensor bytes: torch.load would not notice
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated optimizer file": (
        lambda d: _truncate(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        "bytes, .* when saved \\(truncated or overwritten\\)",
    ),
    "missing model file": (
        lambda d: (d / "mp_rank_00_model_states.pt").unlink(),
        "mp_rank_00_model_states.pt is missing",
    ),
    "flipped tensor byte": (
        lambda d: _flip(d / "mp_rank_00_model_states.pt"),
        "fails its CRC check",
    ),
    "invalid trainer state": (
        lambda d: (d / E.STATE_FILE).write_text('{"step": 3,'),
        "trainer_state.json is damaged",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_falls_back_to_the_newest_whole_checkpoint(damage, tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    one, two, three = _save(ckpt, 1), _save(ckpt, 2), _save(ckpt, 3)
    assert (ckpt / E.LATEST).read_text() == three.name and E.checkpoint_problem(three) is None
    do, reason = DAMAGE[damage]
    do(three)
    with caplog.at_level(logging.WARNING, logger="multieye_dist.train.engine"):
        assert E.find_checkpoint("auto", ckpt) == two
    assert f"{three} is damaged: " in caplog.text
    assert __import__("re").search(reason, caplog.text), caplog.text
    with pytest.raises(
        FileNotFoundError, match=f"resume={str(three)!r}: the checkpoint is damaged"
    ):
        E.find_checkpoint(str(three), ckpt)  # named explicitly: no silent substitute
    assert E.find_checkpoint(str(one), ckpt) == one


def test_damaged_latest_file_and_all_damaged(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    one, two = _save(ckpt, 1), _save(ckpt, 2)
    (ckpt / E.LATEST).write_text("../../etc")
    with caplog.at_level(logging.WARNING, logger="multieye_dist.train.engine"):
        assert E.find_checkpoint("auto", ckpt) == two
    assert "latest is damaged (it names '../../etc'" in caplog.text
    (ckpt / E.LATEST).unlink()
    assert E.find_checkpoint("auto", ckpt) == two  # a lost `latest` is no fresh start
    for d in (one, two):
        _truncate(d / "mp_rank_00_model_states.pt")
    with pytest.raises(FileNotFoundError, match="no whole checkpoint to resume from") as info:
        E.find_checkpoint("auto", ckpt)
    assert str(one) in str(info.value) and "train.resume=never" in str(info.value)


class _Payload:
    """Stands for anything a pickle could smuggle into a checkpoint."""


def test_a_checkpoint_that_fails_to_load_falls_back_with_a_warning(tmp_path, caplog):
    """Whole by every check (sizes, CRCs), but its pickle names a class the weights-only loader
    refuses: loading fails, and resuming moves on to the one before."""
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    two = _save(ckpt, 2)
    model = two / "mp_rank_00_model_states.pt"
    torch.save({"module": torch.ones(3), "x": _Payload()}, model)
    state = json.loads((two / E.STATE_FILE).read_text())
    state[E.FILES_KEY][model.name] = model.stat().st_size
    (two / E.STATE_FILE).write_text(json.dumps(state))
    assert E.checkpoint_problem(two) is None
    engine = FakeDeepSpeed()
    with caplog.at_level(logging.WARNING, logger="multieye_dist.train.engine"):
        path = E.find_checkpoint("auto", ckpt)
        state = E.load_checkpoint(engine, path)
    assert path == two and engine.loaded == "step00000001" and state == {"step": 1}
    assert f"checkpoint {two} does not load (UnpicklingError" in caplog.text
    with pytest.raises(E.CheckpointError, match=f"cannot resume from {two}: UnpicklingError"):
        E.load_checkpoint(FakeDeepSpeed(), two, fallbacks=[])


def test_save_on_a_full_disk_keeps_latest_and_the_previous_checkpoint(tmp_path, tmpfs):
    ckpt = tmpfs(tmp_path / "disk", "200k") / "checkpoints"  # one checkpoint (160 kB), not two
    one = _save(ckpt, 1)
    with pytest.raises(OSError, match=f"cannot write {ckpt / 'step00000002'}/.*No space left"):
        _save(ckpt, 2)
    assert (ckpt / E.LATEST).read_text() == one.name and E.checkpoint_problem(one) is None
    assert sorted(p.name for p in ckpt.iterdir()) == [E.LATEST, one.name]  # no half step 2
    assert _temps(ckpt) == []


def test_stale_temps_of_a_killed_save_are_removed_once_the_run_holds_its_lock(tmp_path):
    ckpt = tmp_path / "checkpoints"
    one = _save(ckpt, 1)
    left = [_killed_writer(one / "mp_rank_00_model_states.pt"), _killed_writer(ckpt / E.LATEST)]
    assert E.find_checkpoint("auto", ckpt) == one
    assert all(p.exists() for p in left)  # finding (a refused command may) deletes nothing
    E.remove_stale_temps(ckpt)
    assert not any(p.exists() for p in left) and E.checkpoint_problem(one) is None


def _save_ranks(rank: int, world: int, ckpt: Path) -> None:
    """Rank 1 cannot write its ZeRO file (`latest`, a file, stands where its directory would
    be): every rank raises, rank 1 its own error naming the file, rank 0 that another rank
    failed; `latest` and the previous checkpoint are untouched, the half-saved one is gone."""
    from multieye_dist.core.distributed import barrier

    engine = FakeDeepSpeed(rank, world, zero_dir=ckpt / E.LATEST if rank == 1 else None)
    with pytest.raises(Exception) as info:
        E.save_checkpoint(engine, ckpt, "step00000002", {"step": 2})
    if rank == 1:
        assert isinstance(info.value, FileExistsError), repr(info.value)
        target = ckpt / E.LATEST / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        assert str(info.value).endswith(f"cannot write {target}: File exists")
    else:
        assert isinstance(info.value, E.CheckpointError), repr(info.value)
        what = f"saving checkpoint {ckpt / 'step00000002'}"
        assert str(info.value) == f"{what}: failed on another rank (its error says why)"
    barrier()
    assert (ckpt / E.LATEST).read_text() == "step00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == [E.LATEST, "step00000001"]
    assert E.checkpoint_problem(ckpt / "step00000001") is None


@pytest.mark.slow
def test_a_save_failing_on_one_rank_stops_every_rank(tmp_path):
    from helpers import run_ranks

    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    run_ranks(_save_ranks, 2, ckpt, timeout=60)


# ----------------------------------------------------------------------------- training

# One checkpoint of the tiny test model (test_resnet, 32 px, fp32, ZeRO 1, one rank), measured:
# model states 1,979,469 B + ZeRO optimizer states 4,932,621 B = 6.6 MiB. A 16 MiB tmpfs holds
# two (13.3 MiB with the run's other files) and the third's model file, not its optimizer file.
CKPT_BYTES = (6_500_000, 7_300_000)


def _train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`multieye-dist train teacher` as a user runs it: one rank, a subprocess."""
    overrides = tiny_overrides(shards, out, "train.checkpoint_every_steps=1", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "multieye_dist.cli", "train", "teacher", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_training_on_a_full_disk_then_resuming_past_a_damaged_latest(shards, tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", "16m")
    run, ckpt = disk / "run", disk / "run" / "checkpoints"
    proc = _train(shards, run, "train.stop_after_steps=3")
    # Steps 1 and 2 saved; step 3's optimizer file does not fit.
    assert proc.returncode == EXIT_IOERR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    target = ckpt / "step00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert last == f"multieye-dist: error: cannot write {target}: No space left on device " + (
        "(disk full)"
    )
    one, two = ckpt / "step00000001", ckpt / "step00000002"
    size = sum(p.stat().st_size for p in one.glob("*.pt"))
    assert CKPT_BYTES[0] < size < CKPT_BYTES[1], f"{size} B: resize the tmpfs of this test"
    assert (ckpt / E.LATEST).read_text() == two.name
    assert E.checkpoint_problem(one) is None and E.checkpoint_problem(two) is None
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [one.name, two.name]
    assert _temps(disk) == []

    # Room again; `latest` (step 2) damaged: the resume warns and continues from step 1.
    remount = _run_mount("-o", "remount,size=40m", str(disk))
    assert remount.returncode == 0, remount.stderr
    _truncate(two / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = _train(shards, run, "train.stop_after_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {one}: {two} is damaged: zero_pp_rank_0_mp_rank_00_optim" in proc.stderr
    assert f"resumed from {one} (step 1)" in proc.stderr
    assert (ckpt / E.LATEST).read_text() == two.name and E.checkpoint_problem(two) is None
