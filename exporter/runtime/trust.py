"""What anchors an artifact outside its folder: a signature of the manifest's exact bytes by a key the caller
names (Ed25519 or ECDSA), or a pinned sha256 of the manifest. The manifest lists the sha256 of every other file,
so either one covers the whole folder; without them a check proves only that the folder agrees with itself.
``cryptography`` is imported only when a key is given."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.runtime.files import _HEX64, MANIFEST, SIGNATURE, Limits, parse_json, read_capped, sha256_digest
from graphs.core.errors import ParityError, UsageError

_SIGNED_PREFIX = b"export-model manifest signature v1\n"


@dataclass(frozen=True)
class Trust:
    """What anchors the artifact outside its folder. `public_keys`: PEM public keys (files outside the folder)
    one of which must have signed the manifest; `digest`: ``sha256:<hex>`` the manifest's bytes must hash to;
    `require_signature`: refuse an artifact without a valid signature."""

    public_keys: tuple[Path, ...] = ()
    digest: str | None = None
    require_signature: bool = False


def check_digest_form(digest: str | None) -> str | None:
    if digest is None:
        return None
    value = digest.removeprefix("sha256:")
    if not _HEX64.fullmatch(value):
        raise UsageError(f"--digest {digest[:80]!r} is not sha256:<64 lowercase hex digits> (the manifest digest "
                         "export-model prints and `verify` reports)")
    return value


def load_public_keys(paths: tuple[Path, ...], folder: Path) -> list[tuple[str, Any]]:
    """(key id, key) per PEM public key file; a key inside the artifact folder is refused (it would vouch for
    itself)."""
    keys = []
    for path in paths:
        path = Path(path)
        try:
            inside = path.resolve().is_relative_to(folder.resolve())
        except OSError:
            inside = False
        if inside:
            raise UsageError(f"--public-key {path} lies inside the artifact folder; a key must come from outside "
                             "what it checks (your pipeline's own secret store or repository)")
        keys.append(load_public_key(path))
    return keys


def load_public_key(path: Path) -> tuple[str, Any]:
    """(key id, key) of a PEM Ed25519 or ECDSA public key file (an X.509 certificate's key works too)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509 import load_pem_x509_certificate

    try:
        data = Path(path).read_bytes()[: 64 * 1024]
        key = (load_pem_x509_certificate(data).public_key() if b"BEGIN CERTIFICATE" in data
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--public-key {path}: not a readable PEM public key ({str(error)[:120]}); export it "
                         "with `openssl pkey -in private.pem -pubout -out public.pem`") from None
    if not isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey)):
        raise UsageError(f"--public-key {path}: a {type(key).__name__}; use an Ed25519 or ECDSA key")
    return key_id(key), key


def key_id(public_key: Any) -> str:
    """sha256 of the key's DER SubjectPublicKeyInfo: how a signature names its key."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + sha256_digest(der)


def signed_message(manifest_bytes: bytes) -> bytes:
    """What a signature covers: a fixed context string, then the manifest's exact bytes."""
    return _SIGNED_PREFIX + manifest_bytes


def verify_signature(key: Any, signature: bytes, manifest_bytes: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed_message(manifest_bytes), ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, signed_message(manifest_bytes))
    except (InvalidSignature, ValueError):
        return False
    return True


def anchor(root_fd: int, folder: Path, manifest_bytes: bytes, manifest_sha: str, keys: list[tuple[str, Any]],
            digest: str | None, require_signature: bool, limits: Limits) -> str:
    """Check the trust anchors asked for; the line `verify` prints about them."""
    anchors = []
    if digest is not None:
        if manifest_sha != digest:
            raise ParityError(f"{folder / MANIFEST}: sha256:{manifest_sha} is not the pinned --digest sha256:{digest}"
                              "; the artifact is not the one pinned")
        anchors.append(f"pinned digest sha256:{digest[:16]}... matches")
    signature = None
    try:
        signature = parse_json(read_capped(root_fd, SIGNATURE, 64 * 1024), str(folder / SIGNATURE), ParityError)
    except UsageError as error:
        if "missing" not in str(error) or isinstance(error, ParityError):
            raise ParityError(f"{folder}: {error}") from None
    if keys:
        if signature is None:
            raise ParityError(f"{folder} has no {SIGNATURE}: it is not signed, and --public-key asks for a signature "
                              "(sign it with `export-model sign DIR --key private.pem`)")
        if not (isinstance(signature, dict) and isinstance(signature.get("key_id"), str)
                and isinstance(signature.get("signature"), str)):
            raise ParityError(f"{folder / SIGNATURE}: not an export-model signature ({{key_id, signature}})")
        matching = [(kid, key) for kid, key in keys if kid == signature["key_id"]]
        if not matching:
            raise ParityError(f"{folder / SIGNATURE}: signed by key {signature['key_id'][:80]}, which is none of the "
                              "--public-key keys given")
        try:
            raw = base64.b64decode(signature["signature"], validate=True)
        except ValueError:
            raise ParityError(f"{folder / SIGNATURE}: the signature is not base64") from None
        if not verify_signature(matching[0][1], raw, manifest_bytes):
            raise ParityError(f"{folder / MANIFEST}: the signature does not match (the manifest was changed or "
                              f"re-written after it was signed by {matching[0][0][:23]}...)")
        anchors.insert(0, f"signature by key {matching[0][0][:23]}... verified")
    elif require_signature:
        raise UsageError("--require-signature needs --public-key FILE")
    if anchors:
        return "; ".join(anchors)
    signed = " (it carries a signature, but no --public-key was given to check it)" if signature is not None else ""
    return ("internal consistency only: no signature or pinned digest checked" + signed
            + "; anyone who can write the folder can rewrite it")
