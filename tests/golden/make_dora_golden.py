#!/usr/bin/python3
"""Writes tests/data/peft/dora/: two DoRA adapters in the layout PEFT's
save_pretrained gives them, and what PEFT computes from them. The oracle for
reading, loading, saving back byte for byte and merging (lora-merge) DoRA
files. The tests read only the output files; run this again (Debian: apt-get
install python3-torch) to regenerate them.

PEFT's DoRA (tuners/lora/dora.py, variants.py DoraLinearVariant), written out
because importing PEFT needs transformers:
  - each adapted module saves "<path>.lora_magnitude_vector" (out_features,):
    the key loses the ".default.weight" of the module's state dict;
  - n = ||W + s * B @ A|| per output row (W as (out, in); transposed first when
    fan_in_fan_out), m the magnitude;
  - forward (eval): y = x W^T + b + (m/n - 1) * (x W^T) + (m/n) * s * (x A^T) B^T;
  - merge (merge_safe, float32 as on a float32 base): W' = (m/n)[:, None] * (W + s * B @ A),
    transposed back for fan_in_fan_out (the factor then scales columns).

Outputs (all in tests/data/peft/dora/):
  linear/adapter_model.safetensors, linear/adapter_config.json
      LLaMA-style q_proj and v_proj (out, in), r 4 / alpha 8, v_proj r 2 / alpha 6 (patterns)
  conv1d/...   GPT-2-style c_attn and c_proj, Conv1D (in, out), fan_in_fan_out, rsLoRA, r 4, alpha 4
  base.safetensors     both models' weights, F32, names without the "base_model.model." prefix
  merged_linear.safetensors, merged_conv1d.safetensors   the base with each adapted weight merged
  forward.safetensors  for each module: x and y (eval, no dropout), float64 math stored F32
  embedding/...        DoRA on a LLaMA-style embed_tokens (DoraEmbeddingVariant) beside q_proj, r 4, alpha 8, with
                       base_embedding.safetensors, merged_embedding.safetensors and forward_embedding.safetensors
                       (ids with repeats and the embedding's y; x and y for q_proj), written after the rest so that
                       their random draws leave the files above as they were

PEFT's DoRA on an embedding takes the weight with fan_in_fan_out = True: n = ||E^T + s * B @ A|| per embedding
dimension (a norm over the vocabulary), forward y = (m/n) * (E[ids] + s * A^T[ids] @ B^T), merge_safe
E' = (m/n)[None, :] * (E + s * (B @ A)^T). The magnitude's key is "<path>.lora_magnitude_vector" as for Linear.
"""
import json
import math
import os

import torch

from peft_files import lora_config, pattern_get, save_file

torch.manual_seed(12032026)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "peft", "dora")

cases = {
    "linear": dict(
        config=lora_config(alpha_pattern={"v_proj": 6}, base_model_name_or_path="tiny-llama-dora", fan_in_fan_out=False,
                           lora_alpha=8, r=4, rank_pattern={"v_proj": 2}, target_modules=["q_proj", "v_proj"],
                           use_dora=True),
        modules=[("model.layers.0.self_attn.q_proj", 6, 8), ("model.layers.0.self_attn.v_proj", 4, 8)],
    ),
    "conv1d": dict(
        config=lora_config(base_model_name_or_path="tiny-gpt2-dora", fan_in_fan_out=True, lora_alpha=4, r=4,
                           target_modules=["c_attn", "c_proj"], use_dora=True, use_rslora=True),
        modules=[("transformer.h.0.attn.c_attn", 15, 5), ("transformer.h.0.attn.c_proj", 5, 5)],
    ),
}

