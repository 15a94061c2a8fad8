"""Every hardware-conditional decision, with each answer injected; QLoRA in every compute dtype on this CPU."""

import platform

import numpy as np
import pytest
import torch

from lowbit import hardware
from lowbit.hardware import (
    Capabilities, bnb_cpu_repack, cpu_flags, determinism_environment, device_map, evaluation_threads, int8_kernel_family,
    nf4_compute_dtype, qlora_compute_dtype, training_mmap_threshold, training_optimizer, training_trims_heap_each_step,
)

AVX2_CPU = Capabilities(cpu_capability="AVX2", cpu_flags=frozenset({"avx2"}), cores=2)
AVX512_BF16_CPU = Capabilities(cpu_capability="AVX512", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}),
                               cpu_bf16_matmul=True, cores=2)
AMX_CPU = Capabilities(cpu_capability="AVX512", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                                     "amx_tile", "amx_bf16", "amx_int8"}),
                       cpu_bf16_matmul=True, cores=8)
CUDA_BF16 = Capabilities(cuda=True, cuda_bf16=True, cpu_capability="AVX2", cpu_flags=frozenset({"avx2"}), cores=16)
CUDA_FP16_ONLY = Capabilities(cuda=True, cuda_bf16=False, cpu_capability="AVX2", cpu_flags=frozenset({"avx2"}), cores=16)
EVERY_MACHINE = [AVX2_CPU, AVX512_BF16_CPU, AMX_CPU, CUDA_BF16, CUDA_FP16_ONLY]


@pytest.mark.parametrize("caps, dtype, reason", [
    (AVX2_CPU, torch.float32, "no native bf16"),
    (AVX512_BF16_CPU, torch.bfloat16, "CPU with native bf16"),
    (AMX_CPU, torch.bfloat16, "CPU with native bf16"),
    (CUDA_BF16, torch.bfloat16, "CUDA device with bf16"),
    (CUDA_FP16_ONLY, torch.float16, "CUDA device without bf16"),
])
def test_auto_4bit_dtype_follows_the_hardware(caps, dtype, reason):
    """QLoRA's `auto` and a loaded ptq_nf4 both compute in what the machine multiplies natively."""
    for chosen, why in (qlora_compute_dtype("auto", caps), nf4_compute_dtype(caps)):
        assert chosen == dtype and reason in why


@pytest.mark.parametrize("caps", EVERY_MACHINE)
@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16"])
def test_an_explicit_qlora_dtype_is_taken_on_every_machine(caps, setting):
    assert qlora_compute_dtype(setting, caps) == (getattr(torch, setting), "set by qlora.compute_dtype")


@pytest.mark.parametrize("caps, optimizer, device", [
    (AVX2_CPU, "AdamW", "cpu"), (AVX512_BF16_CPU, "AdamW", "cpu"), (AMX_CPU, "AdamW", "cpu"),
    (CUDA_BF16, "PagedAdamW8bit", "cuda"), (CUDA_FP16_ONLY, "PagedAdamW8bit", "cuda"),
])
def test_optimizer_and_device_follow_cuda(caps, optimizer, device):
    assert training_optimizer(caps)[0] == optimizer
    assert device_map(caps) == device


@pytest.mark.parametrize("has_kernel, training, dtype, out_features, in_features, allowed", [
    (True, False, torch.bfloat16, 384, 384, True),     # MiniLM's attention projections at inference
    (True, False, torch.bfloat16, 1536, 384, True),
    (True, True, torch.bfloat16, 384, 384, False),     # training: a repacked layer cannot train (the qlora failure)
    (False, False, torch.bfloat16, 384, 384, False),   # AVX2: bitsandbytes has no fused kernel
    (True, False, torch.float32, 384, 384, False),     # the kernel computes in bf16: a float32 layer would not
    (True, False, torch.float16, 384, 384, False),
    (True, False, torch.bfloat16, 32, 32, False),      # narrower than one block of 64: "shape '[32, 0]' is invalid"
    (True, False, torch.bfloat16, 48, 64, False),      # rows not a multiple of 32
    (True, False, torch.bfloat16, 64, 96, False),      # inputs not a multiple of the block size
])
def test_bnb_repacks_only_bf16_layers_for_inference_where_the_layout_fits(has_kernel, training, dtype, out_features,
                                                                          in_features, allowed):
    assert bnb_cpu_repack(has_kernel, training, dtype, out_features, in_features, blocksize=64) is allowed


