"""The fused distillation kernels compile for real GPUs, on this machine without one: every
Triton kernel ahead of time for sm_90 (H100/H200) and sm_80 (A100) with the wheel's ptxas, at
the tile sizes LaunchConfig picks on a GPU, from the launches the host code makes
(multieye_dist.model.kernels.aot). The compiled metadata is checked against the chip: shared memory
per block within its limit, 16-bit dots on the tensor cores. Registers and spills are printed
(``pytest -s``, or ``benchmarks/aot_report.py``), not asserted: see BENCHMARKS.md.

The bf16 cases take a few seconds each; the fp32 ones (exact fp32 dots on the FMA units, far
more code for ptxas) about half a minute, and are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from multieye_dist.model.kernels import LaunchConfig, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CASES = [
    pytest.param(arch, dtype, k, id=f"sm{arch}-{name}-K{k}", marks=marks)
    for dtype, name, marks in (
        (torch.bfloat16, "bf16", ()),
        (torch.float32, "fp32", (pytest.mark.slow,)),
    )
    for arch in (90, 80)
    for k in (98, 256)
]


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # aot compiles the module's compiled-mode kernels whatever TRITON_INTERPRET says; set it
    # here to show that (test_kernels.py sets it for its own module only).
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def kernel_names() -> list[str]:
    """Every ``@triton.jit`` kernel (``*_kernel``) of the kernel module."""
    import triton

    from multieye_dist.model.kernels import aot

    with aot._compiled_module() as mod:
        return sorted(
            name
            for name, obj in vars(mod).items()
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [98, 256])
def test_one_step_launches_every_kernel_with_gpu_tiles(dtype: torch.dtype, k: int) -> None:
    from multieye_dist.model.kernels import aot

    launches = aot.record_launches(dtype, k)
    assert sorted(la.kernel for la in launches) == kernel_names() == [
        "_backward_kernel", "_forward_kernel", "_sims_kernel",
    ]  # fmt: skip
    block_k = max(16, 1 << (k - 1).bit_length())
    cfg = LaunchConfig.choose(block_k, interpret=False)
    assert cfg != LaunchConfig.choose(block_k, interpret=True)
    for la in launches:
        assert la.options["num_warps"] == cfg.num_warps, la.kernel
        assert la.args["BLOCK_M"] == cfg.block_m and la.args["BLOCK_K"] == block_k, la.kernel
        assert la.args["EMULATE"] is False and la.args["K"] == k, la.kernel
        if "BLOCK_N" in la.args:
            assert la.args["BLOCK_N"] == cfg.block_n, la.kernel
        if "BLOCK_D" in la.args:
            assert la.args["BLOCK_D"] == cfg.block_d, la.kernel
    assert launches[0].args["DOT_KIND"] == {torch.float32: 0, torch.bfloat16: 1}[dtype]


def test_specialisation_follows_the_jit() -> None:
    """Integers equal to 1 are constants, multiples of 16 and aligned pointers are marked; and,
    where this triton exposes its own specialiser, ours agrees with it on every argument."""
    from multieye_dist.model.kernels import aot

    launches = {la.kernel: la for la in aot.record_launches(torch.bfloat16, 98)}
    with aot._compiled_module() as mod:
        fn = mod._forward_kernel
        sig, constexprs, attrs = aot.specialise(fn, launches["_forward_kernel"].args)
        idx = {n: i for i, n in enumerate(fn.arg_names)}
        assert sig["X"] == "*bf16" and sig["YS"] == "*i64" and sig["LSE"] == "*fp32"
        assert sig["inv_t"] == "fp32" and sig["K"] == "i32" and sig["BLOCK_N"] == "constexpr"
        assert constexprs["BLOCK_N"] == 64 and constexprs["EMULATE"] is False
        assert (idx["M"],) in attrs and (idx["K"],) not in attrs  # M = 1024, K = 98
        # OUT sits 8 bytes past a 16-byte boundary of the work buffer (G, CNT, OUT).
        assert (idx["X"],) in attrs and (idx["OUT"],) not in attrs
        sims_fn = mod._sims_kernel
        sig, constexprs, _ = aot.specialise(sims_fn, launches["_sims_kernel"].args)
        assert sig["s_cd"] == "constexpr" and constexprs["s_cd"] == 1  # concepts' unit stride
        try:
            from triton._C.libtriton import native_specialize_impl
            from triton.backends.compiler import BaseBackend
        except ImportError:
            return
        for name, la in launches.items():
            kernel = getattr(mod, name)
            sig, constexprs, attrs = aot.specialise(kernel, la.args)
            for i, (arg, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
                if param.is_constexpr:
                    continue
                kind, spec = native_specialize_impl(BaseBackend, la.args[arg], False, True, True)
                assert sig[arg] == kind, (name, arg, sig[arg], kind)
                assert ((i,) in attrs) == (spec == "D"), (name, arg, spec)


@pytest.mark.parametrize(("arch", "dtype", "k"), CASES)
def test_kernels_compile_for_the_gpu(arch: int, dtype: torch.dtype, k: int) -> None:
    from multieye_dist.model.kernels import aot

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    rows = [aot.compile_launch(la, arch, dtype=name, k=k) for la in aot.record_launches(dtype, k)]
    print("\n" + aot.table(rows))
    assert [r.kernel for r in rows] == ["_sims_kernel", "_forward_kernel", "_backward_kernel"]
    for r in rows:
        assert r.shared > 0 and 0 < r.regs <= 255, r
        assert r.num_warps == rows[0].num_warps
    assert aot.problems(rows) == []


@pytest.mark.parametrize("arch", [90, 80])
def test_global_scope_launches_compile_for_the_gpu(arch: int) -> None:
    """The global contrastive scope runs the same three kernels over every rank's candidates
    (M = this rank's 2B plus the peers', this rank's rows from ROW0 on; constexpr GLOBAL): its
    launches, as a rank > 0 makes them, compile with the same checks (bf16, K = 98)."""
    from multieye_dist.model.kernels import aot

    peers = 3 * 2 * aot.BATCH  # three more ranks of BATCH samples (2 anchors per sample)
    launches = aot.record_launches(torch.bfloat16, 98, peers=peers)
    by_name = {la.kernel: la for la in launches}
    assert sorted(by_name) == kernel_names()
    for name in ("_forward_kernel", "_backward_kernel"):
        assert by_name[name].args["M"] == 2 * aot.BATCH + peers, name
        assert by_name[name].args["ROW0"] == peers // 2, name
    assert all(la.args.get("GLOBAL", True) is True for la in launches)  # sims: no such flag
    rows = [aot.compile_launch(la, arch, dtype="bf16", k=98) for la in launches]
    print("\n" + aot.table(rows))
    assert aot.problems(rows) == []


def test_problems_names_what_the_chip_cannot_run() -> None:
    from multieye_dist.model.kernels import aot

    ok = aot.Compiled(
        kernel="_sims_kernel", arch=90, dtype="bf16", k=98, tiles={"BLOCK_M": 64},
        num_warps=4, num_stages=3, shared=aot.SHARED_LIMIT[90], regs=128, local_bytes=0,
        dot="wgmma", seconds=0.0,
    )  # fmt: skip
    assert aot.problems([ok]) == []
    too_big = aot.Compiled(**{**vars(ok), "arch": 80, "dot": "mma"})  # 227 KiB > 163 KiB
    old_mma = aot.Compiled(**{**vars(ok), "shared": 1024, "dot": "mma"})
    fp32 = aot.Compiled(**{**vars(ok), "dtype": "fp32", "dot": "fma"})
    got = aot.problems([too_big, old_mma, fp32])
    assert len(got) == 2, got
    assert "166912" in got[0] and "expected wgmma" in got[1]
