#!/usr/bin/python3
"""Writes tests/data/gguf/adapters/: PEFT-layout adapters for tiny LLaMA and
GPT-2 models and, for each, the update llama.cpp must apply to every base
tensor of the GGUF model, computed here from PEFT's and llama.cpp's own
definitions. It is the oracle for lora::gguf::export_adapter (tests/unit-gguf-
adapter.cpp); make_gguf_adapter_golden.sh also has ggml's reader check the
files our exporter writes. Run this again (Debian: apt-get install
python3-torch) to regenerate; the tests read only the output files.

Cases (peft_files.py says how the files are written):
  llama_plain    LlamaForCausalLM names, d 64, 4 heads, 2 key/value heads (so
                 k_proj and v_proj have 32 outputs), ffn 96, vocab 100, two
                 layers: q, k, v, o, gate, up, down on both, embed_tokens
                 (PEFT's lora.Embedding) and lm_head; r 8, alpha 16.
  llama_rslora   the same model, use_rslora, r 8, alpha 16, rank_pattern
                 {q_proj: 4, layers.1.mlp.down_proj: 2}, alpha_pattern
                 {v_proj: 4, embed_tokens: 32}: every module a different s.
  gpt2           GPT2LMHeadModel names, d 48, vocab 80, two layers: c_attn
                 (Conv1D, fan_in_fan_out), attn.c_proj, mlp.c_fc, mlp.c_proj,
                 wte; r 4, alpha 8, rank_pattern {c_fc: 2}.

The update of a module is PEFT's get_delta_weight (B @ A * s, transposed for
fan_in_fan_out; (B @ A).T * s for an embedding), in the orientation of the
base weight PEFT adapts, then put through what llama.cpp's model converter
(convert_hf_to_gguf.py) does to that base weight: LlamaModel.permute on
q_proj (n_head) and k_proj (n_head_kv), GPT2Model's transpose(1, 0) of the
Conv1D weights. The result has the GGUF tensor's PyTorch shape (ne[1], ne[0]).

Outputs, per case, in tests/data/gguf/adapters/:
  <case>/adapter_config.json, <case>/adapter_model.safetensors   the adapter
  <case>_expected.safetensors   F32 update per GGUF base tensor name
  <case>_base.txt               every GGUF base tensor of the model: name ne0 ne1
With an argument RAW_DIR it also writes RAW_DIR/<case>/<GGUF name>.f32, each
update as raw little-endian float32 in that shape's row-major order, for
make_gguf_adapter_golden.sh's ggml-side check.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_files import lora_config, pattern_get, save_file  # noqa: E402

torch.manual_seed(20261203)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "gguf", "adapters")
PREFIX = "base_model.model."
RAW = sys.argv[1] if len(sys.argv) > 1 else None


def llama_permute(weights, n_head, n_head_kv):  # convert_hf_to_gguf.py, LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama_model(layers=2, d=64, n_head=4, n_kv=2, ffn=96, vocab=100):
    """(module path, PyTorch base weight shape, kind, GGUF name, converter transform) for every weight."""
    kv = d // n_head * n_kv
    mods = [("model.embed_tokens", (vocab, d), "embedding", "token_embd.weight", None)]
    for i in range(layers):
        p = f"model.layers.{i}."
        mods += [
            (p + "self_attn.q_proj", (d, d), "linear", f"blk.{i}.attn_q.weight",
             lambda w: llama_permute(w, n_head, n_head)),
            (p + "self_attn.k_proj", (kv, d), "linear", f"blk.{i}.attn_k.weight",
             lambda w: llama_permute(w, n_head, n_kv)),
            (p + "self_attn.v_proj", (kv, d), "linear", f"blk.{i}.attn_v.weight", None),
            (p + "self_attn.o_proj", (d, d), "linear", f"blk.{i}.attn_output.weight", None),
            (p + "mlp.gate_proj", (ffn, d), "linear", f"blk.{i}.ffn_gate.weight", None),
            (p + "mlp.up_proj", (ffn, d), "linear", f"blk.{i}.ffn_up.weight", None),
            (p + "mlp.down_proj", (d, ffn), "linear", f"blk.{i}.ffn_down.weight", None),
        ]
    mods.append(("lm_head", (vocab, d), "linear", "output.weight", None))
    return mods


def gpt2_model(layers=2, d=48, vocab=80):
    # Conv1D weights are stored (in, out); the converter transposes them (GPT2Model.modify_tensors).
    mods = [("transformer.wte", (vocab, d), "embedding", "token_embd.weight", None)]
    for i in range(layers):
        p = f"transformer.h.{i}."
        mods += [
            (p + "attn.c_attn", (d, 3 * d), "conv1d", f"blk.{i}.attn_qkv.weight", lambda w: w.transpose(1, 0)),
            (p + "attn.c_proj", (d, d), "conv1d", f"blk.{i}.attn_output.weight", lambda w: w.transpose(1, 0)),
            (p + "mlp.c_fc", (d, 4 * d), "conv1d", f"blk.{i}.ffn_up.weight", lambda w: w.transpose(1, 0)),
            (p + "mlp.c_proj", (4 * d, d), "conv1d", f"blk.{i}.ffn_down.weight", lambda w: w.transpose(1, 0)),
        ]
    # wpe and the tied output are base tensors no module here adapts.
    return mods, [("position_embd.weight", d, 1024), ("output.weight", d, vocab)]


def write_case(name, mods, extra_base, targets, config):
    folder = os.path.join(OUT, name)
    tensors, expected = {}, {}
    base_lines = []
    for path, shape, kind, gguf_name, transform in mods:
        # The GGUF tensor's PyTorch shape: the converter's transform applied to the base weight's shape.
        g_shape = tuple(transform(torch.empty(shape)).shape) if transform is not None else shape
        base_lines.append(f"{gguf_name} {g_shape[1]} {g_shape[0]}")
        if path.rsplit(".", 1)[-1] not in targets:
            continue
        r = pattern_get(config["rank_pattern"], path, config["r"])
        alpha = pattern_get(config["alpha_pattern"], path, config["lora_alpha"])
        s = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        if kind == "embedding":  # lora.Embedding: A (r, V), B (d, r)
            A = torch.randn(r, shape[0]) * 0.5
            B = torch.randn(shape[1], r) * 0.5
            tensors[PREFIX + path + ".lora_embedding_A"] = A
            tensors[PREFIX + path + ".lora_embedding_B"] = B
            delta = (B @ A).T * s
        else:
            out_f, in_f = (shape[1], shape[0]) if kind == "conv1d" else shape
            A = torch.randn(r, in_f) * 0.3
            B = torch.randn(out_f, r) * 0.3
            tensors[PREFIX + path + ".lora_A.weight"] = A
            tensors[PREFIX + path + ".lora_B.weight"] = B
            delta = B @ A * s
            if kind == "conv1d":
                delta = delta.T  # fan_in_fan_out: the update of a Conv1D weight (in, out)
        assert tuple(delta.shape) == tuple(shape), (path, delta.shape, shape)
        if transform is not None:
            delta = transform(delta)
        expected[gguf_name] = delta.contiguous()
    for gguf_name, ne0, ne1 in extra_base:
        base_lines.append(f"{gguf_name} {ne0} {ne1}")
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    save_file(expected, os.path.join(OUT, name + "_expected.safetensors"))
    if RAW is not None:
        os.makedirs(os.path.join(RAW, name), exist_ok=True)
        for gguf_name, delta in expected.items():
            with open(os.path.join(RAW, name, gguf_name + ".f32"), "wb") as f:
                f.write(delta.numpy().astype("<f4").tobytes())
    with open(os.path.join(OUT, name + "_base.txt"), "w") as f:
        f.write("\n".join(base_lines) + "\n")
    print(f"{name}: {len(expected)} modules")


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
write_case("llama_plain", llama_model(), [], LLAMA_ALL,
           lora_config(r=8, lora_alpha=16, fan_in_fan_out=False, target_modules=LLAMA_ALL))
write_case("llama_rslora", llama_model(), [], ["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"],
           lora_config(r=8, lora_alpha=16, fan_in_fan_out=False, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"],
                       rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                       alpha_pattern={"v_proj": 4, "embed_tokens": 32}))
gpt2_mods, gpt2_extra = gpt2_model()
write_case("gpt2", gpt2_mods, gpt2_extra, ["c_attn", "c_proj", "c_fc", "wte"],
           lora_config(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"],
                       rank_pattern={"c_fc": 2}))
