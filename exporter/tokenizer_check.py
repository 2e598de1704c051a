"""The checkpoint's tokenizer, loaded the safe way and proven usable before minutes of export depend on it.

Never runs checkpoint code (`trust_remote_code=False`; a tokenizer_config.json ``auto_map`` is refused). Bounded:
every tokenizer file within a size cap, a tokenizer.json with a regex first run in a bounded child on texts that
make a backtracking pattern panic or run away, a big tokenizer saved once on trial so the artifact's copy stays
within what the deployment side opens. Then one real tokenization must give ids the embeddings hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.runtime.files import Limits
from exporter.weights import read_json, regular_file
from graphs.core.errors import CheckpointError, one_line

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
# What a tokenizer may also read from the folder (hashed into the manifest's source when present).
TOKENIZER_EXTRA = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt")
# BERT's tokenizer.json is 0.7 MB, XLM-R's 17 MB; the deployment side's cap (exporter/runtime/artifact.py) is the same, so
# what export admits, `run` can open.
MAX_TOKENIZER_BYTES = Limits.tokenizer_bytes
# A regex in tokenizer.json (a Split pre-tokenizer, a Replace normalizer) runs on every text. These texts make a
# backtracking pattern panic (Oniguruma's retry limit) or run long; they are tokenized in a bounded child first.
_REGEX_PROBE_TEXTS = ("a" * 64 + "!", "a" * 4096, " " * 4096 + "x", "1" * 4096, "ab " * 1365, "\u00e9" * 2048 + "!",
                      "\n" * 1024 + "x", "aA1!" * 1024, ". " * 2048)
_REGEX_PROBE_SECONDS = 30
# Encoder layer index in a tensor name (BERT/RoBERTa encoder.layer.N., DistilBERT transformer.layer.N.).
_TOKENIZER_PROBE = ("export-model tokenizer check: naïve café, 42 \u2603 zqxjv!", "a second text")

def load_tokenizer(path: Path, vocab_size: int) -> tuple[Any, list[Path]]:
    """The checkpoint's tokenizer, proven usable by one tokenization, and the files it read.

    Never runs checkpoint code: `trust_remote_code=False`, and a tokenizer_config.json `auto_map` (a tokenizer
    class shipped as Python in the folder) is refused, since the stock class would not be the one trained with.
    """
    import transformers

    fix = ("copy the tokenizer files saved with the model (tokenizer.json or vocab.txt, tokenizer_config.json) there")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}); calibration and parity tokenize real "
            f"text: {fix}"
        )
    files = [path / name for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRA) if (path / name).exists()]
    for file in files:
        regular_file(file, "tokenizer file", fix)
        if file.stat().st_size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{file} is {file.stat().st_size:,} bytes, more than the {MAX_TOKENIZER_BYTES:,} a "
                                  f"tokenizer file may hold; {fix}")
    settings_file = path / "tokenizer_config.json"
    settings = read_json(settings_file, "tokenizer_config.json", fix) if settings_file.exists() else {}
    if not isinstance(settings, dict):
        raise CheckpointError(f"{settings_file} is not a JSON object; {fix}")
    if "auto_map" in settings:
        raise CheckpointError(
            f"{settings_file} has an auto_map to tokenizer code shipped in the checkpoint "
            f"({one_line(ValueError(settings['auto_map']), 120)}); export-model never runs checkpoint code: use a "
            "checkpoint whose tokenizer is a stock transformers class (remove auto_map if it is one)"
        )
    length = settings.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float)) or length < 1):
        raise CheckpointError(
            f"{settings_file}: model_max_length is {length!r}; expected a positive token count such as 512 (or no "
            "model_max_length): fix tokenizer_config.json"
        )
    _probe_tokenizer_regexes(path, fix)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as error:  # noqa: B036  plain Exception for a malformed tokenizer.json; a Rust panic too
        raise CheckpointError(
            f"no usable tokenizer in {path} ({one_line(error, 200)}); calibration and parity tokenize real text: {fix}"
        ) from error
    _check_tokenizer(path, tokenizer, vocab_size, fix)
    _check_saved_size(path, tokenizer)
    return tokenizer, files


def _check_saved_size(path: Path, tokenizer: Any) -> None:
    """The artifact's tokenizer.json is the tokenizer as transformers saves it (indented: up to twice the bytes of a
    compact file). One the deployment side would refuse (over Limits.tokenizer_bytes) is refused here, before the
    export's long stages; small tokenizers skip the trial save."""
    import tempfile

    source = path / "tokenizer.json"
    if not source.is_file() or source.stat().st_size <= Limits.tokenizer_bytes // 2:
        return
    with tempfile.TemporaryDirectory(prefix="export-model-tokenizer-") as trial:
        tokenizer.save_pretrained(trial)
        saved = Path(trial) / "tokenizer.json"
        if saved.is_file() and saved.stat().st_size > Limits.tokenizer_bytes:
            raise CheckpointError(f"{source}: saved into the artifact it becomes {saved.stat().st_size:,} bytes, over "
                                  f"the {Limits.tokenizer_bytes:,} the deployment side opens; use a smaller "
                                  "vocabulary")


