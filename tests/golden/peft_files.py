"""Writing files exactly as PEFT's save_pretrained does, from PEFT's and
safetensors' sources (shared by make_adapter_golden.py and
make_sliced_golden.py):
  - a .safetensors file as safetensors.torch.save_file does: header json with
    separators (",", ":"), "__metadata__" first, tensors sorted by decreasing
    dtype alignment then name, header padded with spaces to a multiple of 8;
  - an adapter_config.json's fields as PEFT 0.13's LoraConfig has them (lora_config);
  - PEFT's get_pattern_key for rank_pattern / alpha_pattern.
"""
import json
import os
import re
import struct

import torch

# The reference implementation's dtype order (increasing alignment).
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64"]
TORCH_DTYPE = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int16: "I16"}


def tensor_bytes(t):
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def save_file(tensors, path, metadata=None):
    items = sorted(tensors.items(), key=lambda kv: (-DTYPE_ORDER.index(TORCH_DTYPE[kv[1].dtype]), kv[0]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name, t in items:
        data = tensor_bytes(t)
        header[name] = {"dtype": TORCH_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def pattern_get(patterns, module, default):  # PEFT's get_pattern_key
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_config(**fields):
    """PEFT 0.13's LoraConfig fields with their defaults for a GPT-2 (Conv1D) adapter saved for inference,
    `fields` overriding them; written by json.dumps(config, indent=2, sort_keys=True) as PEFT does."""
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": True,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 8,
        "rank_pattern": {},
        "revision": None,
        "target_modules": None,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    unknown = set(fields) - set(config)
    assert not unknown, f"not a LoraConfig field: {unknown}"
    config.update(fields)
    return config
