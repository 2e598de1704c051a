"""Quantization-aware-trained checkpoint folders as the trainers write them, built in code in seconds.

Independent ground truth: nothing here imports project code. Each builder starts from the tiny seeded BERT
classifier of :mod:`tests.checkpoints` (the "trained" float model), measures per-linear input ranges on a seeded
batch, and writes the keys each tool writes (read from the tools' sources):

- ModelOpt (nvidia-modelopt): ``<linear>.input_quantizer._amax`` (0-d), ``<linear>.weight_quantizer._amax``
  ([out, 1]), with SmoothQuant ``<linear>.input_quantizer._pre_quant_scale`` ([in]; the stored weight is the float
  weight divided by it column by column; Q, K and V share one); ``modelopt_state.pth`` (``torch.save`` of plain
  containers, ``_num_bits`` etc. per quantizer).
- compressed-tensors ``int-quantized``: int8 ``weight``, ``weight_scale`` [out, 1], ``input_scale`` [1], and the
  ``quantization_config`` block of config.json.
- torch.ao eager QAT: written by torch itself (``prepare_qat`` on the encoder's linears, or on the whole model
  with the embeddings left out).

``QatTruth.float_model`` is the model a correct import must export as FP32 (ModelOpt: the un-smoothed float
weights; compressed-tensors: the dequantized int8 weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import transformers
from torch import nn

from tests.checkpoints import reference_model, tiny_checkpoint

ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")


@dataclass
class QatTruth:
    path: Path
    float_model: transformers.PreTrainedModel
    input_amax: dict[str, float]  # linear -> amax of its input
    weight_amax: dict[str, torch.Tensor]  # linear -> [out] amax of the weight as stored
    pre_quant_scale: dict[str, torch.Tensor]
    stored_weight: dict[str, torch.Tensor]  # linear -> the weight as the file holds it (float, or int8)
    # torch.ao: module -> its output fake quantizer (scale, zero point, quant_min, quant_max), read from torch's module
    output_ranges: dict[str, tuple[float, int, int, int]] = field(default_factory=dict)


def sample_ids(seed: int = 0, batch: int = 4, length: int = 24) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 8000, (batch, length), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _linears(model: nn.Module, every: bool = False) -> dict[str, nn.Linear]:
    """The encoder's linears; ``every``: the pooler and classifier too (ModelOpt quantizes every nn.Linear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and (every or (any(name.endswith(part) for part in ENCODER_LINEARS) and ".layer." in name))}


