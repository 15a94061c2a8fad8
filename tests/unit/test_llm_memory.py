"""bench/llm_memory.py: the computed 7B QLoRA budget rests on parameter counts; check them against the published ones."""

from bench.llm_memory import MISTRAL_7B_V03, NF4_BITS_PER_WEIGHT, PROJECTIONS, qlora_memory


def test_parameter_count_matches_mistral_7b_v03():
    # 7,248,023,552 parameters published for Mistral-7B-v0.3 (safetensors metadata); the RMSNorm weights
    # (two per layer of 4,096 and the final one) are not in the linear/embedding count
    row = qlora_memory(MISTRAL_7B_V03, 16, PROJECTIONS[:4], 1024, 1, gradient_checkpointing=True)
    norms = (2 * MISTRAL_7B_V03.layers + 1) * MISTRAL_7B_V03.hidden
    assert row["total_params"] + norms == 7_248_023_552


def test_adapter_count_and_nf4_bits_by_hand():
    row = qlora_memory(MISTRAL_7B_V03, 16, PROJECTIONS[:4], 1024, 1, gradient_checkpointing=True)
    # per layer: q, o 16·(4096+4096); k, v 16·(4096+1024) (8 KV heads of 128)
    assert row["adapter_params"] == 32 * (2 * 16 * 8192 + 2 * 16 * 5120)
    assert NF4_BITS_PER_WEIGHT == 4 + 8 / 64 + 32 / 16384
    assert 4.0 < row["total_gib"] < 10.0  # the published 5-10 GB anchors, less the CUDA context
    full = qlora_memory(MISTRAL_7B_V03, 16, PROJECTIONS[:4], 1024, 1, gradient_checkpointing=False)
    assert full["activations_bytes"] > 10 * row["activations_bytes"]
