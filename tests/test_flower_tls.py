"""``spmc.flower.tls`` (certificates and SuperNode keys) and the command lines ``LocalDeployment`` builds from them,
without starting any process (the deployment itself: tests/test_flower_tls_auth.py, slow)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

pytest.importorskip("cryptography")  # installed with flwr (spmc[flower])

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key  # noqa: E402

from spmc.flower.localhost import LocalDeployment  # noqa: E402
from spmc.flower.tls import make_node_key, make_tls_files  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"


def test_the_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path, hosts=("127.0.0.1", "superlink.example.org"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_a_tls_handshake_with_the_files_succeeds_and_fails_for_another_name(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.server_cert, files.server_key)
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                server.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        address = ("127.0.0.1", port)
        with (
            socket.create_connection(address, timeout=10) as raw,
            client.wrap_socket(raw, server_hostname=address[0]) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with socket.create_connection(address, timeout=10) as raw, pytest.raises(ssl.SSLCertVerificationError):
            client.wrap_socket(raw, server_hostname="other.example.org")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_a_node_key_is_an_openssh_p384_pair_flower_can_load(tmp_path: Path) -> None:
    key = make_node_key(tmp_path, "node-0")
    private = load_ssh_private_key(key.private.read_bytes(), None)
    public = load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1" and private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    assert key.public.read_text().endswith(" node-0\n")
    assert make_node_key(tmp_path, "node-1").public.read_bytes().split()[1] != key.public.read_bytes().split()[1]


def test_no_hosts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hosts"):
        make_tls_files(tmp_path, hosts=())


def test_local_deployment_passes_the_files_to_flower(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "keys")
    keys = [make_node_key(tmp_path / "keys", f"node-{i}") for i in range(2)]
    dep = LocalDeployment(APP, tmp_path, 2, tls=files, node_keys=keys, supernode_auth=True)
    dep.port = 9999
    link = dep._superlink_args()
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag, path in (
        ("--ssl-ca-certfile", files.ca_cert),
        ("--ssl-certfile", files.server_cert),
        ("--ssl-keyfile", files.server_key),
    ):
        assert link[link.index(flag) + 1] == str(path)
    node = dep.supernode_args("partition-id=0 num-partitions=2", 9100, keys[0])
    assert "--insecure" not in node and node[node.index("--root-certificates") + 1] == str(files.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(keys[0].private)
    plain = LocalDeployment(APP, tmp_path, 2)
    plain.port = 9999
    assert "--insecure" in plain._superlink_args() and "--insecure" in plain.supernode_args("", 9100, None)


def test_local_deployment_refuses_authentication_without_tls_and_a_wrong_number_of_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="supernode_auth needs tls"):
        LocalDeployment(APP, tmp_path, 2, supernode_auth=True)
    with pytest.raises(ValueError, match="node_keys has 1 entries for 2 nodes"):
        LocalDeployment(APP, tmp_path, 2, node_keys=[None])
