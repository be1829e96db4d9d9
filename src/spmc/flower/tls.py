"""TLS certificates and SuperNode keys for a Flower deployment, made with ``cryptography`` (a dependency of flwr).

Flower 1.42 serves the Fleet, Control and Runtime APIs of the SuperLink on one HTTPS port when it is started with
``--ssl-ca-certfile``, ``--ssl-certfile`` and ``--ssl-keyfile``; SuperNodes, ``flwr`` and the ServerApp check the
server's certificate against the CA certificate (``--root-certificates``, ``root-certificates`` in a connection).
SuperNode authentication (``--enable-supernode-auth``) admits only SuperNodes whose public key was registered with
``flwr supernode register KEY.pub``; a SuperNode proves it holds the key with ``--auth-supernode-private-key``.
Its keys are EC keys on a NIST curve in OpenSSH format (``ssh-keygen -t ecdsa -b 384``).

:func:`make_tls_files` writes a private CA and a server certificate signed by it (what ``openssl`` would give; the
tests use it on 127.0.0.1); :func:`make_node_key` writes one SuperNode key pair. Private keys are written with mode
0600. For a real deployment use your organisation's certificates, or the ``openssl`` commands in docs/flower.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class TlsFiles:
    """The three files of a TLS-enabled SuperLink: the CA certificate (which clients trust), the server's
    certificate and its private key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format): ``private`` stays on the node, ``public`` is
    registered on the SuperLink."""

    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (mode 0600 from creation, not after)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """Subject alternative names: IP addresses as IP entries, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(directory: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 30) -> TlsFiles:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` into ``directory``: a self-signed CA and a server
    certificate for ``hosts`` (the addresses SuperNodes and ``flwr`` use to reach the SuperLink) signed by it."""
    if not hosts:
        raise ValueError("hosts: empty; the server certificate needs at least one address or DNS name")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spmc test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(server_key))
    return files


def make_node_key(directory: str | Path, name: str) -> NodeKey:
    """Write ``NAME`` (private) and ``NAME.pub`` (public) into ``directory``: an ECDSA P-384 key pair in OpenSSH
    format, as ``ssh-keygen -t ecdsa -b 384 -N "" -f NAME`` writes it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(out / name, out / f"{name}.pub")
    _write_private(
        pair.private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pair.public.write_bytes(public + f" {name}\n".encode())
    return pair