@pytest.mark.parametrize("caps, family", [
    (AVX2_CPU, "avx2"), (AVX512_BF16_CPU, "vnni"), (AMX_CPU, "amx"),
    (Capabilities(cpu_flags=frozenset({"avx2", "avx_vnni"})), "vnni"), (Capabilities(), "generic"),
])
def test_int8_kernel_family(caps, family):
    assert int8_kernel_family(caps) == family


@pytest.mark.parametrize("setting, caps, threads", [(0, AVX2_CPU, 2), (0, AMX_CPU, 8), (1, AMX_CPU, 1), (4, AVX2_CPU, 4)])
def test_evaluation_threads(setting, caps, threads):
    assert evaluation_threads(setting, caps) == threads


@pytest.mark.parametrize("caps, environment", [
    (AVX2_CPU, {}), (AVX512_BF16_CPU, {}), (AMX_CPU, {}),
    (CUDA_BF16, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}), (CUDA_FP16_ONLY, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}),
])
def test_deterministic_training_fixes_the_cublas_workspace_on_cuda_only(caps, environment):
    assert determinism_environment(True, caps) == environment
    assert determinism_environment(False, caps) == {}  # switched off: nothing set, on any machine


@pytest.mark.parametrize("libc, tunables, threshold", [
    ("glibc", "", 2 * 2**20),
    ("glibc", "glibc.malloc.arena_max=2", 2 * 2**20),        # another tunable: training still sets its threshold
    ("glibc", "glibc.malloc.mmap_threshold=65536", None),    # the user's own threshold is kept
    ("", "", None),                                          # unknown C library: no mallopt to call
    ("musl", "", None),
])
def test_training_mmap_threshold_only_on_glibc_and_only_where_the_user_set_none(libc, tunables, threshold):
    for machine in EVERY_MACHINE:  # the C library decides, not the CPU or the GPU
        caps = Capabilities(**{**machine.__dict__, "libc": libc})
        assert training_mmap_threshold(caps, tunables) == threshold


def test_cpu_flags_are_read_from_cpuinfo():
    text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni sha_ni\n"
    assert cpu_flags(text) == {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert cpu_flags("no flags here") == frozenset()


def test_detect_agrees_with_torch_on_this_machine():
    caps = hardware.detect()
    assert caps.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert caps.cuda == torch.cuda.is_available()
    assert caps.cores == torch.get_num_threads()
    assert caps.libc == platform.libc_ver()[0] and caps.describe()["libc"] == caps.libc
    assert caps.describe()["int8_kernels"] == int8_kernel_family(caps)


# QLoRA end to end in each compute dtype, on a model whose layers bitsandbytes' AVX512-BF16
# layout can hold: on such a CPU the validation pass between epochs used to repack the base
# weights and the next training step failed, whatever the dtype.

from lowbit.adapters import load_4bit_base, load_adapter_model, lora_model  # noqa: E402
from lowbit.builtin_data import generate_reviews  # noqa: E402
from lowbit.config import ModelParams, QLoraParams  # noqa: E402
from lowbit.io import write_json  # noqa: E402
from lowbit.models import load_tokenizer  # noqa: E402
from lowbit.quant.bnb import set_4bit_layouts  # noqa: E402
from lowbit.task_types.sequence_classification import make_loader, predict_logits  # noqa: E402
from lowbit.train import train  # noqa: E402
from tests.tiny_model import tiny_classifier_dir  # noqa: E402

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)
LABELS = ["negative", "neutral", "positive"]


def qlora_params(dtype: str) -> QLoraParams:
    return QLoraParams(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"], bias="none", epochs=2,
                       learning_rate=3e-2, batch_size=16, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, group_by_length=False, seed=0,
                       compute_dtype=dtype, gradient_checkpointing=False, requantize_merged="none")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("wide") / "model", init_std=0.3, hidden_size=64)


@pytest.fixture(scope="module")
def frame():
    data = generate_reviews(160, seed=3)
    return data.assign(label=data["label"].map({name: i for i, name in enumerate(LABELS)}))


