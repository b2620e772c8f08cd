#!/usr/bin/python3
"""Writes tests/data/quant/: NF4 (4-bit NormalFloat) quantisation as bitsandbytes
does it, the oracle for the C++ NF4 reader/dequantiser. The tests read only the
output files; run this again (Debian: apt-get install python3-torch) to
regenerate them. Needs torch + numpy only.

bitsandbytes cannot be installed here, so the functions that produce the data
are copied below from its source (bitsandbytes-foundation/bitsandbytes, commit
BNB_COMMIT, MIT licence: tests/data/quant/LICENSE-bitsandbytes). Each copy names
its file and function. The quantisers are the pure-PyTorch "default" backend
kernels (bitsandbytes/backends/default/ops.py), the ones bitsandbytes runs for
quantize_4bit on CPU; only the torch.ops.bitsandbytes dispatch and
torch.compile wrapper are dropped (torch 1.13 has no torch.compile).

Outputs (tests/data/quant/, layout described in tests/data/quant/README.md):
  nf4_blocks.safetensors      NF4, blocksize 64, no double quantisation, (6, 100)
  nf4_double.safetensors      NF4, blocksize 64, compress_statistics=True, (128, 160)
  nf4_model.safetensors       two Linear4bit weights as transformers saves them
  nf4_model_dense.safetensors their float32 originals and dequantised weights

Self-checks: the NF4 table against get_4bit_type('nf4')'s 16 numbers (and the
copy in backends/utils.py, and create_normal_map); the tie / padding cases;
dequantise -> quantise gives the same codes; QuantState.from_dict on what was
written gives back the dequantised weights; every file read back.
"""
import json
import os
import re
import struct
import subprocess
import sys
from math import prod

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peft_files  # noqa: E402  (safetensors.torch.save_file's layout)

peft_files.TORCH_DTYPE.setdefault(torch.uint8, "U8")
save_file = peft_files.save_file

OUT = os.path.join(HERE, "..", "data", "quant")
BNB_COMMIT = "95f9af309d4d5793847169c39288dcd3fcbdf564"
BNB_MIRROR = "/work/.mirror/bitsandbytes-foundation+bitsandbytes/repo"  # optional, for the table cross-check
DEVICE = torch.device("cpu")


# =====================================================================================================
# Copied from bitsandbytes @ 95f9af309d4d5793847169c39288dcd3fcbdf564 (MIT, Copyright (c) Facebook, Inc.
# and its affiliates). Changes: torch.ops.bitsandbytes.* calls replaced by direct calls to the copied
# "default" kernels; @register_kernel / @_try_torch_compile / @cache decorators dropped; unused branches
# (fp4-only, out=/absmax= kwargs, quant_storage != uint8) kept where harmless.
# =====================================================================================================

# ---- bitsandbytes/utils.py: pack_dict_to_tensor --------------------------------------------------
def pack_dict_to_tensor(source_dict):
    json_str = json.dumps(source_dict)
    json_bytes = json_str.encode("utf-8")
    tensor_data = torch.tensor(list(json_bytes), dtype=torch.uint8)

    return tensor_data


# ---- bitsandbytes/utils.py: unpack_tensor_to_dict ------------------------------------------------
def unpack_tensor_to_dict(tensor_data):
    json_bytes = bytes(tensor_data.cpu().numpy())
    json_str = json_bytes.decode("utf-8")
    unpacked_dict = json.loads(json_str)

    return unpacked_dict


# ---- bitsandbytes/functional.py: create_dynamic_map ----------------------------------------------
def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    # these are additional items that come from the case
    # where all the exponent bits are zero and no
    # indicator bit is present
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1,
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()

    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()

    data.append(0)
    data.append(1.0)

    assert len(data) == 2**total_bits

    gap = 256 - len(data)
    for i in range(gap):
        data.append(0)

    data.sort()
    return torch.tensor(data, dtype=torch.float32)


