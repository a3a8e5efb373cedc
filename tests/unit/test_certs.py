"""`listen.tls` at load: the files must exist and load as a certificate chain and its key, or one line says
which key is wrong and why (gateway/config/certs.py, gateway/config/model.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gateway.config.certs import server_context
from gateway.generation import reverse_only
from tests.tls_files import issue, leaf_pems
from tests.unit.test_config import loads, problems


@pytest.fixture
def pair(test_ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_pem, key_pem = leaf_pems(issue(test_ca))
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key


def tls_yaml(cert: Path | str, key: Path | str, extra: str = "") -> str:
    return f"{extra}listen:\n  tls:\n    cert_file: '{cert}'\n    key_file: '{key}'\n"


def test_a_good_pair_loads_and_tls_is_off_by_default(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    config = loads(tmp_path, tls_yaml(*pair))
    assert config.listen.tls is not None and config.listen.tls.cert_file == str(pair[0])
    assert loads(tmp_path, "listen: {port: 1}\n").listen.tls is None


def test_a_missing_file_names_its_key_and_line(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    assert problems(tmp_path, tls_yaml(pair[0], tmp_path / "nope.key")) == [
        f"F:4: listen.tls.key_file: cannot read '{tmp_path / 'nope.key'}': No such file or directory"
    ]


def test_a_file_without_a_certificate_is_blamed(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    # The key given as the certificate: a PEM file, but not a certificate.
    assert problems(tmp_path, tls_yaml(pair[1], pair[1])) == [
        f"F:3: listen.tls.cert_file: '{pair[1]}' holds no PEM certificate"
    ]
    assert problems(tmp_path, tls_yaml(pair[0], pair[0])) == [
        f"F:4: listen.tls.key_file: '{pair[0]}' holds no PEM private key"
    ]


def test_the_key_of_another_certificate_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], test_ca: trustme.CA
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(leaf_pems(issue(test_ca))[1])
    assert problems(tmp_path, tls_yaml(pair[0], other)) == [
        f"F:4: listen.tls.key_file: '{other}' is not the key of the certificate in cert_file"
    ]


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """OpenSSL would ask for the passphrase on the terminal: a server would hang at start."""
    key = serialization.load_pem_private_key(pair[1].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert problems(tmp_path, tls_yaml(pair[0], encrypted)) == [
        f"F:4: listen.tls.key_file: '{encrypted}' is encrypted; give an unencrypted key"
    ]


def test_a_tls_listener_advertises_itself_over_https(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    text = tls_yaml(*pair, extra="advertise_url: http://bt-gateway.egress.svc:8080\n")
    assert problems(tmp_path, text) == ["F:1: advertise_url: must be an https:// URL when listen.tls is set"]
    https = tls_yaml(*pair, extra="advertise_url: https://bt-gateway.egress.svc:8080\n")
    assert loads(tmp_path, https).advertise_url == "https://bt-gateway.egress.svc:8080"


def test_the_server_context_is_tls12_plus_and_asks_for_no_client_certificate() -> None:
    """ALPN (http/1.1 only) is checked on a real handshake: tests/integration/test_listen_tls.py."""
    context = server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # no client certificates asked for


def test_a_tls_listeners_refused_tunnels_name_its_https_url(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """Without advertise_url the way in is the listener's own address, in the scheme it speaks."""
    config = loads(tmp_path, tls_yaml(*pair, extra="forward_proxy: {tunnel_to_limited_hosts: deny}\n"))
    phrases = {error.phrase for error in reverse_only(config).values()}
    assert phrases == {"Use BRAINTRUST_APP_URL=https://127.0.0.1:8080"}
