"""QLoRA training memory of a 7B chat model, computed from parameter counts (no GPU needed): JSON.

    python -m bench.llm_memory                         # Mistral-7B-Instruct-v0.3, presets/mistral-7b-qlora.yaml
    python -m bench.llm_memory --seq-len 2048 --batch 1

Every figure here is COMPUTED, not measured: bytes per parameter times parameter counts from the
model's published config (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, vocabulary 32768
for Mistral-7B-v0.3), plus the activations a step keeps. On a GPU, `lowbit run --preset mistral-7b-qlora`
measures the real figure (the qlora stage's `cuda_peak_bytes`); published anchors for 7B QLoRA at batch 1
and 1-2k tokens are about 5-10 GB.

What is counted (bytes):
- frozen linear weights in NF4 with double quantization: 4 bits per weight + an 8-bit absmax per
  64-weight block + a float32 second-level scale per 256 blocks = 4 + 8/64 + 32/(64·256) ≈ 4.127 bits;
- embeddings and the LM head in the compute dtype (bf16, 2 bytes): bitsandbytes leaves them unquantized;
- LoRA adapters (r·(d_in + d_out) per target matrix) in fp32 with their gradients (4 + 4) and the
  optimizer state: paged 8-bit AdamW keeps 2 bytes per parameter (two 8-bit moments);
- activations: with gradient checkpointing, each layer's input (batch·seq·hidden·2 bytes) plus one
  layer recomputed in full (about 34·batch·seq·hidden + 5·heads·seq²·batch bytes, Korthikanti et al.
  2022, with bf16 and attention scores kept); without it, every layer in full;
- logits in fp32 for the loss (batch·seq·vocab·4) and their gradient (the same again).
CUDA context and allocator fragmentation (typically 0.5-1.5 GB) are not included.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

GIB = 1024**3
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


MISTRAL_7B_V03 = Architecture("mistralai/Mistral-7B-Instruct-v0.3", 4096, 32, 32, 8, 14336, 32768, tied=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer in one decoder block."""
    head_dim = arch.hidden // arch.heads
    kv = arch.kv_heads * head_dim
    return {"q_proj": (arch.hidden, arch.hidden), "k_proj": (arch.hidden, kv), "v_proj": (arch.hidden, kv),
            "o_proj": (arch.hidden, arch.hidden), "gate_proj": (arch.hidden, arch.intermediate),
            "up_proj": (arch.hidden, arch.intermediate), "down_proj": (arch.intermediate, arch.hidden)}


def qlora_memory(arch: Architecture, r: int, targets: tuple[str, ...], seq_len: int, batch: int,
                 gradient_checkpointing: bool) -> dict:
    shapes = projection_shapes(arch)
    linear_params = arch.layers * sum(d_in * d_out for d_in, d_out in shapes.values())
    embedding_params = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    adapter_params = arch.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    tokens = batch * seq_len
    full_layer = 34 * tokens * arch.hidden + 5 * arch.heads * seq_len * seq_len * batch
    layer_inputs = arch.layers * tokens * arch.hidden * 2
    activations = layer_inputs + full_layer if gradient_checkpointing else arch.layers * full_layer
    parts = {
        "frozen_linear_nf4_bytes": linear_params * NF4_BITS_PER_WEIGHT / 8,
        "embeddings_bf16_bytes": embedding_params * 2,
        "adapter_weights_and_grads_bytes": adapter_params * 8,
        "optimizer_paged_adamw_8bit_bytes": adapter_params * 2,
        "activations_bytes": activations,
        "logits_and_grad_fp32_bytes": 2 * tokens * arch.vocab * 4,
    }
    total = sum(parts.values())
    return {"computed": True, "architecture": asdict(arch), "lora_r": r, "target_modules": list(targets),
            "seq_len": seq_len, "batch": batch, "gradient_checkpointing": gradient_checkpointing,
            "total_params": linear_params + embedding_params, "adapter_params": adapter_params,
            **{k: int(v) for k, v in parts.items()}, "total_bytes": int(total), "total_gib": round(total / GIB, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    rows = [qlora_memory(MISTRAL_7B_V03, args.r, PROJECTIONS[:4], args.seq_len, args.batch, not args.no_checkpointing),
            qlora_memory(MISTRAL_7B_V03, args.r, PROJECTIONS, args.seq_len, args.batch, not args.no_checkpointing)]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
