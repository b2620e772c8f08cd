#!/usr/bin/python3
"""Writes tests/data/peft/pissa/: adapters trained from a PiSSA and an OLoRA start, as PEFT's save_pretrained
gives them, and what PEFT computes from them. The oracle for loading such a file (PEFT rewrites the base to its
residual first), merging it (lora-merge) and converting it to a plain LoRA. The tests read only the output files;
run this again (Debian: apt-get install python3-torch) to regenerate them.

PEFT's code, written out because importing PEFT needs transformers (tuners/lora/layer.py, model.py, peft_model.py):
  - from_pretrained on an adapter whose init_lora_weights is "pissa" or "olora" runs LoraLayer.update_layer, which
    runs pissa_init / olora_init on the base weight (in float32) before load_state_dict replaces A and B:
      pissa: V, S, Uh = svd(W as (out, in), full_matrices=False); Sr = S[:r] / s; A0 = diag(sqrt(Sr)) Uh[:r];
             B0 = V[:, :r] diag(sqrt(Sr)); W <- W - s * B0 @ A0 (transposed back for fan_in_fan_out)
      olora: Q, R = qr(W as stored, so (in, out) for a Conv1D weight); A0 = R[:r]; B0 = Q[:, :r];
             stored W <- stored W - s * B0 @ A0
  - merge then adds s * B @ A (its transpose for fan_in_fan_out) to that residual;
  - save_pretrained(path_initial_model_for_weight_conversion=...) (subtract_mutated_init): lora_A <- cat([A, A0]),
    lora_B <- cat([B, -B0], dim=1); r, lora_alpha and the patterns' values doubled; init_lora_weights True.
    Except for OLoRA on a Conv1D weight: olora_init factors the stored (in, out) matrix, so the residual PEFT
    loads is W - s * (B0 @ A0)^T as (out, in), and PEFT's own conversion (which subtracts B0 @ A0) does not give
    the model back. olora_converted/ holds the conversion that does: lora_A <- cat([A, B0^T]),
    lora_B <- cat([B, -A0^T], dim=1), the same product as the residual's, transposed.

Outputs (all in tests/data/peft/pissa/):
  base.safetensors             the original weights, F32
  pissa/, pissa_initial/       LLaMA-style q_proj (12, 10), v_proj (8, 10); r 4, alpha 8; v_proj r 2, alpha 6
                               (patterns); init_lora_weights "pissa": the trained adapter and the initial one
  pissa_converted/             what PEFT's conversion writes for them, byte for byte
  olora/, olora_initial/, olora_converted/   GPT-2-style Conv1D c_proj (10, 10) of two blocks, fan_in_fan_out,
                               r 3, alpha 6, init_lora_weights "olora" (converted as above, not as PEFT does)
  merged_pissa.safetensors, merged_olora.safetensors   the base as PEFT merges each adapter into it (float32)
  forward.safetensors          per module: x (3, in) and y = x W_merged^T (float64 from the stored values)
"""
import json
import math
import os

import torch

from peft_files import lora_config, pattern_get, save_file

torch.manual_seed(20261203)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "peft", "pissa")
prefix = "base_model.model."