def _input_ranges(model: nn.Module, seed: int, every: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per encoder linear: max |x| of its input over a seeded batch, and per input channel."""
    whole: dict[str, float] = {}
    channel: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in _linears(model, every).items():
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs()
            whole[name] = float(x.max())
            channel[name] = x.amax(0)
        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**sample_ids(seed))
    for handle in hooks:
        handle.remove()
    return whole, channel


def _base(out: Path, seed: int) -> tuple[transformers.PreTrainedModel, dict[str, torch.Tensor]]:
    truth = tiny_checkpoint(out, "bert", "text-classification", seed=seed, pruned_heads={}, dead=False)
    model = reference_model(truth)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def modelopt_checkpoint(out: Path, seed: int = 0, smooth: bool = False, num_bits: int | tuple[int, int] = 8,
                        block_sizes: dict | None = None, weight_clip: float = 0.9) -> QatTruth:
    """A ModelOpt INT8 (``INT8_DEFAULT_CFG``) or SmoothQuant (``INT8_SMOOTHQUANT_CFG``, ``smooth``) checkpoint.
    ``weight_clip`` < 1 sets weight amax below max |W| (training moves weights past their range)."""
    model, state = _base(out, seed)
    whole, channel = _input_ranges(model, seed, every=True)
    linears = _linears(model, every=True)
    pqs: dict[str, torch.Tensor] = {}
    if smooth:  # SmoothQuant, alpha 0.5: s_j = sqrt(max|x_j| / max|W_j|), x * (1/s), W * s; Q/K/V share one
        groups: dict[str, list[str]] = {}
        for name in linears:
            key = name.rsplit(".", 1)[0] + "|qkv" if ".attention.self." in name else name
            groups.setdefault(key, []).append(name)
        for members in groups.values():
            wmax = torch.stack([linears[m].weight.detach().abs().amax(0) for m in members]).amax(0)
            s = (channel[members[0]].clamp_min(1e-5) / wmax.clamp_min(1e-5)).sqrt()
            for m in members:
                pqs[m] = (1.0 / s).to(torch.float32)
    truth = QatTruth(out, model, {}, {}, pqs, {})
    quantizers = {}
    for name, linear in linears.items():
        weight = linear.weight.detach().to(torch.float32)
        stored = weight / pqs[name][None, :] if name in pqs else weight.clone()
        amax_w = stored.abs().amax(1, keepdim=True) * weight_clip
        amax_x = (channel[name] * pqs[name]).max() if name in pqs else torch.tensor(whole[name])
        state[f"{name}.weight"] = stored
        state[f"{name}.weight_quantizer._amax"] = amax_w
        state[f"{name}.input_quantizer._amax"] = amax_x.reshape(()).to(torch.float32)
        if name in pqs:
            state[f"{name}.input_quantizer._pre_quant_scale"] = pqs[name]
        truth.input_amax[name], truth.weight_amax[name] = float(amax_x), amax_w.reshape(-1)
        truth.stored_weight[name] = stored
        for role in ("input", "weight", "output"):
            quantizers[f"{name}.{role}_quantizer"] = {
                "_num_bits": num_bits, "_axis": 0 if role == "weight" else None, "_unsigned": False,
                "_narrow_range": False, "_block_sizes": block_sizes if role == "weight" else None,
                "_disabled": role == "output", "_enable_pre_quant_scale": name in pqs and role == "input"}
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                                metadata={"format": "pt"})
    config = {"algorithm": "smoothquant" if smooth else "max", "quant_cfg": {"*weight_quantizer": {
        "num_bits": num_bits, "axis": 0}, "*input_quantizer": {"num_bits": num_bits, "axis": None}}}
    torch.save({"modelopt_state_dict": [("quantize", {"config": config, "metadata": {"quantizer_state": quantizers}})],
                "modelopt_version": "0.47.0"}, out / "modelopt_state.pth")
    return truth


CT_SCHEME = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "block_structure": None,
             "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def compressed_tensors_checkpoint(out: Path, seed: int = 0, dynamic: bool = False) -> QatTruth:
    """compressed-tensors W8A8 (``int-quantized``; static per-tensor inputs, or the dynamic per-token preset)."""
    model, state = _base(out, seed)
    whole, _ = _input_ranges(model, seed)
    truth = QatTruth(out, model, {}, {}, {}, {})
    for name, linear in _linears(model).items():
        weight = linear.weight.detach().to(torch.float32)
        scale = weight.abs().amax(1, keepdim=True) / 127.0
        q = torch.clamp(torch.round(weight / scale), -128, 127).to(torch.int8)
        state[f"{name}.weight"] = q
        state[f"{name}.weight_scale"] = scale
        if not dynamic:
            state[f"{name}.input_scale"] = torch.tensor([whole[name] / 127.0], dtype=torch.float32)
        truth.input_amax[name], truth.weight_amax[name] = whole[name], scale.reshape(-1) * 127.0
        truth.stored_weight[name] = q
        with torch.no_grad():
            linear.weight.copy_(q.to(torch.float32) * scale)  # what the import must give: dequantized
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                                metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    inputs = dict(CT_SCHEME, strategy="token" if dynamic else "tensor", dynamic=dynamic)
    config["quantization_config"] = {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(CT_SCHEME, strategy="channel",
                                                                             dynamic=False),
                                      "input_activations": inputs, "output_activations": None}},
        "format": "int-quantized", "global_compression_ratio": None, "ignore": ["classifier", "bert.pooler.dense"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return truth


Q8BERT_LINEARS = {"attention.self.query": "attention_query", "attention.self.key": "attention_key",
                  "attention.self.value": "attention_value", "attention.output.dense": "attention_output",
                  "intermediate.dense": "ffn_intermediate", "output.dense": "ffn_output"}


def q8bert_checkpoint(out: Path, seed: int = 0, eight_bit: bool = False) -> QatTruth:
    """Q8BERT as nlp-architect's QuantizedBert* saves it: every linear a QuantizedLinear (``input_thresh``,
    ``output_thresh``, ``_step``), the embeddings QuantizedEmbedding (``_step``), per-layer quantization dicts at
    the top level of config.json, ``architectures: QuantizedBertForSequenceClassification``. ``eight_bit``: its
    8-bit export mode (``quantized_weight`` int8 + ``_weight_scale`` = 127 / max|W| instead of ``weight``)."""
    model, state = _base(out, seed)
    whole, _ = _input_ranges(model, seed, every=True)
    truth = QatTruth(out, model, {}, {}, {}, {})
    for name, linear in _linears(model, every=True).items():
        weight = linear.weight.detach().to(torch.float32)
        multiplier = 127.0 / float(weight.abs().max())
        q = torch.clamp(torch.round(weight * multiplier), -127, 127)
        state[f"{name}.input_thresh"] = torch.tensor([whole[name]])
        state[f"{name}.output_thresh"] = torch.tensor([whole[name] * 2.0])
        state[f"{name}._step"] = torch.tensor([100])
        if eight_bit:
            del state[f"{name}.weight"]
            state[f"{name}.quantized_weight"] = q.to(torch.int8)
            state[f"{name}._weight_scale"] = torch.tensor([multiplier])
            with torch.no_grad():
                linear.weight.copy_(q / multiplier)
        truth.input_amax[name] = whole[name]
        truth.weight_amax[name] = torch.full((weight.shape[0],), 127.0 / multiplier)
        truth.stored_weight[name] = q.to(torch.int8)
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        state[f"bert.embeddings.{table}._step"] = torch.tensor([100])
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                                metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["QuantizedBertForSequenceClassification"]
    quant = {"mode": "ema", "weight_bits": 8, "activation_bits": 8, "requantize_output": True, "ema_decay": 0.9999}
    for key in (*Q8BERT_LINEARS.values(), "pooler", "head", "word_embeddings", "position_embeddings",
                "token_type_embeddings"):
        config[key] = dict(quant)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return truth


def torch_ao_checkpoint(out: Path, seed: int = 0, steps: int = 3, whole_model: bool = False) -> QatTruth:
    """torch.ao eager-mode QAT, written by torch itself: the encoder linears get the default x86 QAT qconfig
    (``prepare_qat``: per-channel symmetric weight fake-quant, an output ``activation_post_process``), a few
    training steps run, and the state_dict is saved as the model's weights. ``whole_model``: the form users
    write, ``model.qconfig`` set on the whole model and None on the embeddings (nn.Embedding QAT needs a
    float_qparams qconfig); then every nn.Linear and every LayerNorm (and the pooler's Tanh) gets an output
    fake quantizer too."""
    from torch.ao import quantization as tq

    model, _ = _base(out, seed)
    if whole_model:
        model.qconfig = tq.get_default_qat_qconfig("x86")
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.qconfig = None
    for module in [] if whole_model else _linears(model).values():
        module.qconfig = tq.get_default_qat_qconfig("x86")
    model.train()
    tq.prepare_qat(model, inplace=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(steps):
        loss = model(**sample_ids(seed + step), labels=torch.tensor([0, 1, 2, 0])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # clones: fixed qparams share
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    truth = QatTruth(out, model, {}, {}, {}, {})
    for name, module in model.named_modules():
        if hasattr(module, "weight_fake_quant"):
            truth.weight_amax[name] = module.weight_fake_quant.scale.detach().clone() * 127.0
            truth.stored_weight[name] = module.weight.detach().clone()
        fake = getattr(module, "activation_post_process", None)
        if isinstance(fake, tq.FakeQuantizeBase) and hasattr(fake, "quant_min"):
            truth.output_ranges[name] = (float(fake.scale), int(fake.zero_point), fake.quant_min, fake.quant_max)
    return truth
