"""A gateway other machines can reach (keys, or `[auth] open = true` on purpose) and TLS for it.

Refusals are checked before anything starts: in-process (`Fleet`), through `fleet launch` and
`fleet check`. Fleets that start use fake engines; TLS certificates are made by the `openssl`
command line, and clients connect through 127.0.0.1 even where the gateway binds "0.0.0.0".
"""

from __future__ import annotations

import io
import os
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from fleets import ROOT, FakeFleets, fake_config, fake_launcher_command, fleet_toml, free_port, wait_until
from rich.console import Console

from fleet.config.load import parse_config
from fleet.errors import ConfigError
from fleet.gateway.auth import check_exposure
from fleet.wire.client import is_loopback, pinned_tls_context, url_of

FLEET = str(ROOT / ".venv/bin/fleet")
LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
EXPOSED = ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.7", "fe80::1", "gateway.example.com"]


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """[auth] keys_env defaults to FLEET_API_KEYS: a key there would let every refused case start."""
    monkeypatch.delenv("FLEET_API_KEYS", raising=False)


def make_cert(folder: Path, cn: str, san: str) -> tuple[str, str]:
    """A self-signed certificate and its unencrypted key, as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def local_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1."""
    return make_cert(tmp_path_factory.mktemp("tls") / "local", "localhost", "DNS:localhost,IP:127.0.0.1")


@pytest.fixture(scope="module")
def public_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate for the machine's public name only: 127.0.0.1 is not in it."""
    return make_cert(tmp_path_factory.mktemp("tls") / "public", "gateway.example.com", "DNS:gateway.example.com")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def complete(port: int, key: str | None = None, scheme: str = "http", **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{scheme}://127.0.0.1:{port}/v1/completions", headers=headers, timeout=20,
                      json={"model": "m", "prompt": "hi", "max_tokens": 2}, **kw)


# --- the rule -----------------------------------------------------------------------------------


def test_only_loopback_addresses_may_listen_without_keys() -> None:
    for host in LOOPBACK:
        assert is_loopback(host), host
        assert check_exposure(host, False, False) is None
    for host in EXPOSED:
        assert not is_loopback(host), host
        assert check_exposure(host, True, False) is None  # keys: fine anywhere
        with pytest.raises(ConfigError) as refused:
            check_exposure(host, False, False)
        message = str(refused.value)
        assert f'"{host}"' in message and "[auth] keys" in message and "keys_file" in message
        assert "[auth] open = true" in message
        warning = check_exposure(host, False, True)
        assert warning is not None and f'"{host}"' in warning and "open to the network without API keys" in warning


def test_url_of_a_tls_gateway_is_https() -> None:
    assert url_of("0.0.0.0", 8443, tls=True) == "https://127.0.0.1:8443"
    assert url_of("::", 8443, tls=True) == "https://[::1]:8443"
    assert url_of("127.0.0.1", 8000) == "http://127.0.0.1:8000"


# --- in-process fleets --------------------------------------------------------------------------


def test_exposed_gateway_without_keys_is_refused_before_anything_starts(cache_dir: Path) -> None:
    from fake_engine import fake_command

    from fleet.run.launcher import Fleet

    config = fake_config({"name": "m"}, gateway={"host": "0.0.0.0"})
    with pytest.raises(ConfigError) as refused:
        Fleet(config, command=fake_command, console=Console(file=io.StringIO()), echo_logs=False)
    message = str(refused.value)
    assert '"0.0.0.0"' in message and "[auth] keys" in message and "[auth] open = true" in message
    assert not listening(config.gateway.port) and not listening(config.models[0].port)


