"""The gateway's own certificate and key on disk, laid out as a mounted `kubernetes.io/tls` Secret.

The kubelet writes each version of a Secret to a new `..<version>/` directory and swaps the `..data`
symlink to it in one rename; `tls.crt` and `tls.key` are symlinks through `..data`. `write_secret` does
the same, so a rotation in a test is the rotation cert-manager causes in a pod.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509

CERT, KEY = "tls.crt", "tls.key"


def issue(ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate for the gateway on loopback (each call a new serial number)."""
    return ca.issue_cert("127.0.0.1", "localhost")


def write_secret(directory: Path, version: str, cert: bytes, key: bytes) -> None:
    """Write a new version of the Secret and switch to it atomically (`..data` swapped by rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"..{version}"
    data.mkdir()
    (data / CERT).write_bytes(cert)
    (data / KEY).write_bytes(key)
    swap = directory / "..data_tmp"
    swap.symlink_to(data.name)
    os.replace(swap, directory / "..data")
    for name in (CERT, KEY):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def leaf_pems(leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
    """(certificate chain, private key) as PEM bytes."""
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


def tls_config(directory: Path) -> dict[str, Any]:
    """`listen.tls` for the Secret in `directory`."""
    return {"cert_file": str(directory / CERT), "key_file": str(directory / KEY)}


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client that trusts the test CA, as an SDK given REQUESTS_CA_BUNDLE would."""
    return ssl.create_default_context(cafile=str(ca_file))


async def peer_serial(port: int, ca_file: Path) -> int:
    """One new TLS handshake with the gateway: the serial number of the certificate it presented."""
    async with asyncio.timeout(15):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(ca_file), server_hostname="127.0.0.1"
        )
    try:
        peer = writer.get_extra_info("peercert")
        return int(peer["serialNumber"], 16)
    finally:
        writer.close()


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