# ---- bitsandbytes/functional.py: get_4bit_type (the "nf4" branch) ---------------------------------
def get_4bit_type(typename, device=None, blocksize=64):
    if device is None:
        device = "cuda"
    data = None
    if typename == "nf4":
        # Generated by: create_normal_map(offset=0.9677083, use_extra_value=True)
        data = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ]
    if data is None:
        raise NotImplementedError(f"Typename {typename} not supported")

    data = torch.tensor(data, device=device)
    data.div_(data.abs().max())

    assert data.numel() == 16

    return data


# ---- bitsandbytes/backends/utils.py: _NF4_QUANT_TABLE (a second copy in bitsandbytes; cross-check only)
_NF4_QUANT_TABLE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


# ---- bitsandbytes/backends/utils.py: _get_4bit_code ----------------------------------------------
def _get_4bit_code(quant_type, device):
    return get_4bit_type(quant_type, device=device)


# ---- bitsandbytes/backends/default/ops.py: "bitsandbytes::quantize_blockwise" kernel -----------------
def default_quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    A_com = A_flat[:full].reshape(blocks, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2  # code is always sorted (same assumption as CUDA kernel)
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return q.reshape(A.shape), absmax


# ---- bitsandbytes/backends/default/ops.py: _dequantize_blockwise_compute ----------------------------
def _dequantize_blockwise_compute(A_flat, absmax, code, blocksize, dtype):
    n = A_flat.numel()
    out = code[A_flat.to(torch.int64)]
    rem = n % blocksize
    if rem == 0:
        out = (out.reshape(-1, blocksize) * absmax.view(-1, 1)).reshape(n)
    else:
        full = n - rem
        blocks = full // blocksize
        out = torch.cat(
            [
                (out[:full].reshape(blocks, blocksize) * absmax[:blocks].view(-1, 1)).reshape(full),
                out[full:] * absmax[blocks],
            ]
        )
    return out.to(dtype)


# ---- bitsandbytes/backends/default/ops.py: "bitsandbytes::dequantize_blockwise" kernel ---------------
def default_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    return _dequantize_blockwise_compute(A.reshape(-1), absmax, code, blocksize, dtype).reshape(A.shape)


# ---- bitsandbytes/backends/default/ops.py: _get_4bit_quantize_bounds --------------------------------
def _get_4bit_quantize_bounds(quant_type, device):
    code = _get_4bit_code(quant_type, device)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order  # NF4 order is identity (sorted); FP4 needs remap


# ---- bitsandbytes/backends/default/ops.py: "bitsandbytes::quantize_4bit" kernel ----------------------
def default_quantize_4bit(A, blocksize, quant_type, quant_storage):
    bounds, order = _get_4bit_quantize_bounds(quant_type, A.device)
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    A_com = A_flat[:full].reshape(blocks, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


# ---- bitsandbytes/backends/default/ops.py: _dequantize_4bit_compute ---------------------------------
def _dequantize_4bit_compute(A_flat, absmax, code, blocksize, shape, dtype):
    n = prod(shape)
    out_dq = torch.empty(A_flat.size(0) * 2, dtype=torch.int32, device=A_flat.device)
    out_dq[1::2] = A_flat & 0xF
    out_dq[::2] = A_flat >> 4
    out_dq = code[out_dq.long()][:n]  # stays fp32, matches C++ / CUDA behavior  (.long(): torch 1.13 indexing)
    rem = n % blocksize
    if rem:
        full = n - rem
        blocks = full // blocksize
        out = torch.empty(n, dtype=torch.float32, device=A_flat.device)
        out[:full] = (out_dq[:full].view(-1, blocksize) * absmax[:blocks].view(-1, 1)).reshape(full)
        out[full:] = out_dq[full:] * absmax[blocks]
    else:
        out = (out_dq.view(-1, blocksize) * absmax.view(-1, 1)).reshape(n)
    return out.reshape(-1, *shape[1:]).to(dtype)


# ---- bitsandbytes/backends/default/ops.py: "bitsandbytes::dequantize_4bit" kernel --------------------
def default_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    code = _get_4bit_code(quant_type, A.device)
    return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


# ---- bitsandbytes/functional.py: QuantState (__init__, from_dict, as_dict) ------------------------
class QuantState:
    valid_quant_types = ("fp4", "nf4")
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in valid_quant_types]
    valid_qs_keys = [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None,
                 state2=None):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    @classmethod
    def from_dict(cls, qs_dict, device):
        # unpacking tensor with non-tensor components
        qs_key = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict:
            if not qs_key:
                raise ValueError("Expected packed or unpacked quant_state items, found neither")
            elif len(qs_key) != 1 or qs_key[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"There should be exactly one `quant_state` item with ending from {cls.valid_qs_type_keys}.\nDetected {qs_key}.",
                )

        # unpacking minor and non-tensor quant state items if necessary
        if len(qs_key) == 1:
            first_qs_key = qs_key[0]
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(first_qs_key)))

        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}  # strip prefixes
        assert set(qs_dict.keys()).issubset(cls.valid_qs_keys)

        if "nested_absmax" in qs_dict:
            offset = torch.tensor(float(qs_dict["nested_offset"])).to(device)
            state2 = cls(
                absmax=qs_dict["nested_absmax"].to(device),
                blocksize=qs_dict["nested_blocksize"],
                code=qs_dict["nested_quant_map"].to(device),
                dtype=getattr(torch, qs_dict["nested_dtype"]),
            )
        else:
            offset, state2 = None, None

        quant_state = cls(
            quant_type=qs_dict["quant_type"],
            absmax=qs_dict["absmax"].to(device),
            blocksize=qs_dict["blocksize"],
            code=qs_dict["quant_map"].to(device),
            dtype=getattr(torch, qs_dict["dtype"]),
            shape=torch.Size(qs_dict["shape"]) if qs_dict["shape"] is not None else None,
            offset=offset,
            state2=state2,
        )
        return quant_state

    def as_dict(self, packed=False):
        qs_dict = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": str(self.dtype).strip("torch."),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs_dict.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),  # un-shared to avoid restoring it after shared tensors are removed by safetensors
                    "nested_dtype": str(self.state2.dtype).strip("torch."),
                    "nested_offset": self.offset.item(),
                },
            )
        if not packed or self.quant_type is None:
            return qs_dict

        # packed format allows serialization of non-tensor components, critical for saving in safetensors format
        qs_packed_dict = {k: v for k, v in qs_dict.items() if isinstance(v, torch.Tensor)}
        non_tensor_dict = {k: v for k, v in qs_dict.items() if not isinstance(v, torch.Tensor)}
        key = "quant_state.bitsandbytes__"
        if self.quant_type is not None:
            key += self.quant_type
        qs_packed_dict[key] = pack_dict_to_tensor(non_tensor_dict)
        return qs_packed_dict


