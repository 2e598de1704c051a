"""What this CPU's integer kernels compute exactly: whether it has VNNI, and the onnxruntime session options an
INT8 file with full-range int8 weights needs where it does not."""

from __future__ import annotations

import platform
from pathlib import Path

EXACT_INT8_OPTIONS = {"session.x64quantprecision": "1"}
"""onnxruntime's session option that keeps u8 x s8 products exact on x86 CPUs without VNNI (the slower U8U8
kernels instead of AVX2's saturating ``vpmaddubsw`` pairs); measured with onnxruntime 1.31."""


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI or AVX-VNNI), from /proc/cpuinfo; None where unknown
    (not Linux) and False off x86 is never returned: ARM's kernels do not saturate."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    line = next((line for line in flags.splitlines() if line.startswith("flags")), None)
    if line is None:
        return None
    words = set(line.split(":", 1)[-1].split())
    return bool(words & {"avx512_vnni", "avx_vnni", "avx512vnni"})


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def exact_int8_options(full_range: bool) -> dict[str, str]:
    """The session options a file with full-range int8 weights (``full_range``) needs on this machine: the
    exact-precision option on an x86 CPU without VNNI (or where that is unknown), else none."""
    return dict(EXACT_INT8_OPTIONS) if full_range and is_x86() and not cpu_has_vnni() else {}
