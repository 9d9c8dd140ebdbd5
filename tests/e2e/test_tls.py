"""End to end: the standalone server's HTTP endpoint as an ``ssl:`` strport, with a throwaway CA.

``gitstratum.testing.tls`` makes the CA and the server certificate; the
server is started with ``--http ssl:PORT:privateKey=...:certKey=...``, and
the real ``git`` clones over HTTPS trusting only that CA (GIT_SSL_CAINFO).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import crypto

from gitstratum.testing.tls import TLSFiles, issue, make_ca, verify, write_tls_files

from .conftest import Server, free_port, git, refs_of
from .hostile import Attack

pytestmark = pytest.mark.e2e


class TLSServer(Server):
    """A standalone server whose HTTP endpoint speaks only TLS."""

    tls: TLSFiles

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def url(self, repo: str, token: str | None = None, user: str = "ci") -> str:
        cred = f"{user}:{token}@" if token else ""
        return f"https://{cred}127.0.0.1:{self.port}/{repo}.git"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict, bytes]:
        """One HTTPS request that trusts only the test CA (and checks the certificate's address)."""
        context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=context)
        try:
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    base = tmp_path_factory.mktemp("tls-server")
    srv = TLSServer(base / "data", free_port())
    srv.tls = write_tls_files(base / "tls")
    srv.data_dir.mkdir()
    srv.start("--http", srv.tls.server_endpoint(srv.port), "--ssh", "none")
    yield srv
    srv.stop()


@pytest.fixture
def trust_test_ca(tls_server: TLSServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """git (GIT_SSL_CAINFO) and OpenSSL clients (SSL_CERT_FILE) trust the test CA, and only it."""
    monkeypatch.setenv("GIT_SSL_CAINFO", str(tls_server.tls.ca_cert))
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.tls.ca_cert))


def small_repo(path: Path) -> Path:
    """A repository with a few commits, two branches and an annotated tag."""
    git("init", "-q", "-b", "main", str(path))
    for i in range(4):
        (path / f"file{i}.txt").write_text(f"line {i}\n" * (200 * (i + 1)))
        (path / "bin.dat").write_bytes(bytes(range(256)) * (i + 1))
        git("add", "-A", cwd=path)
        git("commit", "-q", "-m", f"commit {i}", cwd=path)
        if i == 1:
            git("branch", "older", cwd=path)
    git("tag", "-a", "v1", "-m", "release 1", cwd=path)
    return path


def test_git_clones_over_https_and_the_clone_passes_fsck(
    tls_server: TLSServer, trust_test_ca: None, tmp_path: Path
) -> None:
    """Push and clone over HTTPS with the test CA: every ref arrives, and git fsck --strict passes."""
    token = tls_server.user_with_token("ci")  # the CLI, itself over HTTPS
    tls_server.cli("repo", "create", "acme/tls")
    tls_server.cli("grant", "ci", "acme/tls", "write")
    src = small_repo(tmp_path / "src")
    git("push", tls_server.url("acme/tls", token), "--all", cwd=src)
    git("push", tls_server.url("acme/tls", token), "--tags", cwd=src)
    dst = tmp_path / "clone.git"
    git("clone", "-q", "--mirror", tls_server.url("acme/tls", token), str(dst))
    git("fsck", "--strict", cwd=dst)
    assert refs_of(dst) == refs_of(src)


def test_git_refuses_a_server_it_cannot_verify(
    tls_server: TLSServer, trust_test_ca: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusting another CA, git and the CLI refuse the server's certificate: TLS is really checked,
    and the CLI says so in one line."""
    token = tls_server.user_with_token("ci")
    other = write_tls_files(tmp_path / "other-ca")
    monkeypatch.setenv("GIT_SSL_CAINFO", str(other.ca_cert))
    monkeypatch.setenv("SSL_CERT_FILE", str(other.ca_cert))
    proc = git("ls-remote", tls_server.url("acme/none", token), check=False)
    assert proc.returncode != 0
    assert b"certificate" in proc.stderr.lower() or b"ssl" in proc.stderr.lower()
    cli = tls_server.cli("repo", "list", check=False)
    assert cli.returncode == 1
    err = cli.stderr.decode()
    assert err.startswith(f"gitstratum: error: cannot reach {tls_server.base}: ")
    assert "Traceback" not in err and err.count("\n") == 1


def test_plain_http_to_the_tls_port_is_refused_cleanly(
    tls_server: TLSServer, trust_test_ca: None, tmp_path: Path
) -> None:
    """Plain HTTP to the TLS port gets no HTTP answer and a closed connection, promptly; the server
    stays up and HTTPS clients are unaffected (checked while the plain connection is still open)."""
    token = tls_server.user_with_token("ci")
    tls_server.cli("repo", "create", "acme/bystander", check=False)
    tls_server.cli("grant", "ci", "acme/bystander", "write")
    git("push", tls_server.url("acme/bystander", token), "--all", cwd=small_repo(tmp_path / "b"))
    attack = Attack(tls_server, tls_server.url("acme/bystander", token))
    lingering = socket.create_connection(("127.0.0.1", tls_server.port), timeout=10)
    lingering.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no end of headers yet
    conn = http.client.HTTPConnection("127.0.0.1", tls_server.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/healthz")
        conn.getresponse()
    conn.close()
    plain = git("ls-remote", f"http://127.0.0.1:{tls_server.port}/acme/bystander.git", check=False)
    assert plain.returncode != 0
    attack.check(tmp_path)
    lingering.settimeout(10)
    try:
        answer = lingering.recv(65536)
        # Whatever came back (a TLS alert at most), it is no HTTP response.
        assert not answer.startswith(b"HTTP/")
    except ConnectionError:
        pass
    finally:
        lingering.close()
    assert "Traceback" not in tls_server.log_text()


def test_the_throwaway_certificates(tmp_path: Path) -> None:
    """The CA signs what it issues and nothing else; every file is private (0600, directories 0700)."""
    files = write_tls_files(tmp_path / "tls")
    ca = files.ca_cert.read_bytes()
    verify(ca, files.server_cert.read_bytes())
    verify(ca, files.client_cert.read_bytes())
    stranger = issue(make_ca("another CA"), "stranger")
    with pytest.raises(crypto.X509StoreContextError):
        verify(ca, stranger.cert_pem)
    for path in [files.directory, *files.directory.rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert path.stat().st_mode & 0o777 == expected, path
    assert files.server_endpoint(8443).startswith("ssl:8443:privateKey=")
    with pytest.raises(ValueError):
        issue(make_ca(), "nobody", server=False, client=False)


def test_openssl_accepts_the_server_certificate_for_its_address(tls_server: TLSServer) -> None:
    """openssl s_client, trusting the test CA, verifies the chain and the 127.0.0.1 address."""
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_server.port}"]
        + [
            "-CAfile",
            str(tls_server.tls.ca_cert),
            "-verify_ip",
            "127.0.0.1",
            "-verify_return_error",
        ],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Verify return code: 0 (ok)" in proc.stdout
