#!/usr/bin/python3
"""Writes tests/data/targets/targets_golden.json: which modules PEFT's own
check_target_module_exists selects for a set of LoRA configs on the module
names of GPT-2, BERT, DistilBERT, LLaMA and Mixtral checkpoints; the oracle
for include/lora/targets.hpp (tests/unit-targets.cpp).

PEFT's tuners_utils.py imports torch, transformers and accelerate, which are
not needed to match names, so this script does not import PEFT: it reads the
source of three functions out of a PEFT git snapshot and executes that source
unchanged, with only `re` in scope:
    src/peft/tuners/tuners_utils.py   class _ExcludedModule, check_target_module_exists
    src/peft/utils/other.py           match_target_against_key
Run it with the path of a bare PEFT clone (default: the snapshot the `fetch`
tool leaves at /work/.mirror/huggingface+peft/repo):
    python3 tests/golden/make_targets_golden.py [PEFT_GIT_DIR]
The commit it read is written into the output.

What is NOT PEFT's code here, but written by hand from it (line numbers are
of src/peft/tuners/tuners_utils.py and src/peft/tuners/lora/config.py at the
recorded commit):
  * The config object: LoraConfig.__post_init__ turns list target_modules and
    exclude_modules into sets (config.py 995-999) and refuses a str
    target_modules with layers_to_transform or layers_pattern, and
    layers_pattern without layers_to_transform (config.py 1019-1029).
  * "all-linear": _maybe_include_all_linear_layers (tuners_utils.py 2382-2442)
    replaces target_modules by the set of names of the modules that are
    torch.nn.Linear or Conv1D, minus the module get_output_embeddings()
    returns, or, when there is none and task_type is SEQ_CLS, minus the first
    of the model's attributes `score`, `classifier` that exists. This needs a
    model, so each architecture below lists every module with a 2-D `.weight`
    with its torch class and names its output-embedding module, as the
    transformers model classes define them (public architecture facts). The
    oracle decides by class; the C++ code decides by name (targets.hpp), so
    the two are independent.
  * The verdict when nothing is selected: inject_adapter's branches
    (tuners_utils.py 1024-1059): all excluded, no target_modules, target
    modules not found, or a mix of unmatched and excluded.
The universe of names is each checkpoint's modules with a 2-D `.weight` (what
targets.hpp sees); PEFT walks named_modules(), which also holds containers and
layer norms, but adapting those fails in PEFT anyway.
"""
import ast
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "targets", "targets_golden.json")
PEFT = sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/huggingface+peft/repo"


def git(*args):
    return subprocess.run(["git", "--git-dir", PEFT, *args], check=True, capture_output=True, text=True).stdout


COMMIT = git("rev-parse", "HEAD").strip()


def peft_source(path, names):
    """The source text of the top-level definitions `names` in `path` at COMMIT."""
    text = git("show", f"{COMMIT}:{path}")
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            out[node.name] = "".join(lines[node.lineno - 1 : node.end_lineno])
    missing = set(names) - set(out)
    assert not missing, f"not found in {path}: {missing}"
    return [out[n] for n in names]


namespace = {"re": re, "Optional": object}
exec("from __future__ import annotations\n", namespace)
for src in peft_source("src/peft/utils/other.py", ["match_target_against_key"]):
    exec(compile("from __future__ import annotations\n" + src, "peft/utils/other.py", "exec"), namespace)
for src in peft_source("src/peft/tuners/tuners_utils.py", ["_ExcludedModule", "check_target_module_exists"]):
    exec(compile("from __future__ import annotations\n" + src, "peft/tuners/tuners_utils.py", "exec"), namespace)
check_target_module_exists = namespace["check_target_module_exists"]
_ExcludedModule = namespace["_ExcludedModule"]
SEQ_CLS_HEAD_NAMES = ["score", "classifier"]  # src/peft/utils/constants.py
ALL_LINEAR = "all-linear"  # INCLUDE_LINEAR_LAYERS_SHORTHAND, src/peft/utils/constants.py
assert 'SEQ_CLS_HEAD_NAMES = ["score", "classifier"]' in git("show", f"{COMMIT}:src/peft/utils/constants.py")
assert 'INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"' in git("show", f"{COMMIT}:src/peft/utils/constants.py")

# ---- architectures: every module with a 2-D .weight, with its torch class --------------------------------------
# (name, class); "head" is what the model class's get_output_embeddings() returns (None: none).


