"""What this CPU's integer kernels can do exactly, which decides the int8 weight range."""

from __future__ import annotations

from graphs.core.cpu import cpu_has_vnni, is_x86

__all__ = ["INT8_WEIGHT_RANGES", "cpu_has_vnni", "int8_weight_bits"]

INT8_WEIGHT_RANGES = ("auto", "full", "reduced")


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
    if not is_x86():
        return 8
    return 8 if cpu_has_vnni() else 7
