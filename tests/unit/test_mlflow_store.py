"""flows/mlflow_store.py against real stand-ins: a missing SQLite file, a closed port, a web server
that is not MLflow and one that answers as MLflow with an error."""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from unittest import mock

import pytest

from flows.mlflow_store import HTTP_LIMITS, open_store
from lowbit.errors import LowbitError


@pytest.fixture(autouse=True)
def environ(monkeypatch):
    """No limits set by the user, and those open_store sets for the process end with the test."""
    for key in ("MLFLOW_TRACKING_URI", *HTTP_LIMITS):
        monkeypatch.delenv(key, raising=False)
    with mock.patch.dict(os.environ):
        yield


@contextmanager
def serving(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path):
    path = tmp_path / "typo" / "mlflow.db"
    with pytest.raises(LowbitError, match=f"no MLflow store at {path} "
                                          r"\(tracking\.uri in params\.yaml or MLFLOW_TRACKING_URI\): run `lowbit run`"):
        open_store(f"sqlite:///{path}")
    assert not path.exists() and not path.parent.exists()


def test_a_closed_port_fails_within_the_limits_naming_the_uri_and_what_to_set():
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(LowbitError) as caught:
        open_store(uri)
    # 3 tries, 0 and 2 s apart plus up to 1 s of jitter each: refused at once, so about 2-4 s
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith(f"the MLflow tracking server at {uri} did not answer (")
    assert "Connection refused; 3 tries of up to 30 s)" in message
    assert "another store with tracking.uri in params.yaml or MLFLOW_TRACKING_URI" in message
    assert {key: os.environ[key] for key in HTTP_LIMITS} == HTTP_LIMITS  # set for the rest of the process


def test_the_users_own_limits_are_kept_and_reported():
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    with pytest.raises(LowbitError, match=r"did not answer \(\[Errno 111\] Connection refused; 1 try of up to 3 s\)"):
        open_store("http://127.0.0.1:9")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"


def test_a_web_server_that_is_not_mlflow_is_named_as_such(tmp_path):
    answers = []

    class Files(http.server.SimpleHTTPRequestHandler):  # Python's file server: a POST is 501 Unsupported method
        def send_response(self, code, message=None):
            answers.append(code)
            super().send_response(code, message)

        def log_message(self, *args):
            pass

    with serving(functools.partial(Files, directory=str(tmp_path))) as uri:
        with pytest.raises(LowbitError) as caught:
            open_store(uri)
    message = str(caught.value)
    assert message.startswith(f"{uri} answered, but not as an MLflow tracking server: API request to endpoint "
                              "/api/2.0/mlflow/experiments/search failed with error code 501")
    assert message.endswith("Set tracking.uri in params.yaml or MLFLOW_TRACKING_URI to the MLflow server")
    assert answers == [501]  # an answer: not retried


def answering(status: int, body: bytes, headers: dict[str, str]) -> type[http.server.BaseHTTPRequestHandler]:
    """A handler that answers every POST with `status`, `headers` and `body`."""

    class Answering(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Answering


def test_an_mlflow_error_answer_is_the_servers_error():
    body = json.dumps({"error_code": "INVALID_STATE", "message": "the database is being migrated"}).encode()
    with serving(answering(409, body, {"Content-Type": "application/json"})) as uri:
        with pytest.raises(LowbitError, match=f"^the MLflow server at {uri} answered with an error: "
                                              "INVALID_STATE: the database is being migrated$"):
            open_store(uri)


def test_refused_credentials_name_the_user_and_the_variables_to_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    body = b"You are not authenticated. Please see the documentation for details."
    with serving(answering(401, body, {"WWW-Authenticate": 'Basic realm="mlflow"'})) as uri:
        with pytest.raises(LowbitError) as caught:
            open_store(uri)
    message = str(caught.value)
    assert message.startswith(f"the MLflow server at {uri} refused lowbit's request as user 'reader' "
                              "(MLFLOW_TRACKING_USERNAME): ")
    assert "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)" in message
