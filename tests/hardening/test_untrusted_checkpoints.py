"""Issue 17's checkpoint findings: code that would run, weights from outside the folder, configs that would
allocate without bound, junk that hangs the load, tokenizers that fail late, and misleading messages.

Each case goes through the CLI and keeps the refusal contract (exit 2, one line, no traceback, nothing written).
The memory and time bombs run in a child process under a time limit with its peak RSS read back.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.loading import load_checkpoint
from exporter.manifest import checkpoint_hash
from tests.hardening.conftest import assert_refused, edit_config, partial_siblings, run_cli

ROOT = Path(__file__).resolve().parents[2]
# A child that runs the CLI and reports its own peak resident memory (MB) on its last stderr line: VmHWM of
# /proc/self/status, which belongs to the child's own address space (getrusage's ru_maxrss carries the forking
# parent's high-water mark across exec on Linux: a 2 GB pytest process made every child report 2 GB).
_CHILD = (
    "import sys\n"
    "from exporter.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print(f'PEAK_RSS_MB {peak / 1024:.0f}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)
# What importing torch + transformers + onnxruntime and loading the tiny checkpoint costs, with room to spare.
RSS_CAP_MB = 1500


def _child(argv: list[str], timeout: float, stdin: bytes | None = None) -> tuple[int, str, float]:
    """(exit code, stderr without the RSS line, peak RSS MB) of the CLI in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, *argv], input=stdin, capture_output=True, timeout=timeout,
                          env=env, cwd=ROOT)
    err = done.stderr.decode(errors="replace")
    lines = err.splitlines()
    peak = float(lines[-1].split()[1]) if lines and lines[-1].startswith("PEAK_RSS_MB") else float("nan")
    return done.returncode, "\n".join(line for line in lines if not line.startswith("PEAK_RSS_MB")), peak


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, err
    assert lines[0].startswith("export-model: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _refuse(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *phrases: str) -> str:
    run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], tmp_path / "out", capsys)
    return assert_refused(run, *phrases)


# --- 1. checkpoint code never runs, never ships -------------------------------------------------------------

def _plant_code(checkpoint: Path, marker: Path) -> None:
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    code += "from transformers import BertTokenizerFast\nclass EvilTokenizer(BertTokenizerFast):\n    pass\n"
    (checkpoint / "tokenization_evil.py").write_text(code)
    (checkpoint / "configuration_evil.py").write_text(code.replace("BertTokenizerFast", "BertConfig")
                                                       .replace("EvilTokenizer", "EvilConfig"))


def test_tokenizer_auto_map_is_refused_under_yes_and_its_code_never_runs(checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "checkpoint-code-ran"
    _plant_code(checkpoint, marker)
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    # `yes | export-model ...`: a "y" on stdin for any trust prompt, as in an unattended build.
    code, err, _ = _child(["--model", str(checkpoint), "--output", str(out), "--calibration-samples", "8"],
                          timeout=240, stdin=b"y\n" * 10_000)
    assert code == 2, err
    line = _one_error_line(err)
    assert "auto_map" in line and "never runs checkpoint code" in line
    assert not marker.exists(), "checkpoint code was imported"
    assert not out.exists() and partial_siblings(out) == []


def test_config_auto_map_is_never_imported_and_not_shipped(checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "checkpoint-code-ran"
    _plant_code(checkpoint, marker)
    edit_config(checkpoint, lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                         "AutoModel": "configuration_evil.EvilModel"}))
    loaded = load_checkpoint(checkpoint)
    assert not marker.exists()
    assert "auto_map" not in loaded.config.to_dict()
    loaded.config.save_pretrained(tmp_path / "shipped")  # what the package stage writes
    assert "auto_map" not in json.loads((tmp_path / "shipped" / "config.json").read_text())
    assert [p.name for p in (tmp_path / "shipped").iterdir()] == ["config.json"]  # no .py copied beside it


# --- 3. sizes checked against the weight headers before anything is built ------------------------------------

@pytest.mark.parametrize(
    ("key", "value", "phrases"),
    [
        ("num_hidden_layers", 100_000, ("num_hidden_layers is 100000 but the weights hold 2 layers",)),
        ("max_position_embeddings", 2**40,
         ("max_position_embeddings is 1099511627776 but the weights' position_embeddings table holds 64 rows",)),
        ("intermediate_size", 10**8, ("describes a model of about", "but the weights hold")),
        ("vocab_size", 10**9, ("vocab_size is 1000000000 but the weights' word_embeddings table holds 30522 rows",)),
    ],
    ids=["layers", "positions", "ffn", "vocab"],
)
def test_config_larger_than_its_weights_is_refused_before_building(
    checkpoint: Path, tmp_path: Path, key: str, value: int, phrases: tuple[str, ...],
) -> None:
    """Each built (or began building) a model of the config's size first: killed at 5 GB, no message."""
    edit_config(checkpoint, lambda c: c.update({key: value}))
    out = tmp_path / "out"
    code, err, peak = _child(["--model", str(checkpoint), "--output", str(out)], timeout=180)
    assert code == 2, err
    line = _one_error_line(err)
    for phrase in (*phrases, "restore the config.json saved with the weights"):
        assert phrase in line, line
    assert peak < RSS_CAP_MB, f"peak RSS {peak} MB"
    assert not out.exists()


# --- 4. junk tensors: refused from the header, in seconds ----------------------------------------------------