def _probe_tokenizer_regexes(path: Path, fix: str) -> None:
    """A tokenizer.json holding a regex is first run, in a child process under a time and memory limit, on texts
    that make a backtracking pattern panic or run away; either is refused with one line (the child's panic never
    reaches this process as a BaseException)."""
    import json
    import subprocess
    import sys

    from graphs.core.telemetry import child_env

    file = path / "tokenizer.json"
    if not file.is_file() or b'"Regex"' not in file.read_bytes():
        return
    script = ("import json, resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
              "from tokenizers import Tokenizer\n"
              "tokenizer = Tokenizer.from_file(sys.argv[1])\n"
              "for text in json.loads(sys.argv[2]):\n"
              "    tokenizer.encode(text)\n"
              "    tokenizer.encode(text, text)\n")
    try:
        done = subprocess.run([sys.executable, "-c", script, str(file), json.dumps(_REGEX_PROBE_TEXTS)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=_REGEX_PROBE_SECONDS, env={**child_env(), "RUST_BACKTRACE": "0"})
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"{file}: a regex in it ran for more than {_REGEX_PROBE_SECONDS} s on a 4 KB test text "
                              f"(catastrophic backtracking); every text would risk that: {fix}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "panicked" in line or "Error" in line or "error" in line]
        why = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise CheckpointError(f"{file}: its regex fails on a test text inside the tokenizers library ({why[:200]}); "
                              f"{fix}")


def _check_tokenizer(path: Path, tokenizer: Any, vocab_size: int, fix: str) -> None:
    """One real tokenization (a pair, an unknown character): it must run and give ids the embeddings hold."""
    try:
        encoded = tokenizer(*_TOKENIZER_PROBE, truncation=True, max_length=64)
        ids = list(encoded["input_ids"])
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as error:  # noqa: B036  the tokenizer files' fault (a Rust panic is a BaseException)
        raise CheckpointError(
            f"the tokenizer in {path} cannot tokenize a test sentence ({one_line(error, 200)}); {fix}"
        ) from error
    if not ids or any(not isinstance(i, int) or i is None for i in ids):
        raise CheckpointError(f"the tokenizer in {path} gives no token ids for a test sentence (missing [UNK]?); {fix}")
    if max(ids) >= vocab_size or min(ids) < 0:
        raise CheckpointError(
            f"the tokenizer in {path} gives token id {max(ids)}, but the model's embeddings hold {vocab_size} "
            f"(vocab_size): the tokenizer is not the model's; {fix}"
        )
    if getattr(tokenizer, "unk_token", None) is not None and tokenizer.unk_token_id is None:
        raise CheckpointError(
            f"the tokenizer in {path} names unknown token {tokenizer.unk_token!r}, which its vocabulary lacks; {fix}"
        )
