"""`export-model sign DIR --key private.pem`: a signature of the artifact's manifest, written beside it.

The manifest lists the sha256 and size of every other file of the artifact, so a signature over its exact bytes
covers the whole folder. The signature goes to ``manifest.sig`` (JSON: format, algorithm, key id, base64
signature); `verify --public-key public.pem` and `run --public-key public.pem` check it offline, with a key that
never comes from the folder. Keys are PEM files: Ed25519 (``openssl genpkey -algorithm ed25519``) or ECDSA
P-256 (the key type OpenSSF model-signing's key-based signing uses). The folder is checked against its manifest
before it is signed, so a damaged folder is never vouched for.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from exporter.runtime.artifact import Artifact
from exporter.runtime.files import SIGNATURE
from exporter.runtime.trust import key_id, signed_message
from graphs.core.errors import ParityError, UsageError

FORMAT = "export-model-signature"


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 or ECDSA private key from an unencrypted PEM file (one line and exit 2 if it is not one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes()[: 64 * 1024], password=None)
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--key {path}: not a readable unencrypted PEM private key ({str(error)[:120]}); make "
                         "one with `openssl genpkey -algorithm ed25519 -out private.pem`") from None
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise UsageError(f"--key {path}: a {type(key).__name__}; use an Ed25519 or ECDSA key")
    return key


def sign_artifact(folder: str | Path, key: Any) -> dict[str, str]:
    """Check `folder` against its manifest, then write ``manifest.sig`` (atomically) signed with `key`. Returns the
    signature record; ParityError (exit 3) if the folder does not match its manifest."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    with Artifact.open(folder) as artifact:
        problems = artifact.check_all() + [f"{name}: not listed in the manifest" for name in artifact.unlisted()]
        if problems:
            raise ParityError(f"{folder} does not match its manifest ({'; '.join(problems[:3])}); it was not "
                              "signed: re-export it")
        manifest_bytes = artifact.manifest_bytes
    message = signed_message(manifest_bytes)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw, algorithm = key.sign(message, ec.ECDSA(hashes.SHA256())), f"ecdsa-{key.curve.name}-sha256"
    else:
        raw, algorithm = key.sign(message), "ed25519"
    record = {"format": FORMAT, "version": "1", "algorithm": algorithm, "key_id": key_id(key.public_key()),
              "manifest_sha256": artifact.manifest_sha256, "signature": base64.b64encode(raw).decode("ascii")}
    target = folder / SIGNATURE
    partial = folder / f".{SIGNATURE}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return record