def _write_safetensors_with_junk(path: Path, tensors: dict[str, torch.Tensor], junk: int) -> None:
    """The real tensors plus `junk` one-byte U8 tensors, written straight into the safetensors layout."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    for i in range(junk):
        header[f"junk.{i}"] = {"dtype": "U8", "shape": [1], "data_offsets": [offset + i, offset + i + 1]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for blob in blobs:
            handle.write(blob)
        handle.write(b"\0" * junk)


def test_a_million_junk_tensors_are_refused_in_seconds(checkpoint: Path, tmp_path: Path) -> None:
    """transformers' unexpected-key bookkeeping on this file was still running after 300 s."""
    weights = load_file(checkpoint / "model.safetensors")
    _write_safetensors_with_junk(checkpoint / "model.safetensors", weights, 1_200_000)
    out = tmp_path / "out"
    code, err, peak = _child(["--model", str(checkpoint), "--output", str(out)], timeout=120)
    assert code == 2, err
    line = _one_error_line(err)
    assert "1,200,0" in line and "tensors, more than the 100,000 allowed" in line, line
    assert peak < RSS_CAP_MB, f"peak RSS {peak} MB"
    assert not out.exists()


def test_junk_writer_premise_a_clean_file_still_loads(checkpoint: Path) -> None:
    """The hand-written layout above is a valid safetensors file: without junk, the checkpoint loads."""
    weights = load_file(checkpoint / "model.safetensors")
    _write_safetensors_with_junk(checkpoint / "model.safetensors", weights, 0)
    loaded = load_checkpoint(checkpoint)
    for name, tensor in loaded.model.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name]), name


# --- 5. tokenizer files: exit 2 at load, not exit 1 at quantize ----------------------------------------------

def _edit_tokenizer_config(folder: Path, **values: object) -> None:
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(values)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def _drop_unk(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()  # the WordPiece vocabulary alone, as older checkpoints ship it
    words = [w for w in (folder / "vocab.txt").read_text().splitlines() if w != "[UNK]"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")


@pytest.mark.parametrize(
    ("edit", "phrases"),
    [
        (lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:5000]),
         ("no usable tokenizer", "copy the tokenizer files")),
        (lambda d: (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": [1, 2]})),
         ("no usable tokenizer", "copy the tokenizer files")),
        (_drop_unk, ("cannot tokenize a test sentence", "[UNK]")),
        (lambda d: _edit_tokenizer_config(d, model_max_length=0),
         ("model_max_length is 0", "expected a positive token count")),
    ],
    ids=["truncated-tokenizer-json", "tokenizer-json-wrong-shape", "vocab-without-unk", "model-max-length-0"],
)
def test_broken_tokenizer_files_are_bad_input(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              edit: object, phrases: tuple[str, ...]) -> None:
    edit(checkpoint)
    _refuse(checkpoint, tmp_path, capsys, *phrases)


def test_tokenizer_whose_ids_the_embeddings_do_not_hold(checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    weights["embeddings.word_embeddings.weight"] = weights["embeddings.word_embeddings.weight"][:1000].clone()
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    edit_config(checkpoint, lambda c: c.update(vocab_size=1000))
    _refuse(checkpoint, tmp_path, capsys, "the model's embeddings hold 1000", "the tokenizer is not the model's")


# --- 8. weights only from inside the folder, and every file read is hashed -----------------------------------

def _shard(checkpoint: Path, shard_name: str) -> dict[str, torch.Tensor]:
    weights = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: shard_name for name in weights}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    return weights


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_weight_map_pointing_outside_the_folder_is_refused(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, where: str) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    weights = load_file(checkpoint / "model.safetensors")
    save_file(weights, outside, metadata={"format": "pt"})
    name = {"parent": "../elsewhere.safetensors", "absolute": str(outside), "subfolder": "sub/x.safetensors"}[where]
    _shard(checkpoint, name)
    _refuse(checkpoint, tmp_path, capsys, f"names shard {name!r}", "weights outside", "are refused")


def test_symlinked_weights_into_another_folder_are_refused(checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    (checkpoint / "model.safetensors").rename(outside)
    (checkpoint / "model.safetensors").symlink_to(outside)
    _refuse(checkpoint, tmp_path, capsys, "outside the checkpoint folder", "copy the file into the folder")


def test_source_hash_names_shards_and_tokenizer_and_changes_with_them(checkpoint: Path) -> None:
    weights = _shard(checkpoint, "model-00001-of-00001.safetensors")
    save_file(weights, checkpoint / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    loaded = load_checkpoint(checkpoint)
    digest = checkpoint_hash(checkpoint, loaded.files_read)
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(digest["files"])
    (checkpoint / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text() + " ")
    assert checkpoint_hash(checkpoint, loaded.files_read)["sha256"] != digest["sha256"]


# --- 10. messages that name the real problem ---------------------------------------------------------------

def test_pruned_heads_with_string_keys_load(tmp_path: Path) -> None:
    """transformers 5 keeps config.json's string keys: they must mean the same layers as 4.57's ints."""
    from tests.checkpoints import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path, "bert", "feature-extraction", pruned_heads={0: [1], 2: [0, 3]}, dead=False).path
    config = json.loads((folder / "config.json").read_text())
    assert set(config["pruned_heads"]) == {"0", "2"}  # JSON keys are strings whoever wrote them
    loaded = load_checkpoint(folder)
    assert loaded.config.pruned_heads == {0: [1], 2: [0, 3]}


def test_narrow_attention_without_pruned_heads_says_so(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    for part in ("query", "key", "value"):
        for kind in ("weight", "bias"):
            name = f"encoder.layer.0.attention.self.{part}.{kind}"
            weights[name] = weights[name][:16].clone()
    name = "encoder.layer.0.attention.output.dense.weight"
    weights[name] = weights[name][:, :16].clone()
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    _refuse(checkpoint, tmp_path, capsys, "narrower than config.json describes", "set pruned_heads")
