"""Stages forked from the warm stage host do what their dvc.yaml command does (flows/stage_host.py)."""

from __future__ import annotations

import ast
import socket

import pytest
import yaml

from flows.dvc_stages import execute_stage, stage_env
from flows.stage_host import FORKABLE, run_in_host, stage_host
from lowbit.errors import LowbitError
from lowbit.io import read_json
from tasks import STAGES
from tasks.plumbing import Paths
from tests.conftest import REPO, set_params


def test_every_stage_command_is_the_forkable_one():
    """The host runs `stage_main(<stage>, run)` of tasks.<stage>: that must be what `python -m` runs."""
    commands = {name: stage["cmd"] for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}
    assert commands == FORKABLE
    for stage in STAGES:
        tree = ast.parse((REPO / "tasks" / f"{stage}.py").read_text())
        main_block = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert [ast.unparse(node) for node in main_block[0].body] == [f"stage_main('{stage}', run)"], stage


def test_forked_stage_writes_what_the_subprocess_writes_and_fails_the_same_way(tiny_project, tmp_path):
    paths = Paths(tiny_project)
    with stage_host(tiny_project, stage_env()) as address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as broken:  # a caller that dies mid-request
            broken.connect(address)
        assert run_in_host(address, "prepare", tiny_project, stage_env(), print) == 0  # the host went on, and forked it
        forked = read_json(paths.result("prepare"))
        train = (paths.prepared / "train.parquet").read_bytes()

        set_params(paths.params, {"data.source": str(tmp_path / "missing.csv")})
        with pytest.raises(LowbitError) as in_host:
            execute_stage(tiny_project, "prepare", host=address)
    with pytest.raises(LowbitError) as in_subprocess:
        execute_stage(tiny_project, "prepare")
    assert "missing.csv" in str(in_host.value)
    assert str(in_host.value) == str(in_subprocess.value)  # same exit code, same last stderr line

    set_params(paths.params, {"data.source": "builtin:reviews"})
    execute_stage(tiny_project, "prepare")
    assert read_json(paths.result("prepare"))["data_hash"] == forked["data_hash"]
    assert (paths.prepared / "train.parquet").read_bytes() == train
    assert run_in_host(address, "prepare", tiny_project, {}, print) is None  # stopped with the block, socket gone


def test_no_host_at_the_address_means_run_as_a_subprocess(tmp_path):
    assert run_in_host(str(tmp_path / "never-bound"), "prepare", tmp_path, {}, print) is None
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead"))  # a host that bound its socket and exited: the file stays
    dead.close()
    assert run_in_host(str(tmp_path / "dead"), "prepare", tmp_path, {}, print) is None