def spectrum_weight(rows, cols):
    """A weight with well-separated singular values, so the top-r subspace (and PiSSA's residual) is unique."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64))
    S = torch.tensor([2.0 * 0.7**i for i in range(k)], dtype=torch.float64)
    return (U @ torch.diag(S) @ V.T).float()


def pissa_init(W, r, s):  # W (out, in), float32
    V, S, Uh = torch.linalg.svd(W, full_matrices=False)
    Sr = S[:r] / s
    A0 = torch.diag(torch.sqrt(Sr)) @ Uh[:r]
    B0 = V[:, :r] @ torch.diag(torch.sqrt(Sr))
    return A0, B0, W - s * B0 @ A0


def olora_init(stored, r, s):  # the stored matrix as it is
    Q, R = torch.linalg.qr(stored)
    A0, B0 = R[:r].contiguous(), Q[:, :r].contiguous()
    return A0, B0, stored - s * B0 @ A0


cases = {
    "pissa": dict(
        config=lora_config(alpha_pattern={"v_proj": 6}, base_model_name_or_path="tiny-llama-pissa",
                           fan_in_fan_out=False, init_lora_weights="pissa", lora_alpha=8, r=4,
                           rank_pattern={"v_proj": 2}, target_modules=["q_proj", "v_proj"]),
        modules=[("model.layers.0.self_attn.q_proj", 12, 10), ("model.layers.0.self_attn.v_proj", 8, 10)],
    ),
    "olora": dict(
        config=lora_config(base_model_name_or_path="tiny-gpt2-olora", fan_in_fan_out=True, init_lora_weights="olora",
                           lora_alpha=6, r=3, target_modules=["c_proj"]),
        modules=[("transformer.h.0.attn.c_proj", 10, 10), ("transformer.h.1.attn.c_proj", 10, 10)],
    ),
}

base, forward = {}, {}
for name, case in cases.items():
    config = case["config"]
    fifo = config["fan_in_fan_out"]
    trained, initial, converted, merged = {}, {}, {}, {}
    for path, out_f, in_f in case["modules"]:
        r = pattern_get(config["rank_pattern"], path, config["r"])
        alpha = pattern_get(config["alpha_pattern"], path, config["lora_alpha"])
        s = alpha / r
        W = spectrum_weight(out_f, in_f)  # (out, in)
        stored = W.T.contiguous() if fifo else W
        short = path[len("transformer."):] if path.startswith("transformer.") else path
        base[short + ".weight"] = stored
        if config["init_lora_weights"] == "pissa":
            A0, B0, residual = pissa_init(W, r, s)
            stored_residual = residual.T.contiguous() if fifo else residual
        else:
            A0, B0, stored_residual = olora_init(stored, r, s)
        assert A0.shape == (r, in_f) and B0.shape == (out_f, r)
        A = A0 + 0.1 * torch.randn(r, in_f)  # "trained"
        B = B0 + 0.1 * torch.randn(out_f, r)
        key = prefix + path
        trained[key + ".lora_A.weight"], trained[key + ".lora_B.weight"] = A, B
        initial[key + ".lora_A.weight"], initial[key + ".lora_B.weight"] = A0.contiguous(), B0.contiguous()
        if config["init_lora_weights"] == "olora" and fifo:  # PEFT's residual subtracted (B0 @ A0)^T
            converted[key + ".lora_A.weight"] = torch.cat([A, B0.T], dim=0)
            converted[key + ".lora_B.weight"] = torch.cat([B, -A0.T], dim=1)
        else:
            converted[key + ".lora_A.weight"] = torch.cat([A, A0], dim=0)
            converted[key + ".lora_B.weight"] = torch.cat([B, -B0], dim=1)
        delta = s * (B @ A)  # merge in float32
        merged[short + ".weight"] = stored_residual + (delta.T if fifo else delta)
        x = torch.randn(3, in_f, dtype=torch.float64)
        Wm = merged[short + ".weight"].double()
        forward[path + ".x"] = x.float()
        forward[path + ".y"] = (x.float().double() @ (Wm if fifo else Wm.T)).float()
    converted_config = dict(config, init_lora_weights=True, r=2 * config["r"], lora_alpha=2 * config["lora_alpha"],
                            rank_pattern={k: 2 * v for k, v in config["rank_pattern"].items()},
                            alpha_pattern={k: 2 * v for k, v in config["alpha_pattern"].items()})
    for folder, tensors, cfg in ((name, trained, config), (name + "_initial", initial, config),
                                 (name + "_converted", converted, converted_config)):
        os.makedirs(os.path.join(OUT, folder), exist_ok=True)
        save_file(tensors, os.path.join(OUT, folder, "adapter_model.safetensors"), {"format": "pt"})
        with open(os.path.join(OUT, folder, "adapter_config.json"), "w") as f:
            f.write(json.dumps(cfg, indent=2, sort_keys=True))
    case["merged"] = merged
for name, case in cases.items():
    merged_all = dict(base)
    merged_all.update(case["merged"])
    save_file(merged_all, os.path.join(OUT, "merged_%s.safetensors" % name),
              {"format": "pt", "producer": "make_pissa_golden.py"})
save_file(base, os.path.join(OUT, "base.safetensors"), {"format": "pt", "producer": "make_pissa_golden.py"})
save_file(forward, os.path.join(OUT, "forward.safetensors"))
print("wrote", OUT)
