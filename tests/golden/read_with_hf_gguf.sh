#!/usr/bin/env bash
# A second, independent reader for the GGUF files in tests/data/gguf: Hugging Face's JavaScript parser
# (npm package @huggingface/gguf, pinned below), which shares no code with ggml's gguf.cpp or our
# include/lora/gguf.hpp.
#
#   tests/golden/read_with_hf_gguf.sh
#
# Installs the package into a temporary folder (needs node and npm; the folder is deleted on exit), then a small
# node program parses every *.gguf in tests/data/gguf and tests/data/gguf/adapters (if that folder exists) with
# gguf(path, {allowLocalFile: true, typedMetadata: true}) and writes what the package found to
# tests/data/gguf/read_by_hf_gguf.json, keyed by the file's path relative to tests/data/gguf:
#   version, little_endian, tensor_count, kv_count, tensor_data_offset, tensor_info_byte_range,
#   metadata  in file order: key, type / type_name (GGUFValueType as the package reports it), value, and for an
#             array element_type / element_type_name,
#   tensors   in file order: name, n_dims, ne (as the package's `shape`, GGUF order, ne[0] first), type / type_name
#             (ggml type number, GGMLQuantizationType), offset (relative to the tensor data, as in the file) and
#             data_offset (tensor_data_offset + offset: where the data starts in the file; computed here).
# Every bigint the package returns (u64 / i64 values, counts, ne, offsets) is written as a decimal string; floats
# are JSON numbers (f32 widened to double by the package), except NaN / inf / -inf / -0, written as the strings
# "nan", "inf", "-inf", "-0". A file the package refuses gets {"error": message} and makes the script exit 1 (after
# writing the JSON). Object keys are sorted; 2-space indent.
# Nothing here checks values: the JSON is a record of what this reader saw, to compare with ggml's and ours.
set -euo pipefail

readonly HF_GGUF_VERSION=0.4.6
root=$(cd "$(dirname "$0")/../.." && pwd)
data="$root/tests/data/gguf"
work=$(mktemp -d /tmp/hf-gguf.XXXXXX)
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT

npm install --prefix "$work" --no-audit --no-fund --silent "@huggingface/gguf@$HF_GGUF_VERSION" >"$work/npm.log"

cat >"$work/read.js" <<'EOF'
// node read.js PACKAGE_DIR DATA_DIR OUT_JSON PINNED_VERSION
"use strict";
const fs = require("fs");
const path = require("path");

const [pkgDir, dataDir, outPath, pinned] = process.argv.slice(2);
const installed = JSON.parse(fs.readFileSync(path.join(pkgDir, "package.json"), "utf8")).version;
if (installed !== pinned) throw new Error(`installed @huggingface/gguf ${installed}, pinned ${pinned}`);
const { gguf, GGUFValueType, GGMLQuantizationType } = require(pkgDir);

// A value as JSON can hold it: bigint -> decimal string, non-finite and -0 floats -> strings.
function plain(v) {
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number") {
    if (Number.isNaN(v)) return "nan";
    if (v === Infinity) return "inf";
    if (v === -Infinity) return "-inf";
    if (Object.is(v, -0)) return "-0";
    return v;
  }
  if (Array.isArray(v)) return v.map(plain);
  return v; // string, boolean
}

function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v !== null && typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v).sort()) out[k] = sortKeys(v[k]);
    return out;
  }
  return v;
}

const typeName = (t) => (typeof GGUFValueType[t] === "string" ? GGUFValueType[t] : null);
const ggmlName = (t) => (typeof GGMLQuantizationType[t] === "string" ? GGMLQuantizationType[t] : null);

// The package puts three header fields into the metadata it returns, before the file's keys.
const HEADER_KEYS = ["version", "tensor_count", "kv_count"];

async function read(file) {
  const r = await gguf(file, { allowLocalFile: true, typedMetadata: true });
  const keys = Object.keys(r.typedMetadata);
  if (keys.length !== Number(r.metadata.kv_count) + HEADER_KEYS.length ||
      keys.slice(0, 3).join() !== HEADER_KEYS.join()) {
    throw new Error(`typedMetadata has ${keys.length} entries for kv_count ${r.metadata.kv_count}` +
                    " (a duplicate key, or a key named like a header field)");
  }
  const metadata = keys.slice(HEADER_KEYS.length).map((key) => {
    const e = r.typedMetadata[key];
    const m = { key, type: e.type, type_name: typeName(e.type), value: plain(e.value) };
    if (e.type === GGUFValueType.ARRAY) {
      m.element_type = e.subType === undefined ? null : e.subType;
      m.element_type_name = e.subType === undefined ? null : typeName(e.subType);
    }
    return m;
  });
  const tensors = r.tensorInfos.map((t) => ({
    name: t.name,
    n_dims: t.n_dims,
    ne: plain(t.shape),
    type: t.dtype,
    type_name: ggmlName(t.dtype),
    offset: plain(t.offset),
    data_offset: plain(r.tensorDataOffset + t.offset),
  }));
  return {
    version: r.metadata.version,
    little_endian: r.littleEndian,
    tensor_count: plain(r.metadata.tensor_count),
    kv_count: plain(r.metadata.kv_count),
    tensor_data_offset: plain(r.tensorDataOffset),
    tensor_info_byte_range: r.tensorInfoByteRange,
    metadata,
    tensors,
  };
}

(async () => {
  const files = [];
  for (const sub of ["", "adapters"]) {
    const dir = path.join(dataDir, sub);
    if (!fs.existsSync(dir)) continue;
    for (const name of fs.readdirSync(dir).sort()) {
      if (name.endsWith(".gguf") && fs.statSync(path.join(dir, name)).isFile()) {
        files.push(sub ? `${sub}/${name}` : name);
      }
    }
  }
  const out = { read_by: `@huggingface/gguf@${installed}` };
  let failed = 0;
  for (const rel of files) {
    try {
      out[rel] = await read(path.join(dataDir, rel));
    } catch (err) {
      out[rel] = { error: String(err && err.message ? err.message : err) };
      console.error(`${rel}: ${out[rel].error}`);
      ++failed;
    }
  }
  fs.writeFileSync(outPath, JSON.stringify(sortKeys(out), null, 2) + "\n");
  console.log(`${files.length} file(s) read by @huggingface/gguf@${installed} into ${outPath}` +
              (failed ? `; ${failed} refused` : ""));
  process.exitCode = failed ? 1 : 0;
})();
EOF

node "$work/read.js" "$work/node_modules/@huggingface/gguf" "$data" "$data/read_by_hf_gguf.json" "$HF_GGUF_VERSION"
