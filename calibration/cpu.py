"""What this CPU's integer kernels can do exactly, which decides the int8 weight range."""

from __future__ import annotations

from pathlib import Path

INT8_WEIGHT_RANGES = ("auto", "full", "reduced")


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI or AVX-VNNI), from /proc/cpuinfo; None where unknown
    (not Linux) and False off x86 is never returned: ARM's kernels do not saturate, see :func:`int8_weight_bits`."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    line = next((line for line in flags.splitlines() if line.startswith("flags")), None)
    if line is None:
        return None
    words = set(line.split(":", 1)[-1].split())
    return bool(words & {"avx512_vnni", "avx_vnni", "avx512vnni"})


def int8_weight_bits(setting: str = "auto") -> int:
    """Bits of the int8 weights for ``QuantizationConfig.int8_weights``: 8 ("full") or 7 ("reduced").

    onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI (AVX2's ``vpmaddubsw``) add each pair of u8 x s8
    products in int16, which saturates once ``2 * 255 * |w|`` passes 32767: with full-range weights the result is
    silently wrong (measured on an AMD EPYC without VNNI: MatMulInteger off by 7.7e5; a fused BERT's INT8 output
    at cosine 0.95 to FP32 instead of 0.999). With weights in [-63, 63] it is exact everywhere. "auto" picks 8
    where this machine has VNNI or is not x86 (ARM's dot-product kernels do not saturate), else 7.
    """
    if setting == "full":
        return 8
    if setting == "reduced":
        return 7
    if setting != "auto":
        raise ValueError(f"int8_weights {setting!r} not in {list(INT8_WEIGHT_RANGES)}")
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 8
    return 8 if cpu_has_vnni() else 7