name2qmap = {}  # bitsandbytes/functional.py module global


# ---- bitsandbytes/functional.py: quantize_blockwise (nested=False path; out/absmax kwargs dropped) ---
def quantize_blockwise(A, code=None, blocksize=4096):
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"Blockwise quantization only supports 16/32-bit floats, but got {A.dtype}")

    if code is None:
        if "dynamic" not in name2qmap:
            name2qmap["dynamic"] = create_dynamic_map().to(A.device)
        code = name2qmap["dynamic"]

    _out, _absmax = default_quantize_blockwise(A, code.to(A.device), blocksize)
    quant_state = QuantState(absmax=_absmax, code=code.to(A.device, copy=True), blocksize=blocksize, dtype=A.dtype)
    return _out, quant_state


# ---- bitsandbytes/functional.py: dequantize_blockwise (quant_state path) -------------------------
def dequantize_blockwise(A, quant_state):
    if A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8, got {A.dtype}")
    if quant_state.blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {quant_state.blocksize}")

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
        absmax += quant_state.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()

    return default_dequantize_blockwise(
        A,
        absmax,
        quant_state.code.to(A.device),
        quant_state.blocksize,
        quant_state.dtype,
    )


# ---- bitsandbytes/functional.py: quantize_4bit (out/absmax kwargs dropped) ------------------------
def quantize_4bit(A, blocksize=None, compress_statistics=False, quant_type="fp4", quant_storage=torch.uint8):
    if blocksize is None:
        blocksize = 64

    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"invalid blocksize {blocksize}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if A.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"Blockwise 4bit quantization only supports 16/32-bit floats, but got {A.dtype}")

    input_shape = A.shape

    _out, _absmax = default_quantize_4bit(A, blocksize, quant_type, quant_storage)

    code = get_4bit_type(quant_type, device=A.device)

    if compress_statistics:
        offset = _absmax.mean()
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=256)
        del _absmax
        state = QuantState(
            absmax=qabsmax,
            shape=input_shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(
            absmax=_absmax,
            shape=input_shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
        )

    return _out, state


# ---- bitsandbytes/functional.py: dequantize_4bit (quant_state path, out kwarg dropped) -------------
def dequantize_4bit(A, quant_state):
    absmax = quant_state.absmax

    if quant_state.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"invalid blocksize {quant_state.blocksize}")
    if quant_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_state.quant_type!r}")
    if quant_state.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"Blockwise 4bit dequantization only supports 16/32-bit floats, but got {quant_state.dtype}")

    if quant_state.nested:
        absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
        absmax += quant_state.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()

    out = default_dequantize_4bit(
        A,
        absmax,
        quant_state.blocksize,
        quant_state.quant_type,
        quant_state.shape,
        quant_state.dtype,
    )

    # BC shim: callers that pass the packed weight in transposed [1, (N*K+1)//2] form
    # receive the output transposed back to [K, N].
    if A.shape[0] == 1:
        return out.t()
    return out


