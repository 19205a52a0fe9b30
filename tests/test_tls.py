"""HTTPS on ``listen_tls`` (``tls.cert_file``/``tls.key_file``) beside plain HTTP on
``listen``: real certificates made here, a real gateway process, real TLS handshakes; SIGHUP
swaps the certificate for new connections."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import APPID, SECRET, SIGNING_KEY, Upstream, base_config, fresh
from gateway import loader
from gateway.errors import ConfigError
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import Client, GatewayProcess, Launch

RELOADED = "configuration reloaded"


def self_signed(directory: Path, name: str, *, password: bytes | None = None
                ) -> tuple[str, str, str]:
    """A certificate for 127.0.0.1 and its key as PEM files; and its SHA-256 fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"wx-gateway {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    return str(cert_file), str(key_file), cert.fingerprint(hashes.SHA256()).hex()


async def served_fingerprint(port: int) -> str:
    """The SHA-256 fingerprint of the certificate a new connection to ``port`` is served."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # whatever it serves: the fingerprint is the check
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return hashlib.sha256(ssl_object.getpeercert(binary_form=True)).hexdigest()
    finally:
        writer.close()


def trusting(cert_file: str) -> aiohttp.ClientSession:
    """A client that trusts only ``cert_file`` and verifies the name 127.0.0.1 against it."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=ssl.create_default_context(cafile=cert_file)))


@pytest.fixture
def tls_config(redis_server: EmbeddedRedis, wechat: Any, upstream: Upstream,
               tmp_path: Path) -> dict[str, Any]:
    data = base_config(redis_server.url, f"wxgw-tls-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat.port}", upstream.url)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["listen_tls"] = f"127.0.0.1:{free_port()}"
    cert, key, _ = self_signed(tmp_path, "first")
    data["tls"] = {"cert_file": cert, "key_file": key}
    return data


def https_port(config: dict[str, Any]) -> int:
    return int(config["listen_tls"].rpartition(":")[2])


async def healthy_https(gw: GatewayProcess, http: aiohttp.ClientSession,
                        config: dict[str, Any]) -> Client:
    client = Client(f"https://127.0.0.1:{https_port(config)}", http)
    await client.wait_healthy(gw)
    return client


async def test_https_login_and_proxied_call_with_a_verified_certificate(
        launch: Launch, tls_config: dict[str, Any], upstream: Upstream) -> None:
    gw = await launch(tls_config)
    async with trusting(tls_config["tls"]["cert_file"]) as http:
        client = await healthy_https(gw, http, tls_config)
        token = (await client.login(fresh())).json()["token"]
        await client.call("GET", "/api/orders", token=token, expect=200)
    assert upstream.last.header("X-Forwarded-Proto") == ["https"]
    await gw.wait_for_line(lambda line: "listening on" in line and "HTTPS" in line)
    # Plain HTTP on the HTTPS port gets no answer from the application.
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{https_port(tls_config)}/healthz",
                                 timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
    # A client that does not trust the certificate refuses it.
    async with aiohttp.ClientSession() as strict:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await strict.get(f"https://127.0.0.1:{https_port(tls_config)}/healthz")
    # Garbage instead of a ClientHello, and a connection closed mid-handshake: dropped quietly.
    for junk in (b"\x16\x03\x01\x00\x05hello" + bytes(range(256)), b"\x16\x03"):
        reader, writer = await asyncio.open_connection("127.0.0.1", https_port(tls_config))
        writer.write(junk)
        await writer.drain()
        if len(junk) > 2:  # the gateway answers with an alert at most, and closes
            assert len(await asyncio.wait_for(reader.read(), 5)) < 64
        writer.close()
    async with trusting(tls_config["tls"]["cert_file"]) as http:
        await Client(f"https://127.0.0.1:{https_port(tls_config)}", http).call(
            "GET", "/healthz", expect=200)
    # listen stays plain HTTP beside it: health checks and in-cluster callers.
    async with aiohttp.ClientSession() as plain:
        async with plain.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
    gw.assert_no_internal_failure()


async def test_sighup_serves_the_new_certificate_to_new_connections(
        launch: Launch, tls_config: dict[str, Any], tmp_path: Path) -> None:
    _, _, first = self_signed(tmp_path, "first-again")  # another key: never served
    gw = await launch(tls_config)
    original = tls_config["tls"]["cert_file"]
    async with trusting(original) as http:
        await healthy_https(gw, http, tls_config)
    before = await served_fingerprint(https_port(tls_config))
    assert before != first
    cert, key, second = self_signed(tmp_path, "second")
    mark = gw.mark()
    gw.rewrite({**tls_config, "tls": {"cert_file": cert, "key_file": key}})
    gw.hup()
    await gw.wait_for_line(lambda line: RELOADED in line, after=mark)
    assert await served_fingerprint(https_port(tls_config)) == second != before
    async with trusting(cert) as http:
        client = Client(f"https://127.0.0.1:{https_port(tls_config)}", http)
        await client.call("GET", "/healthz", expect=200)

    # The same paths rewritten in place (how cert-manager and certbot renew): reloaded too.
    third_cert, third_key, third = self_signed(tmp_path, "third")
    Path(cert).write_bytes(Path(third_cert).read_bytes())
    Path(key).write_bytes(Path(third_key).read_bytes())
    mark = gw.mark()
    gw.hup()
    await gw.wait_for_line(lambda line: RELOADED in line, after=mark)
    assert await served_fingerprint(https_port(tls_config)) == third