def mean_loss(model, tokenizer, frame) -> float:
    scores, labels = predict_logits(model, make_loader(tokenizer, frame, 32, 32))
    return float(torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor(labels)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_qlora_trains_saves_reloads_and_evaluates_in_every_compute_dtype(dtype, wide_dir, frame, tmp_path):
    params = qlora_params(dtype)
    tokenizer = load_tokenizer(str(wide_dir), MODEL)
    model = lora_model(load_4bit_base(str(wide_dir), MODEL, {"labels": LABELS}, params), params, "qlora")
    train_rows, val_rows = frame.iloc[:128], frame.iloc[128:]
    before = mean_loss(model, tokenizer, train_rows)  # an eval-mode call without grad, before any training step
    result = train(model, tokenizer, train_rows, val_rows, params, 32)  # validates between its two epochs
    after = mean_loss(model, tokenizer, train_rows)
    assert after < before - 0.05, (dtype, before, after)
    assert len(result.history) == 2

    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    card = {"variant": "qlora", "format": "peft", "stage": "qlora", "base_model": str(wide_dir), "labels": LABELS,
            "base_quantization": "nf4", "compute_dtype": dtype}
    write_json(tmp_path / "adapter" / "lowbit_variant.json", card)
    expected = predict_logits(model, make_loader(tokenizer, frame, 32, 32))[0]
    served, _ = load_adapter_model(tmp_path / "adapter", card, MODEL)
    served_logits = predict_logits(served, make_loader(tokenizer, frame, 32, 32))[0]
    # Where this CPU has bitsandbytes' AVX512-BF16 kernel the served model computes in bf16:
    # measured within 5% of the logit range here; exact elsewhere.
    spread = expected.max() - expected.min()
    assert np.abs(served_logits - expected).max() < 0.08 * spread
    assert (served_logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.95
    exact, _ = load_adapter_model(tmp_path / "adapter", card, MODEL)
    set_4bit_layouts(exact, training=True)  # the layout it trained in: the round trip is exact
    np.testing.assert_array_equal(predict_logits(exact, make_loader(tokenizer, frame, 32, 32))[0], expected)


@pytest.mark.parametrize("has_kernel", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_set_4bit_layouts_applies_the_decision_to_each_layer(has_kernel, dtype, wide_dir, monkeypatch):
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: has_kernel)
    model = load_4bit_base(str(wide_dir), MODEL, {"labels": LABELS}, qlora_params(dtype))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)  # loaded for training
    allowed = set_4bit_layouts(model, training=False)
    # hidden 64, intermediate 128: every 4-bit layer fits the layout; only bf16 layers may use it
    repacked = has_kernel and dtype == "bfloat16"
    assert allowed == (len(layers) if repacked else 0)
    assert all(m.support_avx512bf16_for_cpu is repacked for m in layers)


@pytest.mark.parametrize("caps, dtype", [(AVX2_CPU, torch.float32), (AVX512_BF16_CPU, torch.bfloat16)])
def test_ptq_nf4_computes_in_the_loading_machines_dtype(caps, dtype, wide_dir, tmp_path, monkeypatch):
    """Quantized on this machine (its saved config names this machine's dtype), loaded as if on `caps`:
    every 4-bit layer computes in that machine's dtype; in float32 a layer's output is the float32
    product with its dequantized weight, with no bf16 rounding."""
    import bitsandbytes as bnb

    from lowbit.formats import load_variant
    from lowbit.quant.scheme import SchemeContext
    from lowbit.quant.schemes import SCHEMES
    from lowbit.quant.schemes import bnb as bnb_scheme

    SCHEMES["nf4"].build(SchemeContext(wide_dir, tmp_path, MODEL, ["classifier"], True, [], 99.9, 128, list))
    monkeypatch.setattr(bnb_scheme, "detect", lambda: caps)
    model, _ = load_variant(tmp_path / "ptq_nf4", MODEL)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == dtype for m in layers)
    layer = layers[0]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    reference = torch.nn.functional.linear(x, weight, layer.bias.float())
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.float32  # bitsandbytes casts back to the input's dtype
    gap = (out - reference).abs().max().item()
    if dtype == torch.float32:
        assert gap < 1e-5
    else:  # bf16 keeps 8 bits of mantissa: the same product, rounded
        assert 1e-5 < gap < 0.05 * reference.abs().max().item()


def test_bitsandbytes_optional_kernel_message_is_silenced_at_its_logger():
    import logging
    import subprocess
    import sys

    # On AVX512-BF16 CPUs bitsandbytes warns at import that it cannot fetch a Hub kernel; peft imports it first.
    done = subprocess.run([sys.executable, "-c", "import lowbit.adapters"], capture_output=True, text=True, check=True)
    assert "kernels-community" not in done.stderr
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET  # the rest of bitsandbytes still warns


@pytest.mark.parametrize("libc, trims", [("glibc", True), ("", False), ("musl", False)])
def test_training_trims_the_heap_each_step_only_on_glibc(libc, trims):
    for machine in EVERY_MACHINE:  # the C library decides, not the CPU or the GPU
        assert training_trims_heap_each_step(Capabilities(**{**machine.__dict__, "libc": libc})) is trims
