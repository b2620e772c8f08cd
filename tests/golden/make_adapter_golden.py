#!/usr/bin/python3
"""Writes tests/data/peft/golden/: a PEFT-layout LoRA adapter for a tiny
GPT-2-style model and what PyTorch computes from it, the oracle for the C++
adapter-file tests and for lora-merge. The tests read only the output files;
run this again (Debian: apt-get install python3-torch) to regenerate them.

PEFT itself is not packaged by Debian, so this script writes exactly what
PEFT's save_pretrained writes, from PEFT's and safetensors' sources:
  - adapter_model.safetensors as safetensors.torch.save_file does: header
    json with separators (",", ":"), "__metadata__" first, tensors sorted by
    decreasing dtype alignment then name, header padded with spaces to a
    multiple of 8, metadata {"format": "pt"};
  - keys base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r),
    no adapter name;
  - adapter_config.json as json.dumps(config, indent=2, sort_keys=True) of a
    LoraConfig's fields (PEFT 0.13's set).
Merging follows PEFT's LoRA Linear.get_delta_weight: delta = B @ A * scaling,
transposed when fan_in_fan_out (Conv1D stores W as (in, out)).

Outputs (all in tests/data/peft/golden/):
  adapter/adapter_model.safetensors, adapter/adapter_config.json
  base.safetensors          base weights F32, names without "transformer." (the lora-merge matching rule),
                            plus a tensor to copy through (wte.weight) and an I64 one
  base_bf16.safetensors     the same weights as BF16
  merged.safetensors        base with every adapted weight replaced by W + s·delta (scale 1), F32
  merged_half.safetensors   the same with --scale 0.5
  merged_bf16.safetensors   BF16 base merged in float32, rounded back to BF16
  forward.safetensors       x and y = x W + b + s·(x Aᵀ) Bᵀ for each module (eval, no dropout)
  conversions.safetensors   random float32 values and their torch .half() / .bfloat16() bits
"""
import json
import os

import torch

from peft_files import lora_config, pattern_get, save_file

torch.manual_seed(29112026)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "peft", "golden")

# ---- the model: two GPT-2 blocks, Conv1D weights stored (in, out) ------------------
D = 6
modules = {  # module path -> (in, out)
    "transformer.h.0.attn.c_attn": (D, 3 * D),
    "transformer.h.0.attn.c_proj": (D, D),
    "transformer.h.1.attn.c_attn": (D, 3 * D),
    "transformer.h.1.attn.c_proj": (D, D),
}
config = lora_config(
    alpha_pattern={"h.1.attn.c_proj": 3},
    base_model_name_or_path="tiny-gpt2-golden",
    lora_alpha=8,
    lora_dropout=0.05,
    modules_to_save=["score"],
    r=4,
    rank_pattern={"c_proj": 2},
    target_modules=["c_attn", "c_proj"],
)


base = {}
adapter = {}
expected = {}
forward = {}
for path, (fin, fout) in modules.items():
    r = pattern_get(config["rank_pattern"], path, config["r"])
    alpha = pattern_get(config["alpha_pattern"], path, config["lora_alpha"])
    scaling = alpha / r
    W = torch.randn(fin, fout) * 0.5  # Conv1D: (in, out)
    b = torch.randn(fout) * 0.1
    A = torch.randn(r, fin) * 0.3
    B = torch.randn(fout, r) * 0.3  # trained: not zero
    short = path[len("transformer."):]
    base[short + ".weight"] = W
    base[short + ".bias"] = b
    adapter["base_model.model." + path + ".lora_A.weight"] = A
    adapter["base_model.model." + path + ".lora_B.weight"] = B
    delta = (B @ A).T * scaling  # fan_in_fan_out: transpose
    expected[short] = (W, delta)
    x = torch.randn(3, fin)
    y = x @ W + b + (x @ A.T) @ B.T * scaling  # Conv1D forward is x @ W + b
    forward[path + ".x"] = x
    forward[path + ".y"] = y
    forward[path + ".weight_out_in"] = W.T.contiguous()
    forward[path + ".bias"] = b
adapter["base_model.model.score.weight"] = torch.randn(3, D)  # modules_to_save head

base["wte.weight"] = torch.randn(10, D)
base["h.0.attn.bias_mask"] = torch.arange(4, dtype=torch.int64).reshape(2, 2)

save_file(adapter, os.path.join(OUT, "adapter", "adapter_model.safetensors"), {"format": "pt"})
with open(os.path.join(OUT, "adapter", "adapter_config.json"), "w") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True))

save_file(base, os.path.join(OUT, "base.safetensors"), {"format": "pt", "producer": "make_adapter_golden.py"})
for name, scale in (("merged.safetensors", 1.0), ("merged_half.safetensors", 0.5)):
    merged = dict(base)
    for short, (W, delta) in expected.items():
        merged[short + ".weight"] = W + scale * delta
    save_file(merged, os.path.join(OUT, name), {"format": "pt", "producer": "make_adapter_golden.py"})

base_bf16 = {k: (v.bfloat16() if v.dtype == torch.float32 else v) for k, v in base.items()}
save_file(base_bf16, os.path.join(OUT, "base_bf16.safetensors"), {"format": "pt"})
merged_bf16 = dict(base_bf16)
for short, (W, delta) in expected.items():
    merged_bf16[short + ".weight"] = (base_bf16[short + ".weight"].float() + delta).bfloat16()
save_file(merged_bf16, os.path.join(OUT, "merged_bf16.safetensors"), {"format": "pt"})

save_file(forward, os.path.join(OUT, "forward.safetensors"))

# Half-precision conversions: a spread of magnitudes, subnormals, ties and overflow.
values = torch.cat([torch.randn(2000) * 10.0 ** torch.randint(-9, 6, (2000,)).float(),
                    torch.tensor([65504.0, 65519.0, 65520.0, 1e5, -1e-8, 6e-8, 3e-8, 1.00048828125, 3.4e38])])
values = values.float()
save_file({"f32": values, "f16": values.half(), "bf16": values.bfloat16()},
          os.path.join(OUT, "conversions.safetensors"))
print("wrote", OUT)
