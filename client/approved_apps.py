"""A site runs only app bundles it approved: the site-side pin for Flower 1.41.

    fedrec client approve FAB --key KEY --approvals DIR              sign a reviewed bundle (offline)
    flower-supernode … --isolation process --clientappio-api-address 127.0.0.1:9094
    fedrec client superexec --runtime-api-address 127.0.0.1:9094 --insecure \\
        --approvals DIR --trusted-keys KEYS.yaml                     the site's own SuperExec

Flower's ``--trusted-entities`` accepts only signatures issued through Flower Hub (README,
"Which code a site runs"), so a site that reviews a bundle itself pins it here. With
``--isolation process`` a SuperNode starts no ClientApp itself: a SuperExec the site runs
launches each one. This is Flower's SuperExec with one check in front of its executor: a task
starts only if its bundle's SHA-256 carries an approval, an ed25519 signature over that hash by
a key in ``KEYS.yaml`` (``key-id: "ssh-ed25519 …"``, the format of Flower's trusted entities).
Anything else is refused before a process starts: the site releases nothing, and the server
sees no reply (a failure after ``round-timeout``). Flower installs a bundle under its content
hash and loads the ClientApp from the folder of the hash the task names, so what runs is the
approved content or nothing.

Approvals are files ``DIR/<sha256>.json`` (``{"fab-sha256", "key-id", "signature"}``): a
reviewer signs offline, the site copies the file in. The bundle is what ``flwr build`` writes
for the reviewed source (Flower builds the same bytes for ``flwr run``, with fixed file dates).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def approve(fab: Path, key: Path, key_id: str, approvals: Path) -> Path:
    """Sign the bundle's SHA-256 with an ed25519 private key (OpenSSH or PEM); the approval file."""
    digest = hashlib.sha256(Path(fab).read_bytes()).hexdigest()
    raw = Path(key).read_bytes()
    private = (serialization.load_ssh_private_key if b"OPENSSH" in raw else serialization.load_pem_private_key)(raw, None)
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key}: not an ed25519 private key (ssh-keygen -t ed25519)")
    approvals.mkdir(parents=True, exist_ok=True)
    out = approvals / f"{digest}.json"
    out.write_text(json.dumps({"fab-sha256": digest, "key-id": key_id,
                               "signature": base64.b64encode(private.sign(digest.encode())).decode()}) + "\n")
    return out


def trusted_keys(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    import yaml

    keys = {}
    for key_id, text in (yaml.safe_load(Path(path).read_text()) or {}).items():
        key = serialization.load_ssh_public_key(str(text).encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}: key {key_id!r} is not ed25519")
        keys[str(key_id)] = key
    return keys


def approved(fab_sha256: str | None, approvals: Path, keys: dict[str, ed25519.Ed25519PublicKey]) -> bool:
    """Whether a trusted key signed this bundle hash."""
    if not fab_sha256:
        return False
    path = Path(approvals) / f"{fab_sha256}.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    key = keys.get(record.get("key-id"))
    if key is None or record.get("fab-sha256") != fab_sha256:
        return False
    try:
        key.verify(base64.b64decode(record["signature"]), fab_sha256.encode())
    except (InvalidSignature, ValueError, KeyError):
        return False
    return True


def run_superexec(runtime_api_address: str, insecure: bool, approvals: Path, keys_file: Path) -> None:
    """Flower's SuperExec, launching only approved bundles (the one place this site reaches into
    Flower's SuperExec internals: its executor factory)."""
    from flwr.supercore.superexec import run_superexec as flower
    from flwr.supercore.superexec.executor.types import LaunchResult

    keys = trusted_keys(keys_file)
    make_executor = flower.get_executor

    class ApprovedOnly:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def launch(self, spec):
            if not approved(spec.fab_hash, approvals, keys):
                return LaunchResult.failed(f"app bundle {spec.fab_hash} is not approved by this site")
            return self.inner.launch(spec)

    flower.get_executor = lambda *args, **kwargs: ApprovedOnly(make_executor(*args, **kwargs))
    flower.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure)
