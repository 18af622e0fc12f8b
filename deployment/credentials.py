"""TLS certificates and SuperNode keys for an on-premise deployment (``fedrec credentials``).

    fedrec credentials certs/ --host superlink.example.org --host 10.0.0.5 --nodes store-1 store-2

writes

    certs/ca.crt, certs/ca.key        a local certificate authority (keep ca.key offline)
    certs/server.pem, server.key      the SuperLink's TLS certificate (SANs: the --host names)
    certs/nodes/<name>, <name>.pub    one SuperNode's ECDSA P-384 key pair, OpenSSH format

Flower uses them as follows: the SuperLink serves TLS with ``--ssl-ca-certfile ca.crt
--ssl-certfile server.pem --ssl-keyfile server.key``; every SuperNode (and the ``flwr`` CLI)
verifies it with ``--root-certificates ca.crt``; with ``--enable-supernode-auth`` only nodes
whose ``.pub`` was registered by ``flwr supernode register`` may connect, each proving it holds
the private key with ``--auth-supernode-private-key``. A site can make its own key pair
(``--nodes`` on its own machine, or ``ssh-keygen -t ecdsa -b 384``) and hand over only the
``.pub``. Nothing here is fetched from the network; this is ``openssl``'s job done with the
``cryptography`` package Flower already depends on.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Write a new credential file; never overwrite one (a lost CA key cannot be recovered)."""
    if path.exists():
        raise FileExistsError(f"{path}: already exists; move it away or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(out: Path, hosts: list[str]) -> None:
    """A CA, and a server certificate it signs, valid for ``hosts`` (DNS names or IPs)."""
    if not hosts:
        raise ValueError("--host: give at least one name or address the SuperLink is reached at")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
              .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name}: already exists; move it away or choose another folder")
    _write(out / "ca.key", _pem_key(ca_key), secret=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), secret=True)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))


def make_node_key(out: Path, name: str) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format, as ``flower-supernode`` and ``flwr supernode
    register`` read them. Returns the public key's path."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--nodes: {name!r} is not a usable file name for a node key")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if (out / name).exists() or (out / f"{name}.pub").exists():
        raise FileExistsError(f"{out / name}: already exists; move it away or choose another name")
    _write(out / name, private, secret=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode())
    return out / f"{name}.pub"
