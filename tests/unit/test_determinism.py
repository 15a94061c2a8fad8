"""apply_determinism / determinism: what they set, record and restore; where torch's determinism errors are handled."""

import os
import random

import numpy as np
import pytest
import torch

from lowbit.config import DeterminismParams
from lowbit.errors import LowbitError
from lowbit.hardware import Capabilities
from lowbit.train import apply_determinism, determinism, int8_inference_allowed, nondeterministic_ops_named

CPU = Capabilities(cpu_capability="AVX2", cpu_flags=frozenset({"avx2"}), cores=2)
GPU = Capabilities(cuda=True, cuda_bf16=True, cpu_capability="AVX2", cpu_flags=frozenset({"avx2"}), cores=2)


@pytest.fixture(autouse=True)
def restore_torch(monkeypatch):
    """These tests change process-wide torch settings: put them back for the tests that follow."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_enabled_sets_strict_deterministic_mode_the_threads_and_the_seed():
    other = 2 if torch.get_num_threads() == 1 else 1  # a count that differs from the current one
    applied = apply_determinism(DeterminismParams(enabled=True, num_threads=other), seed=7, caps=CPU)
    assert applied == {"deterministic": 1, "torch_threads": other}
    assert torch.get_num_threads() == other
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    first = draws()
    apply_determinism(DeterminismParams(enabled=True, num_threads=other), seed=7, caps=CPU)
    assert draws() == first  # python, numpy and torch all start again from the seed
    apply_determinism(DeterminismParams(enabled=True, num_threads=other), seed=8, caps=CPU)
    assert draws() != first
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # a CPU needs no cuBLAS setting


def test_disabled_leaves_torch_free_and_zero_threads_keeps_the_default():
    default = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)  # an earlier stage in this process left it on
    applied = apply_determinism(DeterminismParams(enabled=False, num_threads=0), seed=0, caps=CPU)
    assert applied == {"deterministic": 0, "torch_threads": default}
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_block_form_puts_torch_back_as_it_was_for_in_process_callers():
    default = torch.get_num_threads()
    other = 2 if default == 1 else 1
    with determinism(DeterminismParams(enabled=True, num_threads=other), seed=0, caps=CPU) as applied:
        assert applied == {"deterministic": 1, "torch_threads": other}
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == other
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == default
    with pytest.raises(ValueError), determinism(DeterminismParams(enabled=True, num_threads=other), seed=0, caps=CPU):
        raise ValueError("a stage that fails")
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == default


def test_on_cuda_the_cublas_workspace_is_set_unless_the_user_chose_one(monkeypatch):
    apply_determinism(DeterminismParams(enabled=True, num_threads=0), seed=0, caps=GPU)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    apply_determinism(DeterminismParams(enabled=True, num_threads=0), seed=0, caps=GPU)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def int8_linear() -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.quantize_per_tensor(torch.randn(8, 16), 0.05, 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(weight, torch.randn(8))
    x = torch.quantize_per_tensor(torch.randn(4, 16), 0.05, 64, torch.quint8)
    return torch.ops.quantized.linear(x, packed, 0.1, 64).int_repr()


def test_int8_kernels_run_inside_the_allowance_with_the_same_result_and_strict_mode_returns_after():
    expected = int8_linear()  # determinism off
    apply_determinism(DeterminismParams(enabled=True, num_threads=0), seed=0, caps=CPU)
    with pytest.raises(RuntimeError, match="quantized_resize_cpu_"):
        int8_linear()
    with int8_inference_allowed():
        assert torch.equal(int8_linear(), expected)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.raises(RuntimeError, match="quantized_resize_cpu_"):
        int8_linear()


def test_an_op_without_a_deterministic_algorithm_names_the_params_key():
    apply_determinism(DeterminismParams(enabled=True, num_threads=0), seed=0, caps=CPU)
    target = torch.zeros(4)
    with pytest.raises(LowbitError, match=r"put_ has no deterministic implementation .* set determinism.enabled: false"):
        with nondeterministic_ops_named():
            target.put_(torch.tensor([1]), torch.tensor([2.0]))  # put_ without accumulate: torch has no deterministic one
    with pytest.raises(RuntimeError, match="other error"), nondeterministic_ops_named():
        raise RuntimeError("other error")  # anything else passes through unchanged
