"""Ahead-of-time compilation of the fused distillation kernels for real GPUs, on a machine
without one (the CPU CI machine included): the proof that they compile for Hopper (sm_90) and
Ampere (sm_80) at the tile sizes a GPU run uses, and what they cost in shared memory and
registers.

How the launches are found: :func:`record_launches` runs the real host code of
:func:`multieye_dist.model.kernels.fused_distill` (forward and backward) on CPU tensors with the
kernel module replaced by a recorder, and with the tile sizes that ``LaunchConfig.choose`` picks on
a GPU. So the compiled signatures (argument types, the integers triton specialises, the pointer
alignment, the constexprs, ``num_warps``) are the ones the host code passes, not a copy kept
here. The one value the recorder sets itself is ``EMULATE=False``: the host code sets it from
the interpreter flag, and a GPU never emulates.

How they are compiled: ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32))``, with the integer and pointer specialisation the JIT
applies at launch (an integer equal to 1 becomes a constant; integers and pointers divisible
by 16 are marked so). This needs no GPU and no CUDA driver: the wheel's ``ptxas`` assembles the
cubin. Registers and local memory are read off the cubin with the wheel's ``cuobjdump``; triton's
``n_spills`` on a GPU is the driver's local memory per thread / 4, and so is ``spills`` here.

The format of ``ASTSource`` is the one triton 3.3 to 3.9 share (signature: name -> type string,
``"constexpr"`` for constants; constexprs by name; attrs by argument-index tuple).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from multieye_dist.model.kernels import distill

# The most dynamic shared memory one block may opt in to (CUDA programming guide, "Compute
# capabilities"): 227 KiB on sm_90 (H100, H200), 163 KiB on sm_80 (A100).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
DTYPES = (torch.bfloat16, torch.float32)
# One K per LaunchConfig branch: the project's bank (98 concepts, BLOCK_K 128) and the largest
# the kernel takes (256).
CONCEPTS = (98, distill.MAX_CONCEPTS)
# A GPU-sized batch: N = 512 students (as many teachers), D = 512, 9 classes.
BATCH, DIM, CLASSES = 512, 512, 9

_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Launch keywords that are compile options, not kernel arguments.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the host code makes it: kernel name, every argument by name
    (constexprs included) and the compile options."""

    kernel: str
    args: dict[str, Any]
    options: dict[str, Any]


@dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one GPU architecture, and what the cubin needs."""

    kernel: str
    arch: int
    dtype: str
    k: int
    tiles: dict[str, int]
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block (triton's metadata)
    regs: int  # registers per thread
    local_bytes: int  # local memory (stack frame) per thread
    dot: str  # the matrix instruction in the PTX: wgmma | mma | fma
    seconds: float

    @property
    def spills(self) -> int:
        """triton's ``n_spills``: local memory per thread / 4, as the driver reports it."""
        return self.local_bytes // 4

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]


class _Recorder:
    """Stands in for the kernel module: ``kernel[grid](*args, **kwargs)`` records the launch."""

    INTERPRETED = True  # lets the host code take CPU tensors; EMULATE is reset per launch

    def __init__(self, real: Any) -> None:
        self._real = real
        self.launches: list[Launch] = []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._real, name)
        recorder = self

        class _Grid:
            def __getitem__(self, grid: Any):
                def launch(*args: Any, **kwargs: Any) -> None:
                    names = fn.arg_names
                    if len(args) > len(names):
                        raise TypeError(f"{name}: {len(args)} arguments for {len(names)} params")
                    bound = dict(zip(names, args, strict=False))
                    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
                    bound.update(kwargs)
                    missing = [n for n in names if n not in bound]
                    if missing or set(bound) - set(names):
                        raise TypeError(f"{name}: bad arguments (missing {missing})")
                    if "EMULATE" in bound:
                        bound["EMULATE"] = False  # a GPU never emulates
                    recorder.launches.append(Launch(name, bound, options))

                return launch

        return _Grid()