def test_exposed_gateway_with_keys_starts(fake_fleet: FakeFleets, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fake_fleet({"name": "m"}, gateway={"host": "0.0.0.0"}, auth={"keys": ["sk-file"]})
    port = f.config.gateway.port
    assert complete(port, "sk-file").status_code == 200
    assert complete(port).status_code == 401
    # keys from the environment alone count too: the rule looks at the keys loaded, not the file
    monkeypatch.setenv("FLEET_API_KEYS", "sk-env")
    g = fake_fleet({"name": "m"}, gateway={"host": "0.0.0.0"})
    assert complete(g.config.gateway.port, "sk-env").status_code == 200


REBOUND = "rebound.example.com"  # a site's name, made to resolve to 127.0.0.1: its page's requests are same-origin


def named(url: str, path: str, host: str, method: str = "GET", **kw: Any) -> httpx.Response:
    return httpx.request(method, url + path, headers={"host": host, **kw.pop("headers", {})}, timeout=10, **kw)


def test_an_open_loopback_gateway_answers_only_requests_that_name_it_by_address_or_localhost(
        fake_fleet: FakeFleets) -> None:
    """DNS rebinding: a page in a browser on this machine, its site's name resolving to 127.0.0.1,
    sends same-origin requests whose Host is that name. Refused on every route that serves or acts;
    an IP address, localhost or a name of [gateway] allowed_hosts passes."""
    f = fake_fleet({"name": "m"}, gateway={"allowed_hosts": ["LLM.internal."]})
    port = f.config.gateway.port
    body = {"model": "m", "prompt": "a b", "max_tokens": 2}
    for method, path, kw in [("POST", "/v1/completions", {"json": body}), ("GET", "/v1/models", {}),
                             ("GET", "/v1/responses/resp_x", {}), ("GET", "/ui", {}), ("GET", "/ui/events", {}),
                             ("GET", "/fleet/status", {}), ("POST", "/fleet/stop", {})]:
        r = named(f.url, path, f"{REBOUND}:{port}", method, **kw)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (path, r.text)
        assert REBOUND in r.json()["error"]["message"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"llm.internal:{port}",
                 f"LocalHost.:{port}", f"app.localhost:{port}", f"10.1.2.3:{port}"):
        r = named(f.url, "/v1/completions", host, "POST", json=body)
        assert r.status_code == 200, (host, r.text)
    assert named(f.url, "/fleet/status", f"localhost:{port}").status_code == 200
    assert named(f.url, "/health", f"{REBOUND}:{port}").status_code == 200  # says nothing a page could use


def test_with_keys_the_key_is_the_gate_and_control_still_checks_the_host(fake_fleet: FakeFleets) -> None:
    f = fake_fleet({"name": "m"}, auth={"keys": ["sk-1"]})
    port, auth = f.config.gateway.port, {"authorization": "Bearer sk-1"}
    r = named(f.url, "/v1/completions", f"api.example.com:{port}", "POST", headers=auth,
              json={"model": "m", "prompt": "a b", "max_tokens": 2})
    assert r.status_code == 200, r.text  # a proxy's public name: keys guard this gateway
    r = named(f.url, "/fleet/status", f"{REBOUND}:{port}", headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"


def test_open_true_starts_without_keys_and_says_so(fake_fleet: FakeFleets) -> None:
    out = io.StringIO()
    f = fake_fleet({"name": "m"}, gateway={"host": "0.0.0.0"}, auth={"open": True},
                   console=Console(file=out, width=400))
    assert complete(f.config.gateway.port).status_code == 200
    assert 'warning: the gateway on "0.0.0.0" is open to the network without API keys' in out.getvalue()


# --- the CLI refuses the same, before anything starts -------------------------------------------


def cli_fleet_file(tmp_path: Path, **auth: Any) -> Path:
    """A loopback fleet file with one model whose source passes `fleet check` (a local folder)."""
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    text = fleet_toml([{"name": "m", "source": str(source), "port": free_port()}], free_port())
    if auth:
        text += "\n[auth]\n" + "".join(f"{k} = {str(v).lower()}\n" for k, v in auth.items())
    (path := tmp_path / "fleet.toml").write_text(text)
    return path


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k not in ("FLEET_API_KEYS", "FLEET_API_KEY")}
    return subprocess.run([FLEET, *args], capture_output=True, text=True, timeout=120,
                          env={**inherited, "FLEET_LOG_DIR": str(tmp_path / "logs"), **env})


def test_fleet_launch_and_check_refuse_an_exposed_gateway_without_keys(tmp_path: Path) -> None:
    path = cli_fleet_file(tmp_path)
    launch = run_cli(tmp_path, "launch", "--config", str(path), "--host", "0.0.0.0")
    assert launch.returncode == 2, launch.stderr
    assert '"0.0.0.0"' in launch.stderr and "[auth] keys" in launch.stderr and "[auth] open = true" in launch.stderr
    assert "listening" not in launch.stdout + launch.stderr and not (tmp_path / "logs").exists()  # no engine ran
    check = run_cli(tmp_path, "check", "--config", str(path))
    assert check.returncode == 0, check.stderr  # the file itself listens on 127.0.0.1
    path.write_text(path.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"', 1))
    check = run_cli(tmp_path, "check", "--config", str(path))
    assert check.returncode == 2 and '"0.0.0.0"' in check.stderr and "[auth] open = true" in check.stderr


def test_fleet_check_warns_about_an_open_gateway(tmp_path: Path) -> None:
    path = cli_fleet_file(tmp_path, open=True)
    path.write_text(path.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"', 1))
    check = run_cli(tmp_path, "check", "--config", str(path))
    assert check.returncode == 0, check.stderr
    assert "warning: the gateway on \"0.0.0.0\" is open to the network without API keys" in check.stderr


# --- TLS ----------------------------------------------------------------------------------------


def trusting(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def test_openai_sdk_over_tls_and_plain_http_fails(fake_fleet: FakeFleets, local_cert: tuple[str, str]) -> None:
    cert, key = local_cert
    f = fake_fleet({"name": "m"}, gateway={"tls_certfile": cert, "tls_keyfile": key})
    port = f.config.gateway.port
    with httpx.Client(verify=trusting(cert)) as http, openai.OpenAI(
        base_url=f"https://127.0.0.1:{port}/v1", api_key="x", http_client=http, max_retries=0
    ) as client:
        answer = client.completions.create(model="m", prompt="hi", max_tokens=3)
        assert answer.choices[0].text == " w0 w1 w2"
    with pytest.raises(httpx.HTTPError):
        complete(port)  # plain HTTP to the TLS port
    assert complete(port, scheme="https", verify=trusting(cert)).status_code == 200  # the gateway is still fine


def test_the_cli_trusts_only_the_configured_certificate(
    fake_fleet: FakeFleets, public_cert: tuple[str, str], local_cert: tuple[str, str]
) -> None:
    cert, key = public_cert
    f = fake_fleet({"name": "m"}, gateway={"tls_certfile": cert, "tls_keyfile": key})
    url = url_of("127.0.0.1", f.config.gateway.port, tls=True) + "/health"
    # a certificate for another name, reached on loopback: the CLI's pinned context takes it
    assert httpx.get(url, verify=pinned_tls_context(cert, "127.0.0.1"), timeout=10).status_code == 200
    with pytest.raises(httpx.ConnectError, match="IP address mismatch"):
        httpx.get(url, verify=trusting(cert), timeout=10)  # an ordinary client checks the name
    with pytest.raises(httpx.ConnectError, match=r"(?i)certificate verify failed"):
        httpx.get(url, verify=pinned_tls_context(local_cert[0], "127.0.0.1"), timeout=10)  # another certificate
    assert pinned_tls_context(cert, "10.1.2.3").check_hostname  # the name is checked off loopback
    assert pinned_tls_context(cert, "127.0.0.1").check_hostname is False


def test_fleet_status_and_stop_over_tls_with_the_fleet_files_own_admin_key(
        tmp_path: Path, public_cert: tuple[str, str]) -> None:
    """The control commands verify the gateway's certificate and present a key that may use every
    model, read from the same fleet file ($FLEET_API_KEY overrides it)."""
    cert, key = public_cert
    port = free_port()
    config = tmp_path / "fleet.toml"
    config.write_text(fleet_toml([{"name": "one", "source": "fake", "port": free_port()}], port).replace(
        "[gateway]\n", f'[gateway]\ntls_certfile = "{cert}"\ntls_keyfile = "{key}"\n', 1)
        + '\n[auth]\nkeys = ["admin-key", { key = "one-only", models = ["one"] }]\n')
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(fake_launcher_command(tmp_path, config), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "FLEET_LOG_DIR": str(tmp_path / "logs")})
    verify = pinned_tls_context(cert, "127.0.0.1")

    def ready() -> bool:
        try:
            return httpx.get(f"https://127.0.0.1:{port}/health", verify=verify, timeout=1).json()["models"] == {
                "one": "ready"}
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, "the TLS fleet is ready")
        assert f"listening on https://127.0.0.1:{port}/v1" in log.read_text()
        status = run_cli(tmp_path, "status", "--config", str(config))
        assert status.returncode == 0 and "one" in status.stdout and "ready" in status.stdout, status.stderr
        limited = run_cli(tmp_path, "status", "--config", str(config), FLEET_API_KEY="one-only")
        assert limited.returncode == 1 and "needs a key that may use every model" in limited.stderr, limited.stderr
        engines = psutil.Process(proc.pid).children(recursive=True)
        stop = run_cli(tmp_path, "stop", "--config", str(config))
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(30) == 0
        assert psutil.wait_procs(engines, timeout=10)[1] == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        for p in psutil.Process().children(recursive=True):
            p.kill()


# --- TLS configuration errors -------------------------------------------------------------------


def test_tls_files_both_or_neither_and_they_must_exist(local_cert: tuple[str, str], public_cert: tuple[str, str],
                                                      tmp_path: Path) -> None:
    cert, key = local_cert
    for given, missing in (("tls_certfile", "tls_keyfile"), ("tls_keyfile", "tls_certfile")):
        with pytest.raises(ConfigError) as e:
            parse_config({"gateway": {given: cert if given == "tls_certfile" else key}})
        assert f'field "gateway": {given} is set but {missing} is not' in str(e.value)
    with pytest.raises(ConfigError, match=r'field "gateway.tls_certfile": file not found: /no/cert.pem'):
        parse_config({"gateway": {"tls_certfile": "/no/cert.pem", "tls_keyfile": key}})
    with pytest.raises(ConfigError, match=r'field "gateway.tls_keyfile": file not found: /no/key.pem'):
        parse_config({"gateway": {"tls_certfile": cert, "tls_keyfile": "/no/key.pem"}})
    with pytest.raises(ConfigError, match=r"tls_certfile .* with tls_keyfile .*key values mismatch"):
        parse_config({"gateway": {"tls_certfile": cert, "tls_keyfile": public_cert[1]}})
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "rsa", "-in", key, "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                   check=True, capture_output=True, timeout=60)
    with pytest.raises(ConfigError, match="unencrypted tls_keyfile"):
        parse_config({"gateway": {"tls_certfile": cert, "tls_keyfile": str(encrypted)}})
    gw = parse_config({"gateway": {"tls_certfile": cert, "tls_keyfile": key}}).gateway
    assert (gw.tls_certfile, gw.tls_keyfile) == (cert, key)
