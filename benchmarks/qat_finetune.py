"""Quantization-aware training for the benchmark: the fine-tuned MiniLM topic classifier of
:mod:`benchmarks.finetune` trained further with fake INT8 quantization on every encoder linear's input and weight,
saved in NVIDIA ModelOpt's checkpoint form so that the export imports its learned scales instead of calibrating.

No QAT checkpoint of a model this benchmark trains can be downloaded here, and nvidia-modelopt is not a dependency,
so the fake quantizer is written out here with ModelOpt's INT8 scheme (what ``exporter.qat_formats.modelopt``
reads): symmetric, one step per input tensor and one per output channel of a weight, step = amax / 127, integers
in [-128, 127], ``torch.round`` (half to even). Gradients pass the rounding straight through (STE); the amax values
are trained too (as log amax, no weight decay), the clamp and rounding giving them the LSQ gradient. They start
from calibration maxima: max |x| of each linear's input over batches of training texts (ModelOpt's ``max``
calibration) and max |W| per output channel. Q, K and V read one tensor and share one input amax: the exported
graph's fused Attention quantizes that tensor once. Training uses the classification task's examples, batches and
optimizer loop of :mod:`benchmarks.finetune` (calibration side of the corpus only), at a lower learning rate since
the model is already fine-tuned.

The folder holds the trained float weights, ``<linear>.input_quantizer._amax`` (0-d) and
``<linear>.weight_quantizer._amax`` ([out, 1]) for each encoder linear, and ``modelopt_state.pth`` (8-bit,
signed, per-channel weights, per-tensor inputs). The pooler and classifier stay float. A folder trained with the
same settings from the same base is reused (``finetune.json`` records them, the gold accuracy on held-out texts
with fake quantization on and off, and how far the learned amax moved from the calibrated one).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn

from benchmarks.finetune import (
    RECORD,
    Settings,
    _reusable,
    _save,
    _train,
    topic_batch,
    topic_hits,
    topic_label,
)
from calibration.corpus import builtin_passages, split_texts

ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")
QMIN, QMAX = -128, 127
MODELOPT_STATE = "modelopt_state.pth"
AMAX_LEARNING_RATE = 1e-3
"""Learning rate of the log amax values (weights: Settings.learning_rate)."""


def fake_quantize(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / step), -128, 127) * step`` with step = amax / 127; the rounding passes gradients straight
    through, the clamp stops them outside the range (and hands them to ``amax`` there)."""
    step = amax / QMAX
    scaled = torch.clamp(x / step, QMIN, QMAX)
    return (scaled + (torch.round(scaled) - scaled).detach()) * step


class FakeQuantLinear(nn.Module):
    """``linear`` with its input and weight fake-quantized (``enabled``), amax trained as log values.
    ``input_amax``: a value, or the log-amax parameter of linears that read the same tensor and share one step."""

    def __init__(self, linear: nn.Linear, input_amax: float | nn.Parameter) -> None:
        super().__init__()
        self.linear = linear
        self.enabled = True
        self.log_input_amax = (input_amax if isinstance(input_amax, nn.Parameter) else
                               nn.Parameter(torch.tensor(float(input_amax)).clamp_min(1e-8).log()))
        weight_amax = linear.weight.detach().abs().amax(1, keepdim=True).clamp_min(1e-8)
        self.log_weight_amax = nn.Parameter(weight_amax.log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.linear(x)
        weight = fake_quantize(self.linear.weight, self.log_weight_amax.exp())
        return nn.functional.linear(fake_quantize(x, self.log_input_amax.exp()), weight, self.linear.bias)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The encoder layers' linears (Q, K, V, attention output, FFN in and out) by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in name
            and name.endswith(ENCODER_LINEARS)}