@contextmanager
def _compiled_module() -> Iterator[Any]:
    """The kernel module in compiled (not interpreted) mode, whatever TRITON_INTERPRET says."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield distill._triton_module()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def record_launches(
    dtype: torch.dtype,
    k: int,
    *,
    b: int = BATCH,
    d: int = DIM,
    num_classes: int = CLASSES,
    config: distill.LaunchConfig | None = None,
    peers: int = 0,
) -> list[Launch]:
    """The kernel launches of one fused forward + backward (gradient to the student embeddings,
    the concept bank a constant, as in training), with the tile sizes ``LaunchConfig.choose``
    picks on a GPU, or ``config``. ``peers`` > 0: the global contrastive scope with that many
    other ranks' anchors (half of them ahead of this rank's rows: ``ROW0`` > 0, as on a rank
    > 0), simulated in this process
    (:class:`multieye_dist.model.kernels.distill.SimulatedPeers`)."""
    with _compiled_module() as real:
        recorder = _Recorder(real)
        g = torch.Generator().manual_seed(0)
        es = torch.randn(b, 2, d, generator=g).to(dtype).requires_grad_()
        et = torch.randn(b, 2, d, generator=g).to(dtype)
        concepts = torch.randn(k, d, generator=g).to(dtype)
        ys = torch.randint(0, num_classes, (b,), generator=g)
        yt = torch.randint(0, num_classes, (b,), generator=g)
        block_k = max(16, distill._next_pow2(k))
        config = config or distill.LaunchConfig.choose(block_k, interpret=False)
        exchange = None
        if peers:
            sims = torch.randn(2, peers, k, generator=g).to(dtype)
            labels = torch.randint(0, num_classes, (peers,), generator=g)
            exchange = distill.SimulatedPeers(sims, labels, num_classes, before=peers // 2)
        saved = distill._triton_module
        distill._triton_module = lambda: recorder
        try:
            proto, con = distill.fused_distill(
                es, et, concepts, ys, yt, num_classes=num_classes, temperature=10.0,
                scope="global" if peers else "local", exchange=exchange, config=config,
            )  # fmt: skip
            (proto + con).backward()
        finally:
            distill._triton_module = saved
    return recorder.launches


def specialise(fn: Any, args: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, as the JIT specialises a launch:
    constexpr parameters and integers equal to 1 become constants; other integers are i32 (i64
    past 32 bits) and floats fp32; integers divisible by 16 and 16-byte-aligned pointers get
    ``tt.divisibility = 16``."""
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    div16 = [["tt.divisibility", 16]]
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = div16
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = div16
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    try:
        path = getattr(triton.knobs.nvidia, name).path
    except (AttributeError, RuntimeError):
        path = None
    if not path:
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path


def resource_usage(cubin: bytes, kernel: str) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) of `kernel` in a cubin, from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip
    m = re.search(
        rf"Function {re.escape(kernel)}:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out
    )
    if m is None:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump's output:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _dot_instruction(ptx: str) -> str:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "fma"


def compile_launch(launch: Launch, arch: int, *, dtype: str, k: int) -> Compiled:
    """Compile one recorded launch for ``sm_<arch>`` and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with _compiled_module() as mod:
        fn = getattr(mod, launch.kernel)
        signature, constexprs, attrs = specialise(fn, launch.args)
        t0 = time.perf_counter()
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(launch.options),
        )
        seconds = time.perf_counter() - t0
    meta = compiled.metadata
    regs, local = resource_usage(compiled.asm["cubin"], meta.name)
    tiles = {n: int(v) for n, v in launch.args.items() if n.startswith("BLOCK_") and n != "BLOCK_C"}
    return Compiled(
        kernel=launch.kernel,
        arch=arch,
        dtype=dtype,
        k=k,
        tiles=tiles,
        num_warps=int(meta.num_warps),
        num_stages=int(meta.num_stages),
        shared=int(meta.shared),
        regs=regs,
        local_bytes=local,
        dot=_dot_instruction(compiled.asm["ptx"]),
        seconds=seconds,
    )


def compile_all(
    archs: Iterable[int] = ARCHS,
    dtypes: Iterable[torch.dtype] = DTYPES,
    ks: Iterable[int] = CONCEPTS,
    config: distill.LaunchConfig | None = None,
) -> list[Compiled]:
    """Every kernel of one fused step, for every architecture, dtype and K."""
    archs = list(archs)
    rows = []
    for dtype in dtypes:
        for k in ks:
            launches = record_launches(dtype, k, config=config)
            for arch in archs:
                for launch in launches:
                    rows.append(compile_launch(launch, arch, dtype=_DTYPE_NAMES[dtype], k=k))
    return rows


def table(rows: Iterable[Compiled]) -> str:
    """A markdown table of compiled kernels."""
    head = [
        "kernel", "arch", "dtype", "K", "tiles (M/N/K/D)", "warps", "stages", "shared bytes",
        "limit", "regs", "spills", "dot",
    ]  # fmt: skip
    align = ["---", "---", "---", "---:", "---"] + ["---:"] * 6 + ["---"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        tiles = "/".join(str(r.tiles.get(f"BLOCK_{x}", "-")) for x in "MNKD")
        cells = [
            r.kernel, f"sm_{r.arch}", r.dtype, str(r.k), tiles, str(r.num_warps),
            str(r.num_stages), str(r.shared), str(r.shared_limit), str(r.regs), str(r.spills),
            r.dot,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(rows: Iterable[Compiled]) -> list[str]:
    """What would stop or slow these kernels on the chip: shared memory past the block limit
    (the launch fails with OutOfResources), or 16-bit dots not on the tensor cores (wgmma on
    sm_90, mma on sm_80). fp32 dots are exact fp32 products ("ieee"): no tensor cores."""
    out = []
    for r in rows:
        name = f"{r.kernel} sm_{r.arch} {r.dtype} K={r.k}"
        if r.shared > r.shared_limit:
            out.append(f"{name}: {r.shared} bytes of shared memory > {r.shared_limit}")
        want = {90: "wgmma", 80: "mma"}.get(r.arch)
        if r.dtype != "fp32" and want and r.dot != want:
            out.append(f"{name}: dots use {r.dot}, expected {want}")
    return out