def gpt2(prefix, layers):
    mods = [(prefix + "wte", "Embedding"), (prefix + "wpe", "Embedding")]
    for i in range(layers):
        h = f"{prefix}h.{i}."
        mods += [(h + "attn.c_attn", "Conv1D"), (h + "attn.c_proj", "Conv1D")]
        mods += [(h + "mlp.c_fc", "Conv1D"), (h + "mlp.c_proj", "Conv1D")]
    return mods


def bert(layers):  # BertForPreTraining
    mods = [("bert.embeddings.word_embeddings", "Embedding"), ("bert.embeddings.position_embeddings", "Embedding")]
    mods += [("bert.embeddings.token_type_embeddings", "Embedding")]
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        mods += [(p + "attention.self.query", "Linear"), (p + "attention.self.key", "Linear")]
        mods += [(p + "attention.self.value", "Linear"), (p + "attention.output.dense", "Linear")]
        mods += [(p + "intermediate.dense", "Linear"), (p + "output.dense", "Linear")]
    mods += [("bert.pooler.dense", "Linear"), ("cls.predictions.transform.dense", "Linear")]
    mods += [("cls.predictions.decoder", "Linear"), ("cls.seq_relationship", "Linear")]
    return mods


def distilbert(layers):  # DistilBertForSequenceClassification
    mods = [("distilbert.embeddings.word_embeddings", "Embedding")]
    mods += [("distilbert.embeddings.position_embeddings", "Embedding")]
    for i in range(layers):
        p = f"distilbert.transformer.layer.{i}."
        mods += [(p + "attention." + n, "Linear") for n in ("q_lin", "k_lin", "v_lin", "out_lin")]
        mods += [(p + "ffn.lin1", "Linear"), (p + "ffn.lin2", "Linear")]
    mods += [("pre_classifier", "Linear"), ("classifier", "Linear")]
    return mods