# ---- bitsandbytes/nn/modules.py: Linear4bit._save_to_state_dict (the quant_state part) -------------
def linear4bit_state_dict(prefix, packed_weight, quant_state):
    destination = {prefix + "weight": packed_weight}
    for k, v in quant_state.as_dict(packed=True).items():
        destination[prefix + "weight." + k] = v.detach()
    return destination

# ============================== end of the bitsandbytes copies ========================================


def absmax_of(qs):
    """What dequantize_4bit multiplies by (the nested branch of functional.dequantize_4bit)."""
    if not qs.nested:
        return qs.absmax
    absmax = dequantize_blockwise(qs.absmax, qs.state2)
    absmax += qs.offset
    return absmax


def unpack_codes(packed, n):
    p = packed.reshape(-1)
    codes = torch.empty(p.numel() * 2, dtype=torch.uint8)
    codes[0::2] = p >> 4
    codes[1::2] = p & 0xF
    return codes[:n]


# ---------------------------------------------------------------- self-checks
def check_tables():
    nf4 = get_4bit_type("nf4", device=DEVICE)
    assert torch.equal(nf4, _NF4_QUANT_TABLE), "get_4bit_type('nf4') != backends/utils.py _NF4_QUANT_TABLE"
    # create_normal_map(offset=0.9677083, use_extra_value=True) (functional.py), with scipy's norm.ppf
    # replaced by torch.special.ndtri in float64 (scipy is not available): agrees to 1e-6.
    offset = 0.9677083
    v1 = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).tolist()
    v3 = (-torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())).tolist()
    values = torch.Tensor(v1 + [0] + v3)
    values = values.sort().values
    values /= values.max()
    assert (values - nf4).abs().max() < 1e-6, "NF4 table differs from create_normal_map"
    # The 16 numbers as they stand in get_4bit_type('nf4') at BNB_COMMIT, when the mirror is at hand.
    try:
        src = subprocess.run(["git", "-C", BNB_MIRROR, "show", BNB_COMMIT + ":bitsandbytes/functional.py"],
                             capture_output=True, text=True, check=True).stdout
        body = src[src.index("def get_4bit_type"):]
        body = body[body.index('if typename == "nf4":'):body.index('elif typename == "fp4":')]
        nums = [float(s) for s in re.findall(r"^\s*(-?\d+\.\d+),\s*$", body, re.M)]
        assert len(nums) == 16
        ref = torch.tensor(nums, dtype=torch.float32)
        ref.div_(ref.abs().max())
        assert torch.equal(ref, nf4), "NF4 table differs from get_4bit_type('nf4') in bitsandbytes' source"
        print("NF4 table == get_4bit_type('nf4') in bitsandbytes", BNB_COMMIT[:12])
    except (OSError, subprocess.CalledProcessError, ValueError):
        print("(bitsandbytes mirror not found: NF4 table checked against the copied table only)")
    bounds, order = _get_4bit_quantize_bounds("nf4", DEVICE)
    assert torch.equal(order, torch.arange(16)), "NF4 table is sorted"
    dyn = create_dynamic_map()
    assert dyn.numel() == 256 and torch.all(dyn[1:] >= dyn[:-1]) and dyn[-1] == 1.0
    return nf4, bounds


