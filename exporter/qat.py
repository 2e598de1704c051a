"""Quantization-aware-trained checkpoints: recognise the trainer's format at load, import its learned scales, and
hand the loader the float model the training meant (fake quantization off).

Formats read (key names from each tool's sources; see docs/qat.md):

- NVIDIA ModelOpt: ``<linear>.input_quantizer._amax`` (one value), ``<linear>.weight_quantizer._amax`` (one per
  output channel, shape [out, 1]), optional ``<linear>.input_quantizer._pre_quant_scale`` (SmoothQuant / AWQ: the
  stored weight is the trained weight divided by it, column by column); ``modelopt_state.pth`` beside the weights
  (read with ``weights_only=True``) says the number format (``_num_bits``, ``_block_sizes``). Range [-128, 127],
  scale = amax / 127. pytorch-quantization / QDQBERT: the same meaning under ``_input_quantizer`` /
  ``_weight_quantizer``.
- compressed-tensors (``quantization_config.quant_method: "compressed-tensors"``, ``format: "int-quantized"``):
  int8 ``weight``, ``weight_scale`` [out, 1], static ``input_scale`` [1]; the weight is dequantized here.
- torch.ao eager-mode QAT: ``<linear>.weight_fake_quant.{scale,zero_point}`` and the observers' min/max; the
  learned output ranges ``<module>.activation_post_process.*`` (a linear reading one, e.g. Q/K/V after a
  fake-quantized LayerNorm, takes it as its input range: :func:`exporter.qat_targets.map_output_ranges`). FX-mode keys (``activation_post_process_<n>``) do
  not name modules and are refused.
- Q8BERT (nlp-architect ``QuantizedLinear``): ``input_thresh`` / ``output_thresh``, scale = threshold / 127, range
  [-127, 127], per-tensor weights (``quantized_weight`` + ``_weight_scale`` in its 8-bit mode).

A recognised scheme this project cannot map (int4 or FP8, block scales, asymmetric or dynamic activations, FX-mode
or converted torch.ao models, Intel Neural Compressor outputs) is a :class:`CheckpointError` (exit 2) naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from exporter.qat_formats import compressed_tensors, modelopt, q8bert, torch_ao
from exporter.qat_import import (
    INC_FILES,
    MODELOPT_KEY,
    MODELOPT_STATE,
    Q8BERT_KEY,
    QDQBERT_KEY,
    SUSPECT_KEY,
    TORCH_AO_FX_KEY,
    TORCH_AO_KEY,
    QatImport,
    QatWeights,
    refuse,
)
from exporter.weights import WeightFiles
from graphs.core.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)


def read_qat(path: Path, raw: dict[str, Any], weights: WeightFiles) -> tuple[WeightFiles | QatWeights, QatImport | None]:
    """See :func:`_detect`; logs what was imported."""
    loaded, qat = _detect(path, raw, weights)
    if qat is not None and raw.get("layer_norm_type") == "no_norm":
        raise refuse(path, f"{qat.format} form with layer_norm_type no_norm (the NoNorm fold moves weights into "
                     "their neighbours, and with them the learned scales)", "export the float checkpoint, or train "
                     "with LayerNorm")
    if qat is not None:
        log.info("quantization-aware-trained checkpoint (%s): learned scales of %d linears imported, %d quantizer "
                 "tensors read, %d weights restored to float, %d quantizers outside the INT8 graph's linears",
                 qat.format, len(qat.linears), len(qat.consumed), len(qat.restored), len(qat.other))
    return loaded, qat


def _detect(path: Path, raw: dict[str, Any], weights: WeightFiles) -> tuple[WeightFiles | QatWeights, QatImport | None]:
    """Recognise a quantization-aware-trained checkpoint in ``path`` (``raw`` is its config.json) and import it.

    Returns ``(weights, None)`` for an ordinary checkpoint, else the weights as the float model should load them
    and the import. Raises :class:`CheckpointError` for a recognised scheme that cannot be mapped, or for
    quantizer tensors of no format this module knows (they are never ignored)."""
    names = list(weights.tensors)
    for side in INC_FILES:
        if (path / side).exists():
            raise refuse(path, f"Intel Neural Compressor / optimum-intel form ({side}: a converted FX graph)",
                          "export the float model the training started from, or a ModelOpt or compressed-tensors "
                          "QAT checkpoint")
    if any(name.endswith("_packed_params._packed_params") or name.endswith("_packed_params.dtype") for name in names):
        raise refuse(path, "torch.ao converted form (int8 packed_params: convert() already ran)",
                      "save the state_dict of the prepare_qat model before convert(), or the float model")
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors":
        return compressed_tensors(path, quant, weights)
    if isinstance(quant, dict) and quant.get("quant_method") not in (None, "compressed-tensors"):
        raise refuse(path, f"quantization_config.quant_method {quant.get('quant_method')!r}",
                      "export-model imports modelopt, compressed-tensors, torch.ao eager QAT and Q8BERT checkpoints; "
                      "pass the float checkpoint")
    if (path / MODELOPT_STATE).exists() or any(MODELOPT_KEY.match(n) for n in names):
        return modelopt(path, weights, "modelopt")
    if any(QDQBERT_KEY.match(n) for n in names):
        return modelopt(path, weights, "pytorch-quantization")
    if any(TORCH_AO_FX_KEY.search(n) for n in names):
        raise refuse(path, "torch.ao FX-graph-mode form (activation_post_process_<n> keys name graph nodes, not "
                      "modules)", "re-run QAT in eager mode (prepare_qat on the modules), or pass the float model")
    if any(TORCH_AO_KEY.match(n) for n in names):
        return torch_ao(path, weights)
    architectures = raw.get("architectures") or []
    if any(Q8BERT_KEY.match(n) for n in names) or any(str(a).startswith("QuantizedBert") for a in architectures):
        return q8bert(path, raw, weights)
    suspects = [n for n in names if SUSPECT_KEY.search(n)]
    if suspects:
        raise CheckpointError(
            f"the weights in {path} hold {len(suspects)} quantizer tensors of no format export-model knows (e.g. "
            f"{suspects[:2]}); they would be ignored: pass the float checkpoint, or a ModelOpt, compressed-tensors, "
            "torch.ao eager or Q8BERT one")
    return weights, None


#: Options that shape a calibrated INT8 file: (flag, where in ExportConfig, the default that means "not asked").
_CALIBRATION_OPTIONS = (
    ("--calibration-data", "calibration_data", None), ("--calibration-field", "calibration_field", "text"),
    ("--calibration-samples", "quantization.samples", 128), ("--calibration-method", "quantization.method", "minmax"),
    ("--tune", "quantization.tune", False), ("--int8-weights", "quantization.int8_weights", "auto"),
)


def refuse_calibration_options(config: Any, qat: QatImport | None) -> None:
    """A UsageError (exit 2, nothing written) naming the calibration options given for a checkpoint whose INT8 comes
    from its learned scales (`qat`; None: a calibrated export, anything goes): they would be silently ignored."""
    if qat is None:
        return
    given = []
    for flag, where, default in _CALIBRATION_OPTIONS:
        value: Any = config
        for part in where.split("."):
            value = getattr(value, part, default)
        if value != default:
            given.append(flag)
    if given:
        raise UsageError(f"a quantization-aware-trained ({qat.format}) checkpoint takes its INT8 from its learned scales, so "
                         f"{', '.join(given)} would be ignored: leave {'it' if len(given) == 1 else 'them'} out")
