#!/usr/bin/python3
"""Writes tests/data/cli/: PEFT adapters whose names and config strings hold
terminal control sequences, for the command-line tool tests (cli_*_escaped_*
in tests/CMakeLists.txt). Every such string must reach the terminal escaped
by lora::printable, never raw. Standard library only; the tests read the
committed files, run this again to regenerate them.

Every string is valid UTF-8, so the safetensors reader and the config parser
accept it: ESC sequences (clear screen, colour, an OSC window title ended by
BEL), newlines, and U+202E RIGHT-TO-LEFT OVERRIDE.

Outputs (all in tests/data/cli/):
  escaped_names/adapter_model.safetensors, adapter_config.json
      one LoRA module (r 2, in 3, out 4) and one modules_to_save tensor, all F32
  escaped_names_base.safetensors
      a base holding the weight that module's path names, so a merge succeeds
  escaped_unpaired/adapter_model.safetensors, adapter_config.json
      the module's lora_A without its lora_B, so reading the adapter fails
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "cli")

ESC = "\x1b"
RLO = "\u202e"
MODULE = "transformer.h.0." + ESC + "[2J\nattn" + RLO + ".c_attn"
HEAD = "base_model.model.score" + ESC + "]0;pwned\x07.weight"

CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["c_attn" + ESC + "[31m", "c_proj\n"],
    "rank_pattern": {"nomatch" + ESC: 2},
    "alpha_pattern": {"nomatch" + RLO + "\n": 8},
    "task_type": "CAUSAL_LM" + ESC + "[2J",
    "base_model_name_or_path": "gpt2" + RLO + "gnp.exe\n",
    "comment" + ESC + "[5m": "a key lora-inspect lists as kept",
}


def save_file(tensors, path):
    """tensors: list of (name, shape, values), written as F32 in that order."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name, shape, values in tensors:
        data = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    # ensure_ascii=False: U+202E goes in as UTF-8; json still writes ESC and newline as \u001b and \n.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def save_config(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(CONFIG, indent=2, ensure_ascii=False))


lora_A = ("base_model.model." + MODULE + ".lora_A.weight", [2, 3], [0.5, -0.25, 0.125, 1.0, 0.75, -0.5])
lora_B = ("base_model.model." + MODULE + ".lora_B.weight", [4, 2], [0.1, 0.2, 0.3, 0.4, -0.1, -0.2, -0.3, -0.4])
head = (HEAD, [2], [1.5, -2.5])

save_file([lora_A, lora_B, head], os.path.join(OUT, "escaped_names", "adapter_model.safetensors"))
save_config(os.path.join(OUT, "escaped_names"))
save_file([(MODULE + ".weight", [4, 3], [float(i) for i in range(12)])],
          os.path.join(OUT, "escaped_names_base.safetensors"))
save_file([lora_A], os.path.join(OUT, "escaped_unpaired", "adapter_model.safetensors"))
save_config(os.path.join(OUT, "escaped_unpaired"))