def requantize_check(dq, qs, codes):
    """dequantise -> quantise again with the same blocksize: the same codes, and absmax equal to what
    dequantize_4bit multiplied by (every block holds a +-1 code, so its max |value| is 1.0 * absmax)."""
    packed2, absmax2 = default_quantize_4bit(dq, qs.blocksize, "nf4", torch.uint8)
    n = prod(qs.shape)
    assert torch.equal(unpack_codes(packed2, n), codes), "re-quantised codes differ"
    assert torch.equal(absmax2, absmax_of(qs)), "re-quantised absmax differs"


def nested_margin(x, qs):
    """Smallest distance of a scaled (absmax - offset) value to a midpoint of the dynamic map. Above 2/65535
    (one bin of the 65536-entry LUT of the native CPU kernel, csrc/cpu_ops.cpp quantize_cpu_impl) the native
    CPU and CUDA 8-bit quantisers pick the same absmax_q as the default backend used here."""
    _, absmax = default_quantize_4bit(x, qs.blocksize, "nf4", torch.uint8)
    a = absmax - qs.offset
    bs = qs.state2.blocksize
    scaled = torch.cat([a[k:k + bs] / a[k:k + bs].abs().max() for k in range(0, a.numel(), bs)])
    code = qs.state2.code
    mids = ((code[:-1] + code[1:]) / 2).double()
    margin = (scaled.double().reshape(-1, 1) - mids.reshape(1, -1)).abs().min().item()
    assert margin > 2 / 65535, f"an absmax lies {margin} from a dynamic-map midpoint: pick another seed"
    return margin


def reciprocal_codes_check(x, qs, codes):
    """CUDA's kQuantizeBlockwise (csrc/kernels.cu) scales every block by 1/absmax, the default kernel divides
    in the partial last block: the codes here do not depend on which."""
    a = absmax_of(qs) if not qs.nested else default_quantize_4bit(x, qs.blocksize, "nf4", torch.uint8)[1]
    f = x.reshape(-1).float()
    inv = 1.0 / a.clamp(min=1e-38)
    scaled = torch.clamp(f * inv.repeat_interleave(qs.blocksize)[:f.numel()], -1, 1)
    bounds, _ = _get_4bit_quantize_bounds("nf4", DEVICE)
    assert torch.equal(torch.bucketize(scaled, bounds).to(torch.uint8), codes), "codes depend on 1/absmax vs /"


# ---------------------------------------------------------------- data
def blocks_input(bounds):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((6, 100), generator=g, dtype=torch.float32)
    f = x.view(-1)
    up = torch.from_numpy(np.nextafter(bounds.numpy(), np.float32(2)))
    down = torch.from_numpy(np.nextafter(bounds.numpy(), np.float32(-2)))
    # block 0 (elements 0..63, row 0): absmax exactly 2.0, so value * (1 / absmax) is exact
    f[0:64].clamp_(-1.9, 1.9)
    f[0] = 2.0
    f[1:16] = 2.0 * bounds      # exactly on the 15 midpoints  -> tie rule
    f[16:31] = 2.0 * up         # one float32 ulp above        -> upper code
    f[31:46] = 2.0 * down       # one float32 ulp below        -> lower code
    f[46:50] = 0.0
    f[50] = -0.0
    f[51] = -2.0                # -absmax -> code 0
    f[128:192] = 0.0            # block 2: all zeros, absmax 0
    f[200] = -6.5               # block 3: negative extreme sets absmax
    f[300] = 9.25               # block 4: positive extreme sets absmax
    f[320:384] *= 1e-3          # block 5: small values
    f[384:448] *= 1e3           # block 6: large values
    # last block (elements 576..599, 24 of 64: the partial block, division path): absmax 4.0 from -4.0
    f[576:600].clamp_(-3.9, 3.9)
    f[576] = -4.0
    f[577:592] = 4.0 * bounds   # midpoints again, in the partial block
    return x


