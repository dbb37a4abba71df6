"""A small certificate authority with the ``openssl`` command, for the replication link.

The same commands docs/operations.md ("Certificates") shows an operator, run
from Python: the demo makes a throwaway CA and a certificate per host with
them at start, so it shows the default mode (TLS) without any test extras.

    make_ca(DIR, name)                     DIR/NAME.crt, DIR/NAME.key
    make_host_cert(DIR, ca, host, sans)    DIR/HOST.crt, DIR/HOST.key, signed by ca

Keys are EC P-256, unencrypted, mode 0600 (written under a umask of 077, so
they are never readable by others, not even for an instant). Host
certificates carry subjectAltName (DNS names and IP addresses), the subject
CN, ``extendedKeyUsage = serverAuth, clientAuth`` (one certificate serves a
host as sender and as receiver) and ``basicConstraints = CA:FALSE``.
A failing ``openssl`` raises ``ConfigError`` with its message.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xenbind.errors import ConfigError

#: Validity of a CA made here and of the host certificates it signs, in days.
CA_DAYS = 3650
HOST_DAYS = 825
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError("the openssl command is not installed (apt-get install openssl)")
    old = os.umask(0o077)
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)
    if r.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {r.stderr.strip()[-500:]}")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{name!r} is not a host name for a certificate")
    return name


def make_ca(directory: str | Path, name: str = "remus-ca", *, days: int = CA_DAYS) -> CertFiles:
    """A self-signed CA certificate and its key in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _check_name(name)
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(crt),
        "-days",
        str(days),
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    os.chmod(key, 0o600)
    os.chmod(crt, 0o644)  # a certificate is public
    return CertFiles(str(crt), str(key))


def make_host_cert(
    directory: str | Path,
    ca: CertFiles,
    host: str,
    sans: Sequence[str] = (),
    *,
    days: int = HOST_DAYS,
) -> CertFiles:
    """A certificate for ``host`` signed by ``ca``; SAN = host plus ``sans``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _check_name(host)
    alt = []
    for n in [host, *sans]:
        try:
            alt.append(f"IP:{ipaddress.ip_address(n)}")
        except ValueError:
            alt.append(f"DNS:{_check_name(n)}")
    crt, key, csr = d / f"{host}.crt", d / f"{host}.key", d / f"{host}.csr"
    ext = d / f"{host}.ext"
    ext.write_text(
        f"subjectAltName = {','.join(dict.fromkeys(alt))}\n"
        "basicConstraints = critical,CA:FALSE\n"
        "keyUsage = critical,digitalSignature\n"
        "extendedKeyUsage = serverAuth,clientAuth\n"
    )
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={host}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        ca.cert,
        "-CAkey",
        ca.key,
        "-CAcreateserial",
        "-CAserial",
        str(d / "serial.srl"),
        "-out",
        str(crt),
        "-days",
        str(days),
        "-sha256",
        "-extfile",
        str(ext),
    )
    os.chmod(key, 0o600)
    os.chmod(crt, 0o644)
    csr.unlink()
    ext.unlink()
    return CertFiles(str(crt), str(key))