def llama(layers):  # LlamaForCausalLM
    mods = [("model.embed_tokens", "Embedding")]
    for i in range(layers):
        p = f"model.layers.{i}."
        mods += [(p + "self_attn." + n, "Linear") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [(p + "mlp." + n, "Linear") for n in ("gate_proj", "up_proj", "down_proj")]
    mods += [("lm_head", "Linear")]
    return mods


def mixtral(layers, experts):  # MixtralForCausalLM (transformers 4.x names)
    mods = [("model.embed_tokens", "Embedding")]
    for i in range(layers):
        p = f"model.layers.{i}."
        mods += [(p + "self_attn." + n, "Linear") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [(p + "block_sparse_moe.gate", "Linear")]
        for e in range(experts):
            mods += [(f"{p}block_sparse_moe.experts.{e}.{w}", "Linear") for w in ("w1", "w2", "w3")]
    mods += [("lm_head", "Linear")]
    return mods


ARCHS = {
    "gpt2": {"modules": gpt2("", 2), "head": None},  # the hub checkpoint: no prefix, lm_head tied (no key)
    "gpt2_transformer": {"modules": gpt2("transformer.", 2), "head": None},
    "bert": {"modules": bert(2), "head": "cls.predictions.decoder"},
    "distilbert_seq_cls": {"modules": distilbert(2), "head": None},
    "llama": {"modules": llama(12), "head": "lm_head"},
    "mixtral": {"modules": mixtral(2, 2), "head": "lm_head"},
}

# ---- configs: (archs, config as adapter_config.json would hold it) -------------------------------------------
ALL = list(ARCHS)
CASES = [
    # list target_modules: exact name or "." + suffix
    (["gpt2", "gpt2_transformer"], {"target_modules": ["c_attn"]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["c_proj"]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["attn.c_proj"]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["h.0.attn.c_attn"]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["attn"]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["wte"]}),
    (["bert"], {"target_modules": ["query", "value"]}),
    (["bert"], {"target_modules": ["dense"]}),
    (["bert"], {"target_modules": ["output.dense"]}),
    (["bert"], {"target_modules": ["decoder", "seq_relationship"]}),
    (["distilbert_seq_cls"], {"target_modules": ["q_lin", "v_lin"]}),
    (["distilbert_seq_cls"], {"target_modules": ["classifier"]}),
    (["distilbert_seq_cls"], {"target_modules": ["lin"]}),
    (["llama", "mixtral"], {"target_modules": ["q_proj", "v_proj"]}),
    (["llama"], {"target_modules": ["self_attn.q_proj", "mlp.down_proj"]}),
    (["llama"], {"target_modules": ["model.layers.0.self_attn.q_proj", "lm_head"]}),
    (["llama"], {"target_modules": ["layers.1.self_attn.q_proj"]}),
    (["llama"], {"target_modules": ["embed_tokens", "lm_head"]}),
    (["llama"], {"target_modules": ["proj"]}),
    (["llama"], {"target_modules": ["Q_PROJ"]}),
    (["mixtral"], {"target_modules": ["w1", "w3"]}),
    # one string: re.fullmatch over the whole name
    (["llama", "mixtral"], {"target_modules": r".*\.(q_proj|v_proj)"}),
    (["llama"], {"target_modules": "q_proj"}),
    (["llama"], {"target_modules": r"model\.layers\.[0-3]\.self_attn\.(q|v)_proj"}),
    (["llama"], {"target_modules": r".*layers\.1\d?\.mlp\..*"}),
    (["llama"], {"target_modules": r"lm_head|.*embed_tokens"}),
    (["llama", "gpt2"], {"target_modules": r".*attn.*"}),
    (["gpt2", "gpt2_transformer"], {"target_modules": r"h\.\d+\.attn\.c_attn"}),
    (["gpt2", "gpt2_transformer"], {"target_modules": r"(?:.*\.)?c_fc"}),
    (["bert"], {"target_modules": r".*encoder\.layer\.\d+\.attention\.self\.(query|value)"}),
    (["distilbert_seq_cls"], {"target_modules": r".*\.[qkv]_lin"}),
    (["mixtral"], {"target_modules": r".*experts\.1\.w[12]"}),
    # exclude_modules
    (["llama"], {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]}),
    (["llama"], {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["q_proj"]}),
    (["llama"], {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.layers\.1[01]\..*"}),
    (["llama"], {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r"q_proj"}),
    (["llama"], {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}),
    (["llama"], {"target_modules": ["q_proj"], "exclude_modules": ["v_proj"]}),
    (["llama"], {"target_modules": r".*_proj", "exclude_modules": ["mlp.gate_proj", "up_proj", "down_proj"]}),
    (["bert"], {"target_modules": ["dense"], "exclude_modules": r".*(pooler|cls)\..*"}),
    (["distilbert_seq_cls"], {"target_modules": ["q_lin"], "exclude_modules": []}),
    (["distilbert_seq_cls"], {"target_modules": ["q_lin"], "exclude_modules": ""}),
    # modules_to_save never receives an adapter: re.match(rf"(^|.*\.){m}($|\..*)", key)
    (["llama"], {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]}),
    (["distilbert_seq_cls"], {"target_modules": ALL_LINEAR, "modules_to_save": ["classifier"]}),
    (["llama"], {"target_modules": ["q_proj"], "modules_to_save": ["layers"]}),
    (["llama"], {"target_modules": ["q_proj"], "modules_to_save": ["q_proj"]}),
    # layers_to_transform with and without layers_pattern
    (ALL, {"target_modules": ["q_proj", "c_attn", "query", "q_lin", "w1"], "layers_to_transform": 1}),
    (["llama"], {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 10]}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "model.layers"}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "la.ers"}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [1, 11], "layers_pattern": "(?:h|layers)"}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": None}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [3], "layers_pattern": ""}),
    (["llama"], {"target_modules": ["model.layers.3.self_attn.q_proj", "v_proj"], "layers_to_transform": [0]}),
    (["llama"], {"target_modules": ["q_proj"], "layers_to_transform": [99]}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["c_attn"], "layers_to_transform": [0], "layers_pattern": "h"}),
    (["gpt2", "gpt2_transformer"], {"target_modules": ["c_attn"], "layers_to_transform": [0]}),
    (["bert"], {"target_modules": ["query"], "layers_to_transform": [1], "layers_pattern": "layer"}),
    (["distilbert_seq_cls"], {"target_modules": ["q_lin"], "layers_to_transform": 0, "layers_pattern": ["layer"]}),
    (["mixtral"], {"target_modules": ["w1"], "layers_to_transform": [1]}),
    (["mixtral"], {"target_modules": ["w1"], "layers_to_transform": [1], "layers_pattern": "experts"}),
    (["llama"], {"target_modules": ["q_proj"], "exclude_modules": ["model.layers.1.self_attn.q_proj"],
                 "layers_to_transform": [1]}),
    # "all-linear": Linear and Conv1D modules but the output embedding (or the SEQ_CLS head)
    (ALL, {"target_modules": ALL_LINEAR}),
    (["llama"], {"target_modules": "ALL-Linear"}),
    (["distilbert_seq_cls"], {"target_modules": ALL_LINEAR, "task_type": "SEQ_CLS"}),
    (["llama"], {"target_modules": ALL_LINEAR, "exclude_modules": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}),
    (["llama"], {"target_modules": ALL_LINEAR, "exclude_modules": r".*\.layers\.[1-9]\d*\..*"}),
    # config errors (LoraConfig.__post_init__) and nothing selected (inject_adapter)
    (["llama"], {"target_modules": r".*q_proj", "layers_to_transform": [0]}),
    (["llama"], {"target_modules": ALL_LINEAR, "layers_to_transform": 0}),
    (["llama"], {"target_modules": r".*q_proj", "layers_pattern": "layers"}),
    (["llama"], {"target_modules": ["q_proj"], "layers_pattern": "layers"}),
    (["llama"], {"target_modules": []}),
    (["llama"], {"target_modules": ["q_proj"], "exclude_modules": r".*"}),
]