def write_blocks(bounds):
    x = blocks_input(bounds)
    packed, qs = quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    dq = dequantize_4bit(packed, qs)
    codes = unpack_codes(packed, x.numel())
    assert packed.shape == (300, 1) and packed.dtype == torch.uint8
    assert qs.absmax.shape == (10,)
    # tie rule: a value on the midpoint between codes i and i+1 gets i (torch.bucketize, right=False)
    ar = torch.arange(15, dtype=torch.uint8)
    assert torch.equal(codes[1:16], ar) and torch.equal(codes[16:31], ar + 1) and torch.equal(codes[31:46], ar)
    assert torch.equal(codes[577:592], ar)
    assert codes[0] == 15 and codes[51] == 0 and torch.all(codes[46:51] == 7) and torch.all(codes[128:192] == 7)
    assert qs.absmax[2] == 0.0 and qs.absmax[0] == 2.0 and qs.absmax[9] == 4.0
    assert torch.equal(qs.absmax[9], x.view(-1)[576:].abs().max())  # partial block: its 24 elements only
    requantize_check(dq, qs, codes)
    reciprocal_codes_check(x, qs, codes)
    save_file({"x": x, "packed": packed, "absmax": qs.absmax, "quant_map": qs.code, "codes": codes,
               "dequant": dq}, os.path.join(OUT, "nf4_blocks.safetensors"))


