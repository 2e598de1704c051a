"""One reader per quantization-aware-training format (see :mod:`exporter.qat` for the key names): each checks the
scheme is one the INT8 graph can carry (8-bit integer, symmetric per-channel or per-tensor weights, static
activations), collects the learned scales per linear, and says how each stored weight becomes the float weight."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from exporter.qat_import import (
    MAX_STATE_BYTES,
    MODELOPT_KEY,
    MODELOPT_STATE,
    Q8BERT_KEY,
    QDQBERT_KEY,
    TORCH_AO_KEY,
    LinearScales,
    OutputRange,
    QatImport,
    QatWeights,
    refuse,
)
from exporter.weights import TensorInfo, WeightFiles, regular_file
from graphs.core.errors import CheckpointError

Loader = Callable[[], torch.Tensor]


def _scalar(tensor: torch.Tensor, name: str, path: Path) -> float:
    if tensor.numel() != 1:
        raise CheckpointError(f"{name} in {path} holds {tensor.numel()} values; a per-tensor activation scale is one "
                              "value: re-save the checkpoint, or pass the float model")
    value = float(tensor.reshape(()).to(torch.float64))
    if not value > 0 or value != value or value == float("inf"):
        raise CheckpointError(f"{name} in {path} is {value}; a learned range must be a positive finite number "
                              "(an uncalibrated quantizer?): calibrate or train it, or pass the float model")
    return value


def _channels(tensor: torch.Tensor, out: int, name: str, path: Path) -> torch.Tensor:
    """A per-output-channel (or per-tensor, broadcast) positive scale of ``out`` values, float32."""
    flat = tensor.detach().to(torch.float32).reshape(-1)
    if flat.numel() == 1:
        flat = flat.expand(out).clone()
    if flat.numel() != out:
        raise refuse(path, f"a weight scale of {tensor.numel()} values for {out} output channels ({name}: block or "
                      "group scales)", "export-model maps per-channel or per-tensor int8 weights only; pass the float "
                      "model")
    if not bool(torch.isfinite(flat).all()) or not bool((flat >= 0).all()) or not bool(flat.any()):
        raise CheckpointError(f"{name} in {path} holds negative or non-finite ranges, or only zeros; the quantizer "
                              "was never calibrated: calibrate it, or pass the float model")
    # A channel whose range is zero (a pruned, all-zero row): ModelOpt's _tensor_quant uses amax 1 there.
    return torch.where(flat <= 2.0**-24, torch.ones_like(flat), flat)


def _rounded(weight: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int = 127) -> torch.Tensor:
    """ModelOpt's / pytorch-quantization's fake quantizer on a weight, as integers: round(W * (qmax / amax))
    (half to even), clamped to [qmin, qmax]; ``amax`` one per output channel."""
    scale = torch.tensor(float(qmax)) / amax.to(torch.float32)[:, None]
    return torch.clamp(torch.round(weight.to(torch.float32) * scale), qmin, qmax).to(torch.int8)


def _weight_out(weights: WeightFiles, module: str) -> int | None:
    info = weights.tensors.get(f"{module}.weight")
    return info.shape[0] if info is not None and len(info.shape) == 2 else None


def modelopt(path: Path, weights: WeightFiles, kind: str) -> tuple[QatWeights, QatImport]:
    """NVIDIA ModelOpt (``kind="modelopt"``) or pytorch-quantization / QDQBERT (``"pytorch-quantization"``)."""
    qat = QatImport(kind)
    state: dict[str, dict[str, Any]] = {}
    if kind == "modelopt" and (path / MODELOPT_STATE).exists():
        state = read_modelopt_state(path)
        qat.files.append(path / MODELOPT_STATE)
    for name, attrs in sorted(state.items()):
        if attrs.get("_disabled"):
            continue
        bits, blocks = attrs.get("_num_bits"), attrs.get("_block_sizes")
        if bits != 8 or isinstance(bits, bool):
            scheme = "FP8" if isinstance(bits, (list, tuple)) else f"{bits}-bit"
            raise refuse(path, f"ModelOpt {scheme} form ({name}: _num_bits {bits!r} in {MODELOPT_STATE})",
                          "export-model imports INT8 (_num_bits 8) quantizers only; quantize with mtq.INT8_DEFAULT_CFG "
                          "or INT8_SMOOTHQUANT_CFG, or pass the float model")
        if blocks:
            raise refuse(path, f"ModelOpt block-quantized form ({name}: _block_sizes {blocks!r} in {MODELOPT_STATE})",
                          "export-model maps per-channel or per-tensor INT8 scales only; pass the float model")
        if attrs.get("_unsigned"):
            raise refuse(path, f"ModelOpt unsigned form ({name}: _unsigned)", "export-model maps signed INT8 "
                          "quantizers only; pass the float model")
    pattern = MODELOPT_KEY if kind == "modelopt" else QDQBERT_KEY
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name in weights.tensors:
        match = pattern.match(name)
        if match:
            found.setdefault(match["module"], {})[f"{match['role']}.{match['field']}"] = weights.load(name)
            qat.consumed.add(name)
    loaders: dict[str, Loader] = {}
    for module, fields in sorted(found.items()):
        out = _weight_out(weights, module)
        narrow = bool(state.get(f"{module}.weight_quantizer", {}).get("_narrow_range"))
        if out is None:
            qat.other.update({f"{module}.{key}": "not a linear layer's quantizer (no 2-D weight beside it)"
                              for key in fields})
            continue
        scales = LinearScales(module, weight_qmin=-127 if narrow else -128)
        if "weight._amax" in fields:
            amax = _channels(fields["weight._amax"], out, f"{module}.weight_quantizer._amax", path)
            scales.weight_scale = amax / 127.0
            scales.weight_int8 = _rounded(weights.load(f"{module}.weight"), amax, scales.weight_qmin)
        if "input._amax" in fields:
            scales.input_scale = _scalar(fields["input._amax"], f"{module}.input_quantizer._amax", path) / 127.0
            if state.get(f"{module}.input_quantizer", {}).get("_narrow_range"):
                scales.input_qmin = -127
        for role in ("output", "aftergemm"):
            if f"{role}._amax" in fields:
                qat.other[f"{module}.{role}_quantizer"] = "the INT8 graph keeps linear outputs in float"
        if "input._pre_quant_scale" in fields:
            pqs = fields["input._pre_quant_scale"].detach().to(torch.float32).reshape(-1)
            width = weights.tensors[f"{module}.weight"].shape[1]
            if pqs.numel() != width or not bool(torch.isfinite(pqs).all()) or not bool((pqs > 0).all()):
                raise CheckpointError(f"{module}.input_quantizer._pre_quant_scale in {path} is not {width} positive "
                                      "finite values, one per input channel: re-save the checkpoint")
            scales.pre_quant_scale = pqs
            loaders[f"{module}.weight"] = _unsmoothed(weights, f"{module}.weight", pqs)
            qat.restored[f"{module}.weight"] = "multiplied back by input_quantizer._pre_quant_scale (SmoothQuant/AWQ)"
        qat.linears[module] = scales
    return QatWeights(weights, qat, loaders), qat


def _unsmoothed(weights: WeightFiles, name: str, pqs: torch.Tensor) -> Loader:
    # ModelOpt's own inverse (its unsmoothing helper): weight * pre_quant_scale per input column, in float32.
    return lambda: weights.load(name).to(torch.float32) * pqs[None, :]


def _dequantized(weights: WeightFiles, name: str, scale: torch.Tensor) -> Loader:
    return lambda: weights.load(name).to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)


def _refuse_ct(path: Path, module: str, dtype: torch.dtype) -> CheckpointError:
    return refuse(path, f"compressed-tensors int-quantized form with {module}.weight stored as {dtype}",
                  "int-quantized checkpoints store int8 weights; re-save it with compressed-tensors, or pass the float "
                  "model")


def _check_ct_args(path: Path, group: str, role: str, args: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(args, dict):
        raise refuse(path, f"compressed-tensors with config group {group} {role} {args!r}",
                      "re-save the config.json written with the weights")
    where = f"compressed-tensors group {group} {role}"
    if args.get("num_bits") != 8 or args.get("type", "int") != "int":
        raise refuse(path, f"{where} {args.get('type', 'int')}{args.get('num_bits')} form",
                      "export-model imports 8-bit integer schemes (W8A8 static) only; pass the float model")
    if not args.get("symmetric", True):
        raise refuse(path, f"{where} asymmetric form", "export-model imports symmetric int8 scales only; pass the "
                      "float model")
    if args.get("dynamic") or args.get("strategy") not in allowed:
        raise refuse(path, f"{where} strategy {args.get('strategy')!r}{' dynamic' if args.get('dynamic') else ''} "
                      "form (the W8A8 dynamic preset: per-token scales computed at run time, no input_scale stored)",
                      "export-model imports static per-tensor input scales; quantize with static input activations, "
                      "or pass the float model")


def compressed_tensors(path: Path, quant: dict[str, Any], weights: WeightFiles) -> tuple[QatWeights, QatImport]:
    """compressed-tensors ``int-quantized``: int8 weights with per-channel (or per-tensor) scales, static inputs."""
    fmt = quant.get("format")
    if fmt != "int-quantized":
        raise refuse(path, f"compressed-tensors format {fmt!r}", "export-model imports format int-quantized (W8A8 "
                      "int8) only; pass the float model")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise refuse(path, "compressed-tensors without config_groups", "re-save the config.json written with the "
                      "weights")
    for group, scheme in groups.items():
        if not isinstance(scheme, dict):
            raise refuse(path, f"compressed-tensors group {group} {scheme!r}", "re-save the config.json")
        _check_ct_args(path, group, "weights", scheme.get("weights"), ("channel", "tensor"))
        if scheme.get("input_activations") is not None:
            _check_ct_args(path, group, "input_activations", scheme["input_activations"], ("tensor",))
        if scheme.get("output_activations") is not None:
            raise refuse(path, f"compressed-tensors group {group} with output_activations", "export-model keeps "
                          "linear outputs in float; pass the float model")
    qat = QatImport("compressed-tensors")
    loaders: dict[str, Loader] = {}
    fields: dict[str, dict[str, str]] = {}
    for name in weights.tensors:
        if name.endswith((".weight_scale", ".input_scale", ".weight_zero_point", ".input_zero_point")):
            module, _, key = name.rpartition(".")
            fields.setdefault(module, {})[key] = name
    for module, keys in sorted(fields.items()):
        qat.consumed.update(keys.values())
        for key in ("weight_zero_point", "input_zero_point"):
            if key in keys and bool(weights.load(keys[key]).any()):
                raise refuse(path, f"compressed-tensors asymmetric form ({module}.{key} not zero)",
                              "export-model imports symmetric int8 scales only; pass the float model")
        out = _weight_out(weights, module)
        if out is None or "weight_scale" not in keys:
            qat.other.update({f"{module}.{k}": "not a linear layer's quantizer" for k in keys})
            continue
        scale = _channels(weights.load(keys["weight_scale"]), out, keys["weight_scale"], path)
        stored = weights.load(f"{module}.weight")
        if stored.dtype != torch.int8:
            raise _refuse_ct(path, module, stored.dtype)
        scales = LinearScales(module, weight_scale=scale, weight_int8=stored.clone())
        if "input_scale" in keys:
            scales.input_scale = _scalar(weights.load(keys["input_scale"]), keys["input_scale"], path)
        loaders[f"{module}.weight"] = _dequantized(weights, f"{module}.weight", scale)
        qat.restored[f"{module}.weight"] = "int8 dequantized (weight * weight_scale)"
        qat.linears[module] = scales
    return QatWeights(weights, qat, loaders), qat


def torch_ao(path: Path, weights: WeightFiles) -> tuple[QatWeights, QatImport]:
    """torch.ao eager-mode QAT (``prepare_qat`` modules): float weights, per-channel weight fake-quant scales,
    and the output ranges of the modules that carry an ``activation_post_process``."""
    qat = QatImport("torch-ao-eager")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name in weights.tensors:
        match = TORCH_AO_KEY.match(name)
        if match:
            found.setdefault(f"{match['module']}|{match['role']}", {})[match["field"]] = weights.load(name)
            qat.consumed.add(name)
    for key, fields in sorted(found.items()):
        module, role = key.split("|")
        if role == "activation_post_process":
            found_range = _output_range(fields)
            if found_range is not None:
                qat.outputs[module] = found_range
            qat.other[f"{module}.activation_post_process"] = "an output range" if found_range else (
                "an output quantizer whose range is not stored (fixed qparams) or that was off in training")
            continue
        out = _weight_out(weights, module)
        if out is None or "scale" not in fields:
            qat.other[f"{module}.{role}"] = "not a linear layer's weight quantizer"
            continue
        zero = fields.get("zero_point")
        if zero is not None and bool(zero.any()):
            raise refuse(path, f"torch.ao asymmetric weight form ({module}.weight_fake_quant.zero_point not 0)",
                          "use a symmetric weight qconfig (the default per-channel one), or pass the float model")
        scale = _channels(fields["scale"], out, f"{module}.weight_fake_quant.scale", path)
        weight = weights.load(f"{module}.weight").to(torch.float32)
        # torch's own fake quantizer (the default per-channel weight qconfig: qint8, [-128, 127]), as integers
        faked = torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros(out, dtype=torch.int32), 0, -128, 127)
        qat.linears[module] = LinearScales(module, weight_scale=scale,
                                           weight_int8=torch.round(faked / scale[:, None]).to(torch.int8))
    return QatWeights(weights, qat, {}), qat


def _output_range(fields: dict[str, torch.Tensor]) -> OutputRange | None:
    """An ``activation_post_process`` fake quantizer's (scale, zero point, range), or None when training did not
    round with it (``fake_quant_enabled`` 0) or its range is not stored. The state_dict holds no quant_min /
    quant_max: the range is the one the stored scale was computed over from the observer's min / max
    (``scale = (max(max_val, 0) - min(min_val, 0)) / (quant_max - quant_min)``): [0, 127] (the default x86 /
    fbgemm qconfigs, ``reduce_range``) or [0, 255]."""
    keys = ("scale", "zero_point", "activation_post_process.min_val", "activation_post_process.max_val")
    if any(k not in fields or fields[k].numel() != 1 for k in keys):
        return None
    if "fake_quant_enabled" in fields and not bool(fields["fake_quant_enabled"].any()):
        return None
    scale, zero = float(fields["scale"].reshape(())), int(fields["zero_point"].reshape(()))
    low = min(float(fields["activation_post_process.min_val"].reshape(())), 0.0)
    high = max(float(fields["activation_post_process.max_val"].reshape(())), 0.0)
    if not scale > 0 or scale != scale or scale == float("inf"):
        return None
    levels = (high - low) / scale
    for qmin, qmax in ((0, 127), (0, 255)):
        if abs(levels - (qmax - qmin)) <= 1e-3 * (qmax - qmin) and qmin <= zero <= qmax:
            return OutputRange(float(torch.tensor(scale, dtype=torch.float32)), zero, qmin, qmax)
    return None


def q8bert(path: Path, raw: dict[str, Any], weights: WeightFiles) -> tuple[QatWeights, QatImport]:
    """Q8BERT (nlp-architect): EMA thresholds per linear, per-tensor weights; 8-bit mode stores int8 weights."""
    qat = QatImport("q8bert")
    found: dict[str, dict[str, str]] = {}
    for name in weights.tensors:
        match = Q8BERT_KEY.match(name)
        if match:
            found.setdefault(match["module"], {})[match["field"]] = name
            qat.consumed.add(name)
    loaders: dict[str, Loader] = {}
    added: dict[str, TensorInfo] = {}
    for module, keys in sorted(found.items()):
        weight_scale, weight_int8 = None, None
        if "quantized_weight" in keys:
            if "_weight_scale" not in keys:
                raise CheckpointError(f"{module}.quantized_weight in {path} has no _weight_scale beside it; re-save "
                                      "the checkpoint")
            multiplier = _scalar(weights.load(keys["_weight_scale"]), keys["_weight_scale"], path)
            stored = keys["quantized_weight"]
            loaders[f"{module}.weight"] = lambda stored=stored, m=multiplier: weights.load(stored).to(torch.float32) / m
            info = weights.tensors[stored]
            added[f"{module}.weight"] = TensorInfo(info.shape, "F32", info.file)
            qat.restored[f"{module}.weight"] = "int8 quantized_weight divided by _weight_scale"
            weight_scale = 1.0 / multiplier
            weight_int8 = weights.load(stored).to(torch.int8)
        elif f"{module}.weight" in weights.tensors:
            # Q8BERT's training forward: one scale per tensor, 127 / max|W| (its get_dynamic_scale), then
            # input.mul(scale).round().clamp(-127, 127)
            weight = weights.load(f"{module}.weight").to(torch.float32)
            multiplier = 127.0 / float(weight.abs().max())
            weight_scale = 1.0 / multiplier
            weight_int8 = torch.clamp(torch.round(weight * multiplier), -127, 127).to(torch.int8)
        shape = added[f"{module}.weight"].shape if f"{module}.weight" in added else (
            weights.tensors[f"{module}.weight"].shape if f"{module}.weight" in weights.tensors else ())
        if "input_thresh" not in keys or len(shape) != 2 or not weight_scale:
            qat.other.update({f"{module}.{k}": "an embedding or non-linear quantizer" for k in keys})
            continue
        scales = LinearScales(module, weight_qmin=-127, input_qmin=-127,
                              weight_scale=torch.full((shape[0],), weight_scale, dtype=torch.float32),
                              weight_int8=weight_int8,
                              input_scale=_scalar(weights.load(keys["input_thresh"]), keys["input_thresh"], path) / 127)
        qat.linears[module] = scales
        if "output_thresh" in keys:
            qat.other[f"{module}.output_thresh"] = "the INT8 graph keeps linear outputs in float"
    return QatWeights(weights, qat, loaders, added), qat


def read_modelopt_state(path: Path) -> dict[str, dict[str, Any]]:
    """Every quantizer's attributes in ``modelopt_state.pth`` ({quantizer name: {"_num_bits": 8, ...}}), loaded
    with ``weights_only=True`` (pickled code is refused, never run)."""
    file = path / MODELOPT_STATE
    fix = "re-save it with ModelOpt (mto.modelopt_state), or remove it to export the float model"
    regular_file(file, MODELOPT_STATE, fix)
    if file.stat().st_size > MAX_STATE_BYTES:
        raise CheckpointError(f"{file} is {file.stat().st_size:,} bytes, more than the {MAX_STATE_BYTES:,} a "
                              f"{MODELOPT_STATE} may hold; {fix}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = " ".join(str(error).split())
        shown = detail[detail.find("Unsupported global"):][:120] if "Unsupported global" in detail else "objects"
        raise CheckpointError(f"{file} carries pickled code or objects ({shown}); refused without running it: "
                              f"{fix}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {file} ({' '.join(str(error).split())[:160]}); {fix}") from None
    found: dict[str, dict[str, Any]] = {}

    def walk(value: Any, depth: int = 0) -> None:
        if depth > 12:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, dict) and "_num_bits" in item:
                    found[str(key)] = item
                else:
                    walk(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, depth + 1)

    walk(state)
    return found
