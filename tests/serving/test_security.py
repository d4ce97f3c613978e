"""TLS, mutual TLS and bearer tokens: the right client is served, every other one refused.

Certificates are throwaway ones made here with ``cryptography`` (a CA, a server certificate for
127.0.0.1/localhost, client certificates from that CA and from an unrelated one).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from serving.client import TlsConfig
from serving.config import ServerConfig
from serving.proto import scorer_pb2
from tests.serving.fixtures import build_test_ranker
from tests.serving.test_scorer import CATS, ITEMS

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    files: dict[str, bytes] = {}
    for ca_name in ("ca", "other_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _cert(f"test {ca_name}", ca_key, _name(f"test {ca_name}"), ca_key, ca=True)
        files[f"{ca_name}.pem"] = _pem(ca_cert)
        leaves = [("server", True), ("client", False)] if ca_name == "ca" else [("rogue_client", False)]
        for leaf, is_server in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(leaf, key, ca_cert.subject, ca_key, ca=False, server=is_server)
            files[f"{leaf}.pem"], files[f"{leaf}.key"] = _pem(cert), _pem_key(key)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


@pytest.fixture
def publish(model_dir):
    model_dir.publish(build_test_ranker("din"), "1")
    return model_dir.source


def _ok(client) -> bool:
    try:
        return client.score("alice", ITEMS, CATS, timeout=3)[2] == "1"
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[return-value]


def test_default_bind_is_loopback():
    assert ServerConfig(store="memory://", model_dir="m").host == "127.0.0.1"


def test_tls_serves_verified_clients_only(make_store, publish, start_server, pki):
    running = start_server(store=make_store(), source=publish,
                           tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]))
    good = running.client(tls=TlsConfig.from_files(root_ca=str(pki["ca.pem"])))
    assert _ok(good) is True
    plaintext = running.client()
    assert _ok(plaintext) == "UNAVAILABLE"  # a plaintext client cannot talk to a TLS port
    wrong_ca = running.client(tls=TlsConfig.from_files(root_ca=str(pki["other_ca.pem"])))
    assert _ok(wrong_ca) == "UNAVAILABLE"  # the client refuses a server it cannot verify


def test_mutual_tls_requires_a_client_certificate_from_the_ca(make_store, publish, start_server, pki):
    running = start_server(store=make_store(), source=publish, tls_cert=str(pki["server.pem"]),
                           tls_key=str(pki["server.key"]), tls_client_ca=str(pki["ca.pem"]))
    ca = str(pki["ca.pem"])
    good = running.client(tls=TlsConfig.from_files(ca, str(pki["client.pem"]), str(pki["client.key"])))
    assert _ok(good) is True
    no_cert = running.client(tls=TlsConfig.from_files(ca))
    assert _ok(no_cert) == "UNAVAILABLE"
    rogue = running.client(tls=TlsConfig.from_files(ca, str(pki["rogue_client.pem"]), str(pki["rogue_client.key"])))
    assert _ok(rogue) == "UNAVAILABLE"


def test_bearer_token_auth(make_store, publish, start_server, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("rotated-old\n")
    running = start_server(store=make_store(), source=publish, tokens=("s3cret",), token_file=str(token_file))
    assert _ok(running.client(token="s3cret")) is True
    assert _ok(running.client(token="rotated-old")) is True  # every configured token is accepted
    assert _ok(running.client()) == "UNAUTHENTICATED"
    assert _ok(running.client(token="wrong")) == "UNAUTHENTICATED"
    anonymous = running.client()
    with pytest.raises(grpc.RpcError) as err:
        anonymous._stub.Score.with_call(  # a malformed header is refused too
            scorer_pb2.ScoreRequest(user_id="a"),
            metadata=(("authorization", "Basic s3cret"),), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert anonymous.health() == "SERVING"  # probes carry no credentials: health is exempt


def test_tls_and_token_together(make_store, publish, start_server, pki):
    running = start_server(store=make_store(), source=publish, tokens=("s3cret",),
                           tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]))
    tls = TlsConfig.from_files(root_ca=str(pki["ca.pem"]))
    assert _ok(running.client(token="s3cret", tls=tls)) is True
    assert _ok(running.client(tls=tls)) == "UNAUTHENTICATED"


def test_settings_reject_half_tls():
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ServerConfig(store="memory://", model_dir="m", tls_cert="server.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerConfig(store="memory://", model_dir="m", tls_client_ca="ca.pem")
