"""TLS on the plain gRPC server and the ``grpcs://`` client, with a self-signed cert made here."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kdserve import tls, wire
from student_workers.client.errors import TeacherUnavailable
from student_workers.client.sync_client import SyncTeacherClient
from teacher_server.grpc_server import run_server
from tests.test_client import assert_same, direct

TOKEN = "tls-test-token"
SPEC = wire.target_spec(hidden={"vision": [1, -1]}, logits=True)


def self_signed(dirpath: Path, name: str = "localhost") -> tuple[Path, Path]:
    """(cert.pem, key.pem): a P-256 cert for localhost and 127.0.0.1, valid one day."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = dirpath / f"{name}.crt", dirpath / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_server(vit_engine, tmp_path_factory):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    with run_server(vit_engine, auth_token=TOKEN, tls=tls.server_credentials(cert, key), health_interval_s=0) as port:
        yield port, cert


FAST = dict(timeout=5.0, retry_budget_s=0.5, backoff_s=0.05, max_backoff_s=0.1)


def test_grpcs_round_trip_equals_engine(vit_engine, tls_server):
    port, cert = tls_server
    x = torch.rand(3, 3, 32, 32)
    with SyncTeacherClient(f"grpcs://127.0.0.1:{port}", tls_ca_file=str(cert), auth_token=TOKEN, **FAST) as c:
        assert c.address == f"grpcs://127.0.0.1:{port}"
        out = c.get_targets({"pixel_values": x}, SPEC, stream=False)
        streamed = c.get_targets({"pixel_values": x}, SPEC, stream=True)
    want = direct(vit_engine, {"pixel_values": x}, SPEC)
    assert_same(out, want)
    assert_same(streamed, want)


def test_ca_file_needs_grpcs(tls_server):
    port, cert = tls_server
    with pytest.raises(ValueError, match="not grpcs://"):
        SyncTeacherClient(f"grpc://127.0.0.1:{port}", tls_ca_file=str(cert), auth_token=TOKEN)


@pytest.mark.parametrize("how", ["plaintext", "untrusted"])
def test_wrong_transport_security_fails(tls_server, tmp_path, how):
    """A plaintext client, or one trusting another CA, never gets an answer."""
    port, _ = tls_server
    if how == "plaintext":
        kwargs, address = {}, f"grpc://127.0.0.1:{port}"
    else:
        other, _ = self_signed(tmp_path)
        kwargs, address = {"tls_ca_file": str(other)}, f"grpcs://127.0.0.1:{port}"
    with SyncTeacherClient(address, auth_token=TOKEN, **kwargs, **FAST) as c:
        with pytest.raises(TeacherUnavailable) as e:
            c.describe()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(e.value).startswith(f"teacher unreachable at {c.address} for ")


def test_tls_and_token_both_required(tls_server):
    port, cert = tls_server
    with SyncTeacherClient(f"grpcs://127.0.0.1:{port}", tls_ca_file=str(cert), **FAST) as c:
        with pytest.raises(Exception) as e:
            c.describe()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and c.stats.retries == 0


@pytest.mark.unit
def test_bad_files(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(tls.TLSError, match="not PEM"):
        tls.channel_credentials(tmp_path / "junk.pem")
    with pytest.raises(tls.TLSError, match="cannot read"):
        tls.server_credentials(tmp_path / "none.crt", tmp_path / "none.key")
    with pytest.raises(tls.TLSError, match="cannot read the CA file"):
        SyncTeacherClient("grpcs://127.0.0.1:1", tls_ca_file=str(tmp_path / "none.crt"))
    assert tls.check_pair(None, None) is False and tls.check_pair("c", "k") is True
    with pytest.raises(tls.TLSError):
        tls.check_pair("c", None)
