#!/usr/bin/python3
"""Writes tests/data/peft/sliced/: a PEFT-layout adapter for a tiny GPT-2 with
an embedding LoRA on the token table and LoRA on the q and v slices of the
fused c_attn projection, and what PyTorch computes from it. It is the oracle
for FusedLoRALinear and LoRAEmbedding loading a file PEFT wrote, saving it back
byte for byte, and for lora-inspect and lora-merge on such adapters. The tests
read only the output files; run this again (Debian: apt-get install
python3-torch) to regenerate them.

The adapter is what PEFT saves for (peft_files.py says how files are written):
  - transformer.wte: PEFT's lora.Embedding, keys ...wte.lora_embedding_A (r, V)
    and ...wte.lora_embedding_B (d, r), no ".weight" suffix; fan_in_fan_out
    does not apply to it (PEFT drops it for embeddings);
  - transformer.h.N.attn.c_attn (Conv1D, W (d, 3d)): one LoRA on the fused
    module whose A stacks A_q and A_v (rank 4 each) and whose B holds B_q in
    q's rows and A_q's columns, B_v in v's rows and A_v's columns and zeros
    elsewhere: the exact form of LoRA on the q and v slices (loralib's
    MergedLinear(enable_lora=[True, False, True])), r = 8, alpha 16;
  - transformer.h.N.attn.c_proj: a plain LoRA, r = 2, alpha 4 (patterns).
Merging follows PEFT's get_delta_weight: B @ A * scaling, transposed when
fan_in_fan_out (Conv1D), and for the embedding (B @ A).T * scaling.

Outputs (all in tests/data/peft/sliced/):
  adapter/adapter_model.safetensors, adapter/adapter_config.json
  base.safetensors     the model's weights, F32, names without "transformer."
  merged.safetensors   base with wte and every adapted weight replaced by W + delta
  forward.safetensors  for each c_attn: x and y = x W + b + s (x Aᵀ) Bᵀ (eval, no dropout);
                       for wte: ids (I64) and y = E[ids] + s A[:, ids]ᵀ Bᵀ
"""
import json
import os

import torch

from peft_files import lora_config, pattern_get, save_file

torch.manual_seed(3122026)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "peft", "sliced")

V, D, LAYERS = 10, 6, 2
SLICE_R, SLICE_ALPHA = 4, 8  # q and v each: scaling 2, the fused LoRA's too (r 8, alpha 16)
config = lora_config(
    alpha_pattern={"c_proj": 4, "wte": 8},
    base_model_name_or_path="tiny-gpt2-sliced",
    lora_alpha=2 * SLICE_ALPHA,
    r=2 * SLICE_R,
    rank_pattern={"c_proj": 2, "wte": 4},
    target_modules=["c_attn", "c_proj", "wte"],
)


def scaling_of(path):
    return pattern_get(config["alpha_pattern"], path, config["lora_alpha"]) / pattern_get(
        config["rank_pattern"], path, config["r"])


base, adapter, merged, forward = {}, {}, {}, {}
prefix = "base_model.model."

# The token table (V, d) and its embedding LoRA; wpe is copied through by lora-merge.
E = torch.randn(V, D)
r = pattern_get(config["rank_pattern"], "transformer.wte", config["r"])
A = torch.randn(r, V) * 0.3  # trained: A no longer zero
B = torch.randn(D, r) * 0.3
s = scaling_of("transformer.wte")
base["wte.weight"] = E
base["wpe.weight"] = torch.randn(4, D)
adapter[prefix + "transformer.wte.lora_embedding_A"] = A
adapter[prefix + "transformer.wte.lora_embedding_B"] = B
merged["wte.weight"] = E + (B @ A).T * s
ids = torch.tensor([3, 0, 9, 3, 7, 3], dtype=torch.int64)  # repeated ids
forward["transformer.wte.ids"] = ids
forward["transformer.wte.y"] = E[ids] + (A[:, ids].T @ B.T) * s

for layer in range(LAYERS):
    path = f"transformer.h.{layer}.attn.c_attn"
    short = path[len("transformer."):]
    W = torch.randn(D, 3 * D) * 0.5  # Conv1D: (in, out), outputs q | k | v
    b = torch.randn(3 * D) * 0.1
    Aq, Av = torch.randn(SLICE_R, D) * 0.3, torch.randn(SLICE_R, D) * 0.3
    Bq, Bv = torch.randn(D, SLICE_R) * 0.3, torch.randn(D, SLICE_R) * 0.3
    A = torch.cat([Aq, Av])  # (8, d)
    B = torch.zeros(3 * D, 2 * SLICE_R)
    B[0:D, 0:SLICE_R] = Bq
    B[2 * D:3 * D, SLICE_R:] = Bv
    s = scaling_of(path)
    assert s == SLICE_ALPHA / SLICE_R
    base[short + ".weight"] = W
    base[short + ".bias"] = b
    adapter[prefix + path + ".lora_A.weight"] = A
    adapter[prefix + path + ".lora_B.weight"] = B
    merged[short + ".weight"] = W + (B @ A).T * s
    merged[short + ".bias"] = b
    x = torch.randn(5, D)
    y = x @ W + b
    y[:, 0:D] += (x @ Aq.T) @ Bq.T * (SLICE_ALPHA / SLICE_R)  # the slices, as a per-slice reference
    y[:, 2 * D:] += (x @ Av.T) @ Bv.T * (SLICE_ALPHA / SLICE_R)
    forward[path + ".x"] = x
    forward[path + ".y"] = y

    path = f"transformer.h.{layer}.attn.c_proj"
    short = path[len("transformer."):]
    W = torch.randn(D, D) * 0.5
    r = pattern_get(config["rank_pattern"], path, config["r"])
    A, B = torch.randn(r, D) * 0.3, torch.randn(D, r) * 0.3
    base[short + ".weight"] = W
    adapter[prefix + path + ".lora_A.weight"] = A
    adapter[prefix + path + ".lora_B.weight"] = B
    merged[short + ".weight"] = W + (B @ A).T * scaling_of(path)

merged["wpe.weight"] = base["wpe.weight"]
save_file(adapter, os.path.join(OUT, "adapter", "adapter_model.safetensors"), {"format": "pt"})
with open(os.path.join(OUT, "adapter", "adapter_config.json"), "w") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True))
save_file(base, os.path.join(OUT, "base.safetensors"), {"format": "pt", "producer": "make_sliced_golden.py"})
save_file(merged, os.path.join(OUT, "merged.safetensors"), {"format": "pt", "producer": "make_sliced_golden.py"})
save_file(forward, os.path.join(OUT, "forward.safetensors"))
print("wrote", OUT)