def config_of(c):
    """The LoraConfig attributes check_target_module_exists reads, as __post_init__ leaves them."""
    tm = c.get("target_modules")
    ex = c.get("exclude_modules")
    ltt = c.get("layers_to_transform")
    lp = c.get("layers_pattern")
    # config.py 1019-1029
    if isinstance(tm, str) and ltt is not None:
        return None, "layers_to_transform with a string target_modules"
    if isinstance(tm, str) and lp is not None:
        return None, "layers_pattern with a string target_modules"
    if lp and ltt is None:
        return None, "layers_pattern without layers_to_transform"
    return SimpleNamespace(
        target_modules=set(tm) if isinstance(tm, list) else tm,  # config.py 995-997
        exclude_modules=set(ex) if isinstance(ex, list) else ex,  # config.py 998-1000
        layers_to_transform=ltt,
        layers_pattern=lp,
        modules_to_save=c.get("modules_to_save"),
        target_parameters=None,
        task_type=c.get("task_type"),
    ), None


def all_linear(config, arch):
    """_maybe_include_all_linear_layers, by the modules' classes."""
    tm = config.target_modules
    if not (isinstance(tm, str) and tm.lower() == ALL_LINEAR):
        return config
    names = {n for n, cls in arch["modules"] if cls in ("Linear", "Conv1D")}
    if arch["head"] is not None:
        names.discard(arch["head"])
    elif config.task_type == "SEQ_CLS":
        top = {n for n, _ in arch["modules"]}
        for name in SEQ_CLS_HEAD_NAMES:  # getattr(model, name): a top-level module
            if name in top:
                names.discard(name)
                break
    config.target_modules = names
    return config


def select(arch, c):
    config, error = config_of(c)
    if error:
        return {"config_error": error}
    config = all_linear(config, arch)
    matched, excluded, unmatched = [], [], []
    for name, _ in arch["modules"]:
        r = check_target_module_exists(config, name)
        if isinstance(r, _ExcludedModule):
            excluded.append(name)
        elif not r:
            unmatched.append(name)
        else:
            matched.append(name)
    if matched:
        return {"selected": matched}
    # tuners_utils.py 1024-1059
    if excluded and not unmatched:
        return {"none": "all excluded"}
    if not excluded and unmatched and not config.target_modules:
        return {"none": "no target_modules"}
    if not excluded and unmatched:
        return {"none": "not found"}
    return {"none": "unmatched and excluded"}


def main():
    assert sys.version_info[:2] == (3, 11), "the oracle is Python 3.11's re"
    out = {
        "about": "PEFT's check_target_module_exists (executed from the PEFT source at the commit below) on "
        "hand-written module names; written by tests/golden/make_targets_golden.py",
        "peft_commit": COMMIT,
        "python": sys.version.split()[0],
        "architectures": {k: {"modules": [n for n, _ in v["modules"]], "head": v["head"]} for k, v in ARCHS.items()},
        "cases": [],
    }
    for archs, c in CASES:
        for a in archs:
            out["cases"].append({"arch": a, "config": c, "expected": select(ARCHS[a], c)})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"{len(out['cases'])} cases from PEFT {COMMIT[:12]} -> {os.path.relpath(OUT)}")


main()
