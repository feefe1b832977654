"""Compile every Triton kernel variant ahead of time for a GPU target, without a GPU.

Run without TRITON_INTERPRET (the interpreter never lowers the kernels, so it cannot catch
what only the compiler rejects: non-constexpr globals, type or shape errors in the IR, ptxas
failures). Usage: python tests/tools/aot_compile.py [ARCH ...]  (default: 90, the H100/H200).
Prints one line per variant and exits non-zero on the first failure.
"""

import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_compile: unset TRITON_INTERPRET (the interpreter does not compile)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sage_fast.kernels import equalizer, sde  # noqa: E402

DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def variants():
    for dt, has_noise in itertools.product(DT, (True, False)):
        p = DT[dt]
        yield sde._sde_step_fwd_kernel, dict(
            x_ptr=p, v_ptr=p, noise_ptr=p, rng_ptr="*i64", coef_ptr="*fp32", xn_ptr=p, part_ptr="*fp32",
            B="i32", D="i32", NCHUNK="i32", HAS_NOISE="constexpr", BLOCK="constexpr"), \
            dict(HAS_NOISE=has_noise, BLOCK=4096), 8
    for dt, has_ref in itertools.product(DT, (True, False)):
        p = DT[dt]
        yield sde._sde_logprob_fwd_kernel, dict(
            x_ptr=p, v_ptr=p, xn_ptr=p, vref_ptr=p, coef_ptr="*fp32", part_ptr="*fp32", kl_part_ptr="*fp32",
            B="i32", D="i32", NCHUNK="i32", HAS_REF="constexpr", BLOCK="constexpr"), \
            dict(HAS_REF=has_ref, BLOCK=4096), 8
    for gaussian, mean in itertools.product((True, False), (True, False)):
        yield sde._logp_finish_kernel, dict(
            part_ptr="*fp32", coef_ptr="*fp32", logp_ptr="*fp32", norm_ptr="*fp32", B="i32", D="i32",
            NCHUNK="i32", GAUSSIAN="constexpr", MEAN="constexpr", FIN_BLOCK="constexpr"), \
            dict(GAUSSIAN=gaussian, MEAN=mean, FIN_BLOCK=256), 4
    for mean in (True, False):
        yield sde._kl_finish_kernel, dict(
            kl_part_ptr="*fp32", coef_ptr="*fp32", kl_ptr="*fp32", B="i32", D="i32", NCHUNK="i32",
            MEAN="constexpr", FIN_BLOCK="constexpr"), dict(MEAN=mean, FIN_BLOCK=256), 4
    for dt, has_ref, gaussian, mean in itertools.product(DT, (True, False), (True, False), (True, False)):
        if dt != "bf16" and not (has_ref and gaussian):
            continue
        p = DT[dt]
        yield sde._sde_logprob_bwd_kernel, dict(
            x_ptr=p, v_ptr=p, xn_ptr=p, vref_ptr=p, coef_ptr="*fp32", glogp_ptr="*fp32", gkl_ptr="*fp32",
            dv_ptr=p, B="i32", D="i32", HAS_REF="constexpr", GAUSSIAN="constexpr", MEAN="constexpr",
            BLOCK="constexpr"), dict(HAS_REF=has_ref, GAUSSIAN=gaussian, MEAN=mean, BLOCK=4096), 8
    yield equalizer._equalizer_fwd_kernel, dict(
        norm_ptr="*fp32", step_ptr="*i64", ema_ptr="*fp32", count_ptr="*i64", scale_ptr="*fp32", B="i32",
        N="i32", momentum="fp32", s_min="fp32", s_max="fp32", BLOCK_B="constexpr", BLOCK_N="constexpr"), \
        dict(BLOCK_B=128, BLOCK_N=32), 4


def main(archs):
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for fn, signature, constexprs, num_warps in variants():
            t0 = time.perf_counter()
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                    options={"num_warps": num_warps})
            assert kernel.asm.get("cubin"), "ptxas produced no cubin"
            consts = ",".join(f"{k}={v}" for k, v in constexprs.items())
            ptrs = signature["x_ptr"] if "x_ptr" in signature else ""
            print(f"sm_{arch} {fn.__name__}[{ptrs}{' ' if ptrs else ''}{consts}] ok "
                  f"({time.perf_counter() - t0:.1f}s, {kernel.metadata.num_warps} warps, "
                  f"{kernel.metadata.shared} B smem)", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