def write_double():
    g = torch.Generator().manual_seed(3)
    x = torch.randn((128, 160), generator=g, dtype=torch.float32)
    x *= torch.logspace(-1.0, 1.0, 128, dtype=torch.float32).view(-1, 1)  # absmax from ~0.2 to ~30
    packed, qs = quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    dq = dequantize_4bit(packed, qs)
    codes = unpack_codes(packed, x.numel())
    absmax_dequant = absmax_of(qs)
    assert qs.absmax.shape == (320,) and qs.absmax.dtype == torch.uint8
    assert qs.state2.absmax.shape == (2,) and qs.state2.blocksize == 256
    # the formula, spelled out
    i = torch.arange(320)
    manual = qs.state2.code[qs.absmax.long()] * qs.state2.absmax[i // 256] + qs.offset
    assert torch.equal(manual, absmax_dequant)
    requantize_check(dq, qs, codes)
    reciprocal_codes_check(x, qs, codes)
    margin = nested_margin(x, qs)
    _, absmax = default_quantize_4bit(x, 64, "nf4", torch.uint8)
    mean64 = absmax.double().mean().item()
    print(f"nf4_double: offset {qs.offset.item()!r} (float64 mean {mean64!r}), 8-bit margin {margin:.3g}")
    save_file({"x": x, "packed": packed, "absmax_q": qs.absmax, "offset": qs.offset.reshape(1),
               "nested_absmax": qs.state2.absmax, "nested_quant_map": qs.state2.code, "quant_map": qs.code,
               "absmax_dequant": absmax_dequant, "dequant": dq}, os.path.join(OUT, "nf4_double.safetensors"))


MODULES = [  # (name, out, in, compress_statistics)
    ("model.layers.0.mlp.down_proj", 48, 64, True),
    ("model.layers.0.self_attn.q_proj", 32, 96, False),
]


def write_model():
    g = torch.Generator().manual_seed(3)
    sd, dense, states = {}, {}, {}
    for name, o, i, nested in MODULES:
        w = torch.randn((o, i), generator=g, dtype=torch.float32) / float(i) ** 0.5
        packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        assert packed.shape == ((o * i + 1) // 2, 1)
        requantize_check(dequantize_4bit(packed, qs), qs, unpack_codes(packed, o * i))
        reciprocal_codes_check(w, qs, unpack_codes(packed, o * i))
        if nested:
            nested_margin(w, qs)
        sd.update(linear4bit_state_dict(name + ".", packed, qs))
        dense[name + ".weight.original"] = w
        dense[name + ".weight.dequant"] = dequantize_4bit(packed, qs)
        states[name] = qs
    sd["model.norm.weight"] = 1.0 + 0.1 * torch.randn((64,), generator=g, dtype=torch.float32)
    save_file(sd, os.path.join(OUT, "nf4_model.safetensors"), metadata={"format": "pt"})
    save_file(dense, os.path.join(OUT, "nf4_model_dense.safetensors"), metadata={"format": "pt"})
    return sd, dense


def write_adapter(dense):
    """A PEFT LoRA adapter on both 4-bit modules (LLaMA-style (out, in) weights, r 4, alpha 8: scaling 2) and
    what merging it gives: each weight dequantised as above plus scaling * B @ A, in float32. That is the sum
    PEFT's Linear4bit.merge computes (w_data = dequantize_4bit(weight) + lora_data) before it quantises it to 4
    bits again; lora-merge writes it as it is, unquantised."""
    g = torch.Generator().manual_seed(4)
    r, alpha = 4, 8
    scaling = alpha / r
    adapter, merged = {}, {}
    for name, o, i, _ in MODULES:
        a = torch.randn((r, i), generator=g, dtype=torch.float32) * 0.1
        b = torch.randn((o, r), generator=g, dtype=torch.float32) * 0.1
        adapter[f"base_model.model.{name}.lora_A.weight"] = a
        adapter[f"base_model.model.{name}.lora_B.weight"] = b
        merged[name + ".weight"] = dense[name + ".weight.dequant"] + scaling * (b @ a)
    _, t = read_safetensors(os.path.join(OUT, "nf4_model.safetensors"))
    merged["model.norm.weight"] = t["model.norm.weight"][2]
    folder = os.path.join(OUT, "nf4_adapter")
    os.makedirs(folder, exist_ok=True)
    save_file(adapter, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_files.lora_config(r=r, lora_alpha=alpha, fan_in_fan_out=False,
                                    target_modules=["down_proj", "q_proj"])
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True))
    save_file(merged, os.path.join(OUT, "nf4_merged.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------- read back
NP = {"F32": np.float32, "U8": np.uint8}


def read_safetensors(path):
    with open(path, "rb") as fh:
        blob = fh.read()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + hlen])
    meta = header.pop("__metadata__", None)
    out = {}
    for k, v in header.items():
        b, e = v["data_offsets"]
        arr = np.frombuffer(blob[8 + hlen + b:8 + hlen + e], dtype=NP[v["dtype"]]).reshape(v["shape"])
        out[k] = (v["dtype"], v["shape"], torch.from_numpy(arr.copy()))
    return meta, out


def check_model_file(dense):
    _, t = read_safetensors(os.path.join(OUT, "nf4_model.safetensors"))
    for name, o, i, nested in MODULES:
        p = name + ".weight."
        qs_dict = {k[len(p):]: v[2] for k, v in t.items() if k.startswith(p)}
        qs = QuantState.from_dict(qs_dict, DEVICE)  # as transformers' loading does
        dq = dequantize_4bit(t[name + ".weight"][2], qs)
        assert torch.equal(dq, dense[name + ".weight.dequant"]), name
        print(f"{name}: quant_state json {bytes(t[p + 'quant_state.bitsandbytes__nf4'][2].numpy()).decode()}")


def main():
    torch.set_num_threads(1)
    nf4, bounds = check_tables()
    os.makedirs(OUT, exist_ok=True)
    write_blocks(bounds)
    write_double()
    sd, dense = write_model()
    check_model_file(dense)
    write_adapter(dense)
    for fname in ("nf4_blocks", "nf4_double", "nf4_model", "nf4_model_dense", "nf4_merged"):
        meta, t = read_safetensors(os.path.join(OUT, fname + ".safetensors"))
        print(f"{fname}.safetensors" + (f"  metadata {meta}" if meta else ""))
        for k, (dt, shape, _) in t.items():
            print(f"  {k:55s} {dt:3s} {shape}")
    print("all checks passed")


if __name__ == "__main__":
    main()