def input_maxima(model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
    """max |x| of each encoder linear's input over ``batches`` (labels ignored), the model in eval mode."""
    found: dict[str, float] = {}
    hooks = []
    for name, module in encoder_linears(model).items():
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            found[name] = max(found.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(module.register_forward_pre_hook(hook))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    for handle in hooks:
        handle.remove()
    return found


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)


def qat_finetune(out: Path, base: Path, steps: int = 200, seed: int = 0, calibration_batches: int = 8,
                 log: bool = True) -> Path:
    """Quantization-aware training of the classifier in ``base`` (a :func:`benchmarks.finetune.finetune` folder,
    or any BERT sequence classifier over the topic groups) for ``steps`` steps; saves the ModelOpt-form
    checkpoint to ``out`` and returns it, or reuses ``out`` when it holds one trained with the same settings from
    the same base."""
    settings = Settings("qat-text-classification", steps, seed, learning_rate=2e-5)
    base_record = json.loads((base / RECORD).read_text()).get("settings") if (base / RECORD).exists() else str(base)
    if _reusable(out, settings) and json.loads((out / RECORD).read_text()).get("base") == base_record:
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    passages = builtin_passages()
    calibration, heldout = split_texts([text for _, text in passages])
    labels = {text: topic_label(topic) for topic, text in passages}
    train = [(text, labels[text]) for text in calibration]
    test = [(text, labels[text]) for text in heldout]
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base)
    linears = encoder_linears(model)
    maxima = input_maxima(model, [topic_batch(tokenizer, train[i * 16 : (i + 1) * 16])
                                  for i in range(min(calibration_batches, len(train) // 16 or 1))])
    shared: dict[str, nn.Parameter] = {}  # Q, K and V read one tensor: one input step (the fused Attention's)
    for name in linears:
        if ".attention.self." in name:
            layer = name.rsplit(".", 1)[0]
            start_amax = max(v for k, v in maxima.items() if k.startswith(layer + "."))
            shared.setdefault(layer, nn.Parameter(torch.tensor(start_amax).clamp_min(1e-8).log()))
    wrapped = {name: FakeQuantLinear(linear, shared.get(name.rsplit(".", 1)[0], maxima[name]))
               for name, linear in linears.items()}
    _swap(model, wrapped)
    amax = [p for name, p in model.named_parameters() if ".log_" in name]
    weights = [p for name, p in model.named_parameters() if ".log_" not in name]
    groups = [{"params": weights}, {"params": amax, "lr": AMAX_LEARNING_RATE, "weight_decay": 0.0}]

    def accuracy(fake_quant: bool) -> float:
        for module in wrapped.values():
            module.enabled = fake_quant
        model.eval()
        with torch.no_grad():
            hits = sum(topic_hits(model, topic_batch(tokenizer, test[i : i + 32])) for i in range(0, len(test), 32))
        for module in wrapped.values():
            module.enabled = True
        return hits / len(test)

    before = accuracy(True)
    start = time.perf_counter()
    losses = _train(model, lambda: model(**topic_batch(tokenizer, rng.sample(train, settings.batch_size))).loss,
                    settings, "quantization-aware training (text-classification)", log, groups=groups)
    measured = {"heldout_gold_accuracy_fake_quant_before": before, "heldout_gold_accuracy_fake_quant": accuracy(True),
                "heldout_gold_accuracy_float": accuracy(False)}
    with torch.no_grad():
        learned = {name: (float(m.log_input_amax.exp()), m.log_weight_amax.exp().detach().clone())
                   for name, m in wrapped.items()}
    moved = sorted(abs(learned[n][0] / maxima[n] - 1) for n in learned)
    _swap(model, {name: m.linear for name, m in wrapped.items()})
    _save(out, model, tokenizer, settings, losses, start, **measured,
          input_amax_relative_change_median=moved[len(moved) // 2], input_amax_relative_change_max=moved[-1])
    _write_modelopt(out, learned)
    record = json.loads((out / RECORD).read_text())  # with its base last: only a complete folder is reused
    (out / RECORD).write_text(json.dumps({**record, "base": base_record}, indent=2))
    return out


def _write_modelopt(out: Path, learned: dict[str, tuple[float, torch.Tensor]]) -> None:
    """Add the learned amax tensors to ``out``'s model.safetensors under ModelOpt's names and write
    ``modelopt_state.pth`` (plain containers, as ``torch.load(weights_only=True)`` reads them)."""
    files = sorted(out.glob("model*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one model.safetensors in {out}, found {[f.name for f in files]}")
    state = safetensors.torch.load_file(str(files[0]))
    quantizers: dict[str, dict[str, Any]] = {}
    for name, (input_amax, weight_amax) in learned.items():
        state[f"{name}.input_quantizer._amax"] = torch.tensor(input_amax, dtype=torch.float32)
        state[f"{name}.weight_quantizer._amax"] = weight_amax.to(torch.float32).reshape(-1, 1).contiguous()
        for role in ("input", "weight"):
            quantizers[f"{name}.{role}_quantizer"] = {
                "_num_bits": 8, "_axis": 0 if role == "weight" else None, "_unsigned": False, "_narrow_range": False,
                "_block_sizes": None, "_disabled": False, "_enable_pre_quant_scale": False}
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(files[0]), metadata={"format": "pt"})
    config = {"algorithm": "max", "quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0},
                                                "*input_quantizer": {"num_bits": 8, "axis": None}}}
    torch.save({"modelopt_state_dict": [("quantize", {"config": config, "metadata": {"quantizer_state": quantizers}})],
                "modelopt_version": "benchmarks.qat_finetune"}, out / MODELOPT_STATE)

