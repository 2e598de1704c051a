"""Signing an artifact's manifest and checking it on the deployment side (exporter/runtime/signing.py, exporter/runtime/artifact.py).

The key pair is made here with `cryptography`, as `openssl genpkey -algorithm ed25519` would make it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from exporter.cli import main
from exporter.runtime.files import sha256_digest
from tests.checkpoints import changed_copy
from tests.exporter.test_loading import tiny_bert


def write_key_pair(folder: Path, kind: str = "ed25519") -> tuple[Path, Path]:
    """(private.pem, public.pem) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "private.pem", folder / "public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(an artifact exported with --sign-key, its public key, an unsigned artifact of the same checkpoint)."""
    root = tmp_path_factory.mktemp("signing")
    private, public = write_key_pair(root / "keys")
    checkpoint = tiny_bert(root / "ckpt", max_position_embeddings=64)
    assert main(["--model", str(checkpoint), "--output", str(root / "signed"), "--calibration-samples", "8",
                 "--sign-key", str(private), "--latency", "off"]) == 0
    unsigned = Path(shutil.copytree(root / "signed", root / "unsigned"))
    (unsigned / "manifest.sig").unlink()
    return root / "signed", public, unsigned


def verify(folder: Path, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["verify", str(folder), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_signed_artifact_verifies_with_its_public_key(signed: tuple[Path, Path, Path],
                                                        capsys: pytest.CaptureFixture) -> None:
    folder, public, _ = signed
    code, out, err = verify(folder, capsys, "--public-key", str(public), "--require-signature")
    assert code == 0, err
    assert "trust: signature by key sha256:" in out and "verified" in out
    digest = sha256_digest((folder / "manifest.json").read_bytes())
    code, out, _ = verify(folder, capsys, "--digest", f"sha256:{digest}")
    assert code == 0 and "pinned digest" in out
    code, out, _ = verify(folder, capsys)
    assert code == 0 and "internal consistency only" in out and "no --public-key was given" in out


def test_one_changed_byte_in_any_file_fails_the_signed_verify(signed: tuple[Path, Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    folder, public, _ = signed
    names = sorted(json.loads((folder / "manifest.json").read_text())["files"])
    for index, name in enumerate([*names, "manifest.json"]):
        copy = changed_copy(folder, tmp_path / f"c{index}", name)
        code, _, err = verify(copy, capsys, "--public-key", str(public))
        assert code == 3, (name, err)
        expected = "the signature does not match" if name == "manifest.json" else f"{name}:"
        assert expected in err, (name, err)


def test_a_manifest_rewritten_with_fresh_hashes_fails_the_signature(signed: tuple[Path, Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    folder, public, _ = signed
    copy = changed_copy(folder, tmp_path / "copy", "model.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    data = (copy / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"sha256": sha256_digest(data), "bytes": len(data)}
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    code, _, err = verify(copy, capsys, "--public-key", str(public))
    assert code == 3 and "the signature does not match" in err, err
    digest = sha256_digest((folder / "manifest.json").read_bytes())
    code, _, err = verify(copy, capsys, "--digest", f"sha256:{digest}")
    assert code == 3 and "is not the pinned --digest" in err, err


def test_an_unsigned_artifact_fails_when_a_signature_is_required(signed: tuple[Path, Path, Path],
                                                                 capsys: pytest.CaptureFixture) -> None:
    _, public, unsigned = signed
    code, _, err = verify(unsigned, capsys, "--public-key", str(public), "--require-signature")
    assert code == 3 and "it is not signed" in err, err
    code, _, err = verify(unsigned, capsys, "--require-signature")
    assert code == 2 and "--require-signature needs --public-key" in err, err


def test_keys_are_never_taken_from_the_folder_and_a_wrong_key_fails(signed: tuple[Path, Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    folder, public, _ = signed
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    shutil.copy(public, copy / "public.pem")
    code, _, err = verify(copy, capsys, "--public-key", str(copy / "public.pem"))
    assert code == 2 and "lies inside the artifact folder" in err, err
    _, other = write_key_pair(tmp_path / "other")
    code, _, err = verify(folder, capsys, "--public-key", str(other))
    assert code == 3 and "none of the --public-key keys" in err, err


def test_sign_command_with_an_ecdsa_key_and_refusals(signed: tuple[Path, Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    _, _, unsigned = signed
    copy = Path(shutil.copytree(unsigned, tmp_path / "copy"))
    private, public = write_key_pair(tmp_path / "ec", "ecdsa")
    assert main(["sign", str(copy), "--key", str(private)]) == 0
    assert json.loads((copy / "manifest.sig").read_text())["algorithm"] == "ecdsa-secp256r1-sha256"
    code, out, err = verify(copy, capsys, "--public-key", str(public))
    assert code == 0 and "signature by key" in out, err
    damaged = changed_copy(unsigned, tmp_path / "damaged", "tokenizer.json")
    assert main(["sign", str(damaged), "--key", str(private)]) == 3  # a damaged folder is never vouched for
    assert not (damaged / "manifest.sig").exists()
    assert main(["sign", str(copy), "--key", str(public)]) == 2  # a public key is not a signing key
    assert "not a readable unencrypted PEM private key" in capsys.readouterr().err


def test_a_bad_sign_key_is_refused_before_the_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    code = main(["--output", str(tmp_path / "out"), "--sign-key", str(tmp_path / "bad.pem")])
    assert code == 2 and "not a readable unencrypted PEM private key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
