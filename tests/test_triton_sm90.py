"""Compile every kernel specialisation the Triton launchers can use for sm_90 (H100), without a GPU.

The interpreter cannot catch what only the compiler sees (layouts, dot operand types, shared
memory, register spills); `triton.compile` with an explicit target runs the whole pipeline down to
a cubin on CPU. Every autotune config is compiled (triton_backend.compile_set()).
"""

import os
import time

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.sm90


def test_compile_every_specialisation_for_sm90():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process; compile them in a process without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from acl_kernels.ops.contrastive import triton_backend as tb

    target = GPUTarget("cuda", 90, 32)
    failures, count, t0 = [], 0, time.time()
    for spec in tb.compile_set():
        signature = dict(spec.signature) | {name: "constexpr" for name in spec.constexprs}
        src = ASTSource(spec.kernel, signature, spec.constexprs, spec.attrs)
        what = f"{spec.kernel.__name__} {spec.info['dtype']} d={spec.info['d']} {spec.constexprs} {spec.options}"
        try:
            compiled = triton.compile(src, target=target, options=spec.options)
            assert compiled.asm.get("cubin"), "no cubin produced"
            # one H100 SM has 228 KiB of shared memory, 227 KiB usable by one block
            assert compiled.metadata.shared <= 227 * 1024, f"shared memory {compiled.metadata.shared} B"
            # half data with whole-d tiles (d <= 256) must not spill registers
            half = spec.info["dtype"] in ("bf16", "fp16")
            if half and (spec.info["d"] or 0) <= tb.WHOLE_D_MAX:
                assert compiled.n_spills == 0, f"{compiled.n_spills} bytes of register spills"
        except Exception as err:  # collect all, report together
            failures.append(f"{what}: {type(err).__name__}: {str(err)[:300]}")
        count += 1
    print(f"compiled {count} specialisations in {time.time() - t0:.1f}s")
    assert count >= 100
    assert not failures, "\n".join(failures)
