"""Promotion against `mlflow server --app-name basic-auth`: a user who may only read the registered
model gets an error that says who, on what, which permission and what to change, and nothing is
registered, tagged or moved; a wrong password is named as such. The pipeline runs are recorded
as flows/pipeline.py records them, from tiny real models (tests/integration/test_promotion.py):
the registry does not need a whole pipeline."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from mlflow import MlflowClient

from tests.integration.test_promotion import project, record_run, review_frame, save_variant
from tests.servers.conftest import ADMIN, client_env, lowbit

pytestmark = pytest.mark.servers
MODEL = "lowbit-classifier"
READER = ("reader", "reader-password-1234")


@contextlib.contextmanager
def as_user(url: str, user: tuple[str, str]):
    """This process talks to `url` as `user` (MLflow reads these variables on every request)."""
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user[0],
                                      "MLFLOW_TRACKING_PASSWORD": user[1]}):
        yield MlflowClient(url)


def user_env(tmp, url: str, prefect_api: str, user: tuple[str, str]) -> dict[str, str]:
    return client_env(tmp, PREFECT_API_URL=prefect_api, MLFLOW_TRACKING_URI=url,
                      MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])


def registry_state(url: str) -> dict:
    """What a promotion could change, read as the admin."""
    with as_user(url, ADMIN) as client:
        model = client.get_registered_model(MODEL)
        history = client.get_experiment_by_name("lowbit-registry")
        experiment = client.get_experiment_by_name("lowbit")
        return {"versions": sorted(int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")),
                "aliases": dict(model.aliases), "description": model.description, "tags": dict(model.tags),
                "alias moves": len(client.search_runs([history.experiment_id])),
                "logged models": len(client.search_logged_models(experiment_ids=[experiment.experiment_id]))}


@pytest.fixture(scope="module")
def promoted_once(tmp_path_factory, mlflow_auth_server, prefect_server):
    """The admin records a run and promotes it (v1 @champion), records a second run whose smaller
    model would win, and creates a user with READ on the registered model."""
    tmp = tmp_path_factory.mktemp("auth")
    url = mlflow_auth_server.url
    root = project(tmp, **{"promote.objective": "weight_bytes",
                           "tracking.artifact_location": "mlflow-artifacts:/lowbit"})  # artifacts through the server
    frame = review_frame(45)
    with as_user(url, ADMIN):
        record_run(root, {"fp32": save_variant(root, "fp32-a", 0, 32, torch.float32),
                          "half_bf16": save_variant(root, "half_bf16-a", 0, 32, torch.bfloat16)}, frame)
    status, out, err, _ = lowbit(root, "promote", env=user_env(tmp, url, prefect_server.api_url, ADMIN), timeout=300)
    assert status == 0 and "is now lowbit-classifier@champion" in out, f"{out[-2000:]}\n{err[-4000:]}"
    with as_user(url, ADMIN):
        second = record_run(root, {"fp32": save_variant(root, "fp32-b", 1, 16, torch.float32),
                                   "half_bf16": save_variant(root, "half_bf16-b", 1, 16, torch.bfloat16)}, frame)
        from mlflow.server import get_app_client

        users = get_app_client("basic-auth", tracking_uri=url)
        users.create_user(*READER)
        users.grant_user_permission(READER[0], "registered_model", MODEL, "READ")
    return root, second, tmp


def test_a_read_only_user_is_told_what_to_change_and_nothing_is_registered(promoted_once, mlflow_auth_server,
                                                                            prefect_server):
    root, second, tmp = promoted_once
    url = mlflow_auth_server.url
    before = registry_state(url)
    assert before["versions"] == [1] and before["aliases"] == {"champion": "1"}

    status, out, err, seconds = lowbit(root, "promote", env=user_env(tmp, url, prefect_server.api_url, READER),
                                       timeout=300)
    assert status == 2, f"{out[-2000:]}\n{err[-4000:]}"
    expected = (f"lowbit: error: MLflow user 'reader' (MLFLOW_TRACKING_USERNAME) may not change registered model "
                f"'{MODEL}' (promote.registered_model) on the MLflow server {url}: promotion needs EDIT or MANAGE on it "
                "to register a version and move its aliases. An MLflow admin can grant it (")
    assert expected in err, err[-4000:]
    assert ("or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user who has it. "
            "Nothing was registered and no alias moved") in err
    print(f"\nlowbit promote as a READ-only user: exit 2 after {seconds:.0f} s:\n{error_line(err)}")

    assert registry_state(url) == before  # no version, no alias move, no logged model, no tag
    with as_user(url, ADMIN) as client:
        assert "lowbit.promotion" not in client.get_run(second).data.tags


def test_a_wrong_password_names_the_user_and_the_variables(promoted_once, mlflow_auth_server, prefect_server):
    root, _, tmp = promoted_once
    url = mlflow_auth_server.url
    before = registry_state(url)
    env = user_env(tmp, url, prefect_server.api_url, (READER[0], "not-the-password"))
    status, out, err, seconds = lowbit(root, "promote", env=env, timeout=300)
    assert status == 2, f"{out[-2000:]}\n{err[-4000:]}"
    assert f"lowbit: error: the MLflow server at {url} refused lowbit's request as user 'reader' (MLFLOW_TRACKING_USERNAME): " in err
    assert "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to credentials it accepts" in err
    assert "nothing was registered" in err
    assert seconds < 120  # an answer, not retried: the time is the process and Prefect starting
    print(f"\nlowbit promote with a wrong password: exit 2 after {seconds:.0f} s:\n{error_line(err)}")
    assert registry_state(url) == before


def error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("lowbit: error:"))


def test_a_pipeline_run_with_a_wrong_password_stops_before_any_stage(promoted_once, mlflow_auth_server, prefect_server):
    root, _, tmp = promoted_once
    url = mlflow_auth_server.url
    before = sorted(path.name for path in root.iterdir())
    env = user_env(tmp, url, prefect_server.api_url, (READER[0], "not-the-password"))
    status, out, err, seconds = lowbit(root, "run", env=env, timeout=300)
    assert status == 2, f"{out[-2000:]}\n{err[-4000:]}"
    assert f"lowbit: error: the MLflow server at {url} refused lowbit's request as user 'reader' (MLFLOW_TRACKING_USERNAME)" in err
    assert "prepare" not in out and sorted(path.name for path in root.iterdir()) == before  # no stage ran, nothing written
    print(f"\nlowbit run with a wrong password: exit 2 after {seconds:.0f} s:\n{error_line(err)}")