base, forward = {}, {}
prefix = "base_model.model."
for name, case in cases.items():
    config = case["config"]
    adapter, merged = {}, {}
    for path, out_f, in_f in case["modules"]:
        r = pattern_get(config["rank_pattern"], path, config["r"])
        alpha = pattern_get(config["alpha_pattern"], path, config["lora_alpha"])
        s = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        W = torch.randn(out_f, in_f, dtype=torch.float64) * 0.5  # as (out, in)
        b = torch.randn(out_f, dtype=torch.float64) * 0.1
        A = torch.randn(r, in_f, dtype=torch.float64) * 0.3  # trained: B no longer zero
        B = torch.randn(out_f, r, dtype=torch.float64) * 0.3
        # m starts as PEFT's get_weight_norm at B = 0, and training moved it
        m = torch.linalg.norm(W, dim=1) * (1 + 0.2 * torch.randn(out_f, dtype=torch.float64))
        A, B, m, W, b = (t.float() for t in (A, B, m, W, b))  # what the files hold
        stored = W.T.contiguous() if config["fan_in_fan_out"] else W
        short = path[len("transformer."):] if path.startswith("transformer.") else path
        base[short + ".weight"] = stored
        base[short + ".bias"] = b
        adapter[prefix + path + ".lora_A.weight"] = A
        adapter[prefix + path + ".lora_B.weight"] = B
        adapter[prefix + path + ".lora_magnitude_vector"] = m
        # merge_safe in float32: weight_norm of (W + delta), factor m / n, new = factor * (W + delta)
        delta = (B @ A) * s
        n32 = torch.linalg.norm(W + delta, dim=1)
        new = (m / n32).view(-1, 1) * (W + delta)
        merged[short + ".weight"] = new.T.contiguous() if config["fan_in_fan_out"] else new
        merged[short + ".bias"] = b
        # forward in float64 from the stored float32 values
        Wd, bd, Ad, Bd, md = (t.double() for t in (W, b, A, B, m))
        n = torch.linalg.norm(Wd + s * Bd @ Ad, dim=1)
        c = (md / n).view(1, -1)
        x = torch.randn(3, in_f, dtype=torch.float64)
        base_result = x @ Wd.T
        y = base_result + bd + (c - 1) * base_result + c * ((x @ Ad.T) @ Bd.T) * s
        forward[path + ".x"] = x.float()
        forward[path + ".y"] = y.float()
    save_file(adapter, os.path.join(OUT, name, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(OUT, name, "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    merged_all = dict(base)
    merged_all.update(merged)
    cases[name]["merged"] = merged
for name, case in cases.items():
    merged_all = dict(base)
    merged_all.update(case["merged"])
    save_file(merged_all, os.path.join(OUT, "merged_%s.safetensors" % name),
              {"format": "pt", "producer": "make_dora_golden.py"})
save_file(base, os.path.join(OUT, "base.safetensors"), {"format": "pt", "producer": "make_dora_golden.py"})
save_file(forward, os.path.join(OUT, "forward.safetensors"))

# ---- DoRA on an embedding, beside a linear module -----------------------------------------------------------
config = lora_config(base_model_name_or_path="tiny-llama-dora-embedding", fan_in_fan_out=False, lora_alpha=8, r=4,
                     target_modules=["embed_tokens", "q_proj"], use_dora=True)
s = 8 / 4
V, d = 11, 6
base, adapter, merged, forward = {}, {}, {}, {}
E = (torch.randn(V, d, dtype=torch.float64) * 0.5).float()
A = (torch.randn(4, V, dtype=torch.float64) * 0.3).float()  # trained: A no longer zero
B = (torch.randn(d, 4, dtype=torch.float64) * 0.3).float()
m = (torch.linalg.norm(E.double().T, dim=1) * (1 + 0.2 * torch.randn(d, dtype=torch.float64))).float()
path = "model.embed_tokens"
base[path + ".weight"] = E
adapter[prefix + path + ".lora_embedding_A"] = A
adapter[prefix + path + ".lora_embedding_B"] = B
adapter[prefix + path + ".lora_magnitude_vector"] = m
delta = (B @ A).T * s  # get_delta_weight: transpose(B @ A, fan_in_fan_out=True) * scaling, (V, d)
n32 = torch.linalg.norm((E + delta).T, dim=1)
merged[path + ".weight"] = (m / n32).view(1, -1) * (E + delta)
Ed, Ad, Bd, md = (t.double() for t in (E, A, B, m))
n = torch.linalg.norm(Ed.T + s * Bd @ Ad, dim=1)
ids = torch.tensor([3, 0, 10, 3, 7, 3])
y = (md / n).view(1, -1) * (Ed[ids] + s * Ad.T[ids] @ Bd.T)
forward[path + ".ids"] = ids.float()  # F32: the tests read floats
forward[path + ".y"] = y.float()
path = "model.layers.0.self_attn.q_proj"
W = (torch.randn(d, d, dtype=torch.float64) * 0.5).float()
A = (torch.randn(4, d, dtype=torch.float64) * 0.3).float()
B = (torch.randn(d, 4, dtype=torch.float64) * 0.3).float()
m = (torch.linalg.norm(W.double(), dim=1) * (1 + 0.2 * torch.randn(d, dtype=torch.float64))).float()
base[path + ".weight"] = W
adapter[prefix + path + ".lora_A.weight"] = A
adapter[prefix + path + ".lora_B.weight"] = B
adapter[prefix + path + ".lora_magnitude_vector"] = m
delta = (B @ A) * s
n32 = torch.linalg.norm(W + delta, dim=1)
merged[path + ".weight"] = (m / n32).view(-1, 1) * (W + delta)
Wd, Ad, Bd, md = (t.double() for t in (W, A, B, m))
c = (md / torch.linalg.norm(Wd + s * Bd @ Ad, dim=1)).view(1, -1)
x = torch.randn(3, d, dtype=torch.float64)
forward[path + ".x"] = x.float()
forward[path + ".y"] = (c * (x @ Wd.T + s * (x @ Ad.T) @ Bd.T)).float()
save_file(adapter, os.path.join(OUT, "embedding", "adapter_model.safetensors"), {"format": "pt"})
with open(os.path.join(OUT, "embedding", "adapter_config.json"), "w") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True))
save_file(base, os.path.join(OUT, "base_embedding.safetensors"), {"format": "pt", "producer": "make_dora_golden.py"})
save_file(merged, os.path.join(OUT, "merged_embedding.safetensors"),
          {"format": "pt", "producer": "make_dora_golden.py"})
save_file(forward, os.path.join(OUT, "forward_embedding.safetensors"))
print("wrote", OUT)