async def test_a_broken_pair_on_sighup_is_refused_and_the_old_certificate_stays(
        launch: Launch, tls_config: dict[str, Any], tmp_path: Path) -> None:
    gw = await launch(tls_config)
    async with trusting(tls_config["tls"]["cert_file"]) as http:
        await healthy_https(gw, http, tls_config)
    before = await served_fingerprint(https_port(tls_config))
    other_cert, _, _ = self_signed(tmp_path, "other")
    mark = gw.mark()
    gw.rewrite({**tls_config, "tls": {**tls_config["tls"], "cert_file": other_cert}})
    gw.hup()
    lines = await gw.wait_for_line(lambda line: "reload refused" in line, after=mark,
                                   count=2)
    assert any("tls.cert_file" in line for line in lines), lines
    assert await served_fingerprint(https_port(tls_config)) == before


async def test_turning_tls_on_takes_a_restart_and_the_listener_stays_plain(
        launch: Launch, tls_config: dict[str, Any]) -> None:
    plain = {k: v for k, v in tls_config.items() if k not in ("tls", "listen_tls")}
    gw = await launch(plain)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        mark = gw.mark()
        gw.rewrite(tls_config)
        gw.hup()
        await gw.wait_for_line(lambda line: RELOADED in line, after=mark)
        await gw.wait_for_line(lambda line: "only after a restart" in line, after=mark)
        async with http.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):  # nothing listens there yet
            await http.get(f"https://127.0.0.1:{https_port(tls_config)}/healthz", ssl=False)


def _problems(tls: dict[str, str]) -> list[str]:
    data = {"redis": {"url": "redis://127.0.0.1:6379/0"},
            "apps": [{"appid": APPID, "secret": SECRET}],
            "session": {"signing_keys": [SIGNING_KEY]}, "tls": tls,
            "listen_tls": "127.0.0.1:8443"}
    with pytest.raises(ConfigError) as info:
        loader.parse(data, environ={})
    return info.value.problems


def test_config_errors_name_the_tls_key(tmp_path: Path) -> None:
    cert, key, _ = self_signed(tmp_path, "a")
    other_cert, _, _ = self_signed(tmp_path, "b")
    _, locked_key, _ = self_signed(tmp_path, "locked", password=b"secret")
    assert _problems({"cert_file": cert}) == [
        "tls.key_file: is required when tls.cert_file is set (both or neither)"]
    assert _problems({"key_file": key})[0].startswith("tls.cert_file: is required")
    missing = _problems({"cert_file": str(tmp_path / "nope.crt"), "key_file": key})
    assert missing[0].startswith("tls.cert_file: cannot read") and "nope.crt" in missing[0]
    mismatched = _problems({"cert_file": other_cert, "key_file": key})
    assert mismatched[0].startswith("tls.cert_file: ") and "private key" in mismatched[0]
    # An encrypted key fails at once (no password prompt on the terminal).
    assert _problems({"cert_file": cert, "key_file": locked_key})[0].startswith("tls.cert_file: ")
    assert _problems({"cert_file": key, "key_file": key})[0].startswith("tls.cert_file: ")
    assert _problems({"cert_file": cert, "key_file": key, "ciphers": "x"}) != []
    base = {"redis": {"url": "redis://127.0.0.1:6379/0"},
            "apps": [{"appid": APPID, "secret": SECRET}],
            "session": {"signing_keys": [SIGNING_KEY]}}
    config = loader.parse({**base, "listen_tls": "127.0.0.1:8443",
                           "tls": {"cert_file": cert, "key_file": key}}, environ={})
    assert config.tls.enabled and key not in repr(config)
    assert config.listen_tls == ("127.0.0.1", 8443)
    # Each needs the other, and the HTTPS listener is not the plain one.
    with pytest.raises(ConfigError) as info:
        loader.parse({**base, "tls": {"cert_file": cert, "key_file": key}}, environ={})
    assert info.value.problems[0].startswith("listen_tls: is required when tls.cert_file")
    with pytest.raises(ConfigError) as info:
        loader.parse({**base, "listen_tls": "127.0.0.1:8443"}, environ={})
    assert info.value.problems == [
        "tls.cert_file: is required when listen_tls is set (with tls.key_file)"]
    with pytest.raises(ConfigError) as info:
        loader.parse({**base, "listen": "127.0.0.1:8443", "listen_tls": "127.0.0.1:8443",
                      "tls": {"cert_file": cert, "key_file": key}}, environ={})
    assert info.value.problems == ["listen_tls: must not be the plain HTTP listen address"]


async def test_every_worker_serves_https_and_reloads_the_certificate(
        launch: Launch, tls_config: dict[str, Any], tmp_path: Path) -> None:
    gw = await launch({**tls_config, "workers": 2})
    async with trusting(tls_config["tls"]["cert_file"]) as http:
        await healthy_https(gw, http, tls_config)
    await gw.wait_for_line(lambda line: "listening on" in line and "HTTPS" in line, count=2)
    cert, key, renewed = self_signed(tmp_path, "renewed")
    mark = gw.mark()
    gw.rewrite({**tls_config, "workers": 2, "tls": {"cert_file": cert, "key_file": key}})
    gw.hup()  # to the supervisor, which forwards it to each worker
    await gw.wait_for_line(lambda line: RELOADED in line, after=mark, count=2)
    # New connections land on either worker (SO_REUSEPORT): each serves the new certificate.
    assert {await served_fingerprint(https_port(tls_config)) for _ in range(12)} == {renewed}
