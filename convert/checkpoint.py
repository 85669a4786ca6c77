"""Opening a source checkpoint (Meta or Hugging Face LLaMA) in one canonical form.

Whatever the layout, a Checkpoint holds the hyperparameters as a ModelConfig and the weights
as lazily readable tensors under canonical names, 2-D weights as [out_features, in_features]
and q/k rows in Meta's interleaved-pair RoPE order. Every disagreement between the config
files and the tensors is reported here, as a one-line CheckpointError naming the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llamacpu.config import ModelConfig
from llamacpu.errors import CheckpointError, LlamaCPUError, ModelFileError, ModelNotFoundError

from .safetensors import read_safetensors
from .tensor import ITEMSIZE, ConcatTensor, LazyTensor, RowPermutedTensor, TensorFile, \
    unrotate_half_perm
from .torchzip import read_torch_zip

MAX_JSON_BYTES = 64 << 20

EXPECTED_LAYOUT = ("expected a Meta checkpoint folder (params.json + consolidated.NN.pth) or a "
                   "Hugging Face LlamaForCausalLM folder (config.json + model.safetensors or "
                   "pytorch_model.bin)")

# Per-layer canonical names, in a fixed order.
LAYER_TENSORS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")

# Meta names -> (canonical name, dim the model-parallel shards split; None: replicated).
_META_GLOBAL = {
    "tok_embeddings.weight": ("tok_embeddings", 1),
    "norm.weight": ("norm", None),
    "output.weight": ("output", 0),
}
_META_LAYER = {
    "attention_norm.weight": ("attention_norm", None),
    "attention.wq.weight": ("wq", 0),
    "attention.wk.weight": ("wk", 0),
    "attention.wv.weight": ("wv", 0),
    "attention.wo.weight": ("wo", 1),
    "ffn_norm.weight": ("ffn_norm", None),
    "feed_forward.w1.weight": ("w1", 0),
    "feed_forward.w2.weight": ("w2", 1),
    "feed_forward.w3.weight": ("w3", 0),
}
_META_IGNORED = {"rope.freqs"}

_HF_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm",
    "lm_head.weight": "output",
}
_HF_LAYER = {
    "input_layernorm.weight": "attention_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w1",
    "mlp.down_proj.weight": "w2",
    "mlp.up_proj.weight": "w3",
}
# Old transformers versions saved the RoPE frequencies as a buffer; they are recomputed.
_HF_IGNORED_LAYER = {"self_attn.rotary_emb.inv_freq"}

# Meta's reference code applies this scaling when params.json sets use_scaled_rope.
_META_SCALED_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_REQUIRED = object()


@dataclass
class Checkpoint:
    """An opened source checkpoint. ``tensors`` maps canonical names to lazy tensors (each
    tensor's own ``name`` is what the source file calls it). Close it when done."""

    config: ModelConfig
    tensors: dict
    tokenizer_kind: str  # "sentencepiece" or "hf-json"
    tokenizer_data: bytes
    source: str
    name: str
    files: list = field(default_factory=list, repr=False)
    # The model's own chat template (Jinja), when the source carries one.
    chat_template: Optional[str] = None
    # What the tokenizer data alone does not say: bos_id, eos_id, add_bos, end-of-turn tokens.
    tokenizer_info: dict = field(default_factory=dict)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def canonical_names(n_layers: int, tied_output: bool) -> list:
    """Every canonical tensor name of a model, in file order."""
    names = ["tok_embeddings", "norm"] + ([] if tied_output else ["output"])
    for i in range(n_layers):
        names += [f"layers.{i}.{t}" for t in LAYER_TENSORS]
    return names


def open_checkpoint(path) -> Checkpoint:
    """Open a Meta or Hugging Face LLaMA checkpoint folder."""
    files: list = []
    try:
        return _open(Path(path), files)
    except BaseException as e:
        for f in files:
            f.close()
        if isinstance(e, LlamaCPUError) or not isinstance(e, Exception):
            raise
        # A safety net: whatever slipped through still reads as one line.
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def _open(path: Path, files: list) -> Checkpoint:
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory; {EXPECTED_LAYOUT}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; {EXPECTED_LAYOUT}")
    has_shards = any(_META_SHARD.fullmatch(p.name) for p in path.iterdir())
    if (path / "params.json").is_file() and (has_shards or not (path / "config.json").is_file()):
        return _open_meta(path, files)
    if (path / "config.json").is_file():
        return _open_hf(path, files)
    if has_shards:
        raise CheckpointError(f"{path}: has consolidated.NN.pth shards but no params.json")
    raise CheckpointError(f"{path}: not a checkpoint; {EXPECTED_LAYOUT}")


# ----------------------------------------------------------------------------- Meta

_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def _open_meta(folder: Path, files: list) -> Checkpoint:
    params_path = folder / "params.json"
    params = _read_json(params_path)
    where = str(params_path)
    shard_paths = _meta_shards(folder)
    tok_path = _find_file(folder, "tokenizer.model", also_parent=True)
    if tok_path is None:
        raise CheckpointError(f"{folder}: no tokenizer.model in the folder or its parent")
    tok_data, n_pieces, bos, eos = _read_sentencepiece(tok_path)

    shards = []
    for p in shard_paths:
        tf = read_torch_zip(p)
        files.append(tf)
        shards.append(_meta_canonical(tf))
    found = _merge_meta_shards(shards, shard_paths)

    dim = _get_int(params, "dim", where)
    n_layers = _get_int(params, "n_layers", where)
    n_heads = _get_int(params, "n_heads", where)
    n_kv_heads = _get_int(params, "n_kv_heads", where, default=n_heads)
    vocab_size = _get_int(params, "vocab_size", where, default=-1, minimum=-1)
    if vocab_size == 0:
        raise CheckpointError(f"{where}: vocab_size must be positive or -1")
    if vocab_size == -1:
        vocab_size = n_pieces
    multiple_of = _get_int(params, "multiple_of", where, default=256)
    multiplier = _get_number(params, "ffn_dim_multiplier", where, default=None)
    if dim % n_heads:
        raise CheckpointError(f"{where}: dim={dim} is not a multiple of n_heads={n_heads}")
    _check_layers(found, n_layers, where, "n_layers")
    _check_present(found, n_layers, "output" not in found, str(folder), _meta_name)

    ffn_dim = found["layers.0.w1"].shape[0]
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    hidden = multiple_of * math.ceil(hidden / multiple_of)
    if ffn_dim != hidden:
        raise CheckpointError(
            f"{where}: layers.0.feed_forward.w1.weight has {ffn_dim} rows, but dim={dim}, "
            f"multiple_of={multiple_of}, ffn_dim_multiplier={multiplier} give a hidden size "
            f"of {hidden}")

    rope_scaling = dict(_META_SCALED_ROPE) if params.get("use_scaled_rope") else None
    config = _make_config(where, dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
        vocab_size=vocab_size, head_dim=dim // n_heads,
        norm_eps=_get_number(params, "norm_eps", where, default=1e-5),
        rope_theta=_get_number(params, "rope_theta", where, default=10000.0),
        max_seq_len=_get_int(params, "max_seq_len", where, default=2048),
        tied_output="output" not in found, rope_scaling=rope_scaling, bos_id=bos, eos_id=eos))
    _check_tokenizer_fits(tok_path, n_pieces, config)
    _check_shapes(found, config, where)
    n = len(shard_paths)
    return Checkpoint(config=config, tensors=_ordered(found, config),
                      tokenizer_kind="sentencepiece", tokenizer_data=tok_data,
                      source=f"meta, {n} shard{'s' if n > 1 else ''}", name=folder.resolve().name,
                      files=files)


def _meta_shards(folder: Path) -> list:
    numbered: dict = {}
    for p in folder.iterdir():
        m = _META_SHARD.fullmatch(p.name)
        if m:
            i = int(m.group(1))
            if i in numbered:
                raise CheckpointError(f"{folder}: both {numbered[i].name} and {p.name} claim shard {i}")
            numbered[i] = p
    if not numbered:
        raise CheckpointError(f"{folder}: params.json but no consolidated.NN.pth shards")
    missing = [i for i in range(max(numbered) + 1) if i not in numbered]
    if missing:
        found = ", ".join(numbered[i].name for i in sorted(numbered))
        raise CheckpointError(f"{folder}: missing shard consolidated.{missing[0]:02d}.pth "
                              f"(found {found})")
    return [numbered[i] for i in sorted(numbered)]


def _meta_canonical(tf: TensorFile) -> dict:
    """{canonical name: (tensor, split dim)} of one Meta shard."""
    out = {}
    for name, t in tf.tensors.items():
        if name in _META_IGNORED:
            continue
        if name in _META_GLOBAL:
            canon, dim = _META_GLOBAL[name]
        else:
            layer, rest = _split_layer(name, "layers.")
            if layer is None or rest not in _META_LAYER:
                raise CheckpointError(f"{tf.path}: unexpected tensor {name} (not a LLaMA weight)")
            canon, dim = _META_LAYER[rest]
            canon = f"layers.{layer}.{canon}"
        _check_dtype(t)
        out[canon] = (t, dim)
    return out


def _merge_meta_shards(shards: list, paths: list) -> dict:
    first = shards[0]
    for path, shard in zip(paths[1:], shards[1:]):
        for a, b, owner in ((shard, first, paths[0]), (first, shard, path)):
            extra = sorted(set(a) - set(b))
            if extra:
                raise CheckpointError(f"{owner}: lacks {a[extra[0]][0].name}, which the "
                                      "other shards hold")
    merged = {}
    for canon, (t, dim) in first.items():
        parts = [shard[canon][0] for shard in shards]
        if len(parts) == 1:
            merged[canon] = t
        elif dim is None:
            for path, p in zip(paths, parts):
                if p.shape != t.shape:
                    raise CheckpointError(f"{path}: replicated tensor {p.name} has shape "
                                          f"{list(p.shape)} but {list(t.shape)} in shard 0")
            merged[canon] = t
        else:
            merged[canon] = ConcatTensor(t.name, parts, dim)
    return merged


# ----------------------------------------------------------------------------- Hugging Face

_HF_WEIGHTS = (
    ("model.safetensors", False, read_safetensors, "safetensors"),
    ("model.safetensors.index.json", True, read_safetensors, "safetensors"),
    ("pytorch_model.bin", False, read_torch_zip, "pytorch_model.bin"),
    ("pytorch_model.bin.index.json", True, read_torch_zip, "pytorch_model.bin"),
)


def _open_hf(folder: Path, files: list) -> Checkpoint:
    cfg_path = folder / "config.json"
    conf = _read_json(cfg_path)
    where = str(cfg_path)
    archs = conf.get("architectures")
    archs = archs if isinstance(archs, list) else []
    if "LlamaForCausalLM" not in archs and conf.get("model_type") != "llama":
        what = ", ".join(map(str, archs)) or f"model_type {conf.get('model_type')!r}"
        raise CheckpointError(f"{where}: architecture {what} is not supported "
                              "(only LlamaForCausalLM)")
    tok_kind, tok_data, n_pieces = _hf_tokenizer(folder)
    raw, source = _hf_weights(folder, files)
    found = _hf_canonical(raw)

    dim = _get_int(conf, "hidden_size", where)
    n_layers = _get_int(conf, "num_hidden_layers", where)
    n_heads = _get_int(conf, "num_attention_heads", where)
    n_kv_heads = _get_int(conf, "num_key_value_heads", where, default=n_heads)
    head_dim = _get_int(conf, "head_dim", where, default=0, minimum=0)
    if not head_dim:
        if dim % n_heads:
            raise CheckpointError(f"{where}: hidden_size={dim} is not a multiple of "
                                  f"num_attention_heads={n_heads}")
        head_dim = dim // n_heads
    tied = bool(conf.get("tie_word_embeddings", False)) or "output" not in found
    if tied:
        found.pop("output", None)
    _check_layers(found, n_layers, where, "num_hidden_layers")
    _check_present(found, n_layers, tied, str(folder), _hf_name)

    ffn_dim = found["layers.0.w1"].shape[0]
    declared = _get_int(conf, "intermediate_size", where, default=ffn_dim)
    if declared != ffn_dim:
        raise CheckpointError(f"{where}: intermediate_size={declared} but "
                              f"{found['layers.0.w1'].name} has {ffn_dim} rows")
    vocab_size = _get_int(conf, "vocab_size", where, default=found["tok_embeddings"].shape[0])

    extra = {}
    bos = _token_id(conf, "bos_token_id", where, 1)
    eos_raw = conf.get("eos_token_id", 2)
    if isinstance(eos_raw, list):
        if not eos_raw or not all(_is_int(x) for x in eos_raw):
            raise CheckpointError(f"{where}: eos_token_id must be an integer or a non-empty list "
                                  f"of integers, got {eos_raw!r}")
        extra["eos_ids"] = list(eos_raw)
        eos = eos_raw[0]
    else:
        eos = _token_id(conf, "eos_token_id", where, 2)

    rope_theta, rope_scaling = _hf_rope(conf, where)
    config = _make_config(where, dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
        vocab_size=vocab_size, head_dim=head_dim,
        norm_eps=_get_number(conf, "rms_norm_eps", where, default=1e-6),
        rope_theta=rope_theta,
        max_seq_len=_get_int(conf, "max_position_embeddings", where, default=2048),
        tied_output=tied, rope_scaling=rope_scaling, bos_id=bos, eos_id=eos, extra=extra))
    if tok_kind == "sentencepiece":
        _check_tokenizer_fits(folder / "tokenizer.model", n_pieces, config)
    _check_shapes(found, config, where)
    for i in range(n_layers):
        for canon, heads in ((f"layers.{i}.wq", n_heads), (f"layers.{i}.wk", n_kv_heads)):
            t = found[canon]
            found[canon] = RowPermutedTensor(t.name, t, unrotate_half_perm(heads, head_dim))
    chat_template, tok_info = _hf_tokenizer_config(folder, tok_kind, tok_data)
    tok_info.setdefault("bos_id", bos)
    tok_info.setdefault("eos_id", eos)
    if "eos_ids" in extra:
        tok_info.setdefault("eot_ids", [i for i in extra["eos_ids"] if i != tok_info["eos_id"]])
    return Checkpoint(config=config, tensors=_ordered(found, config), tokenizer_kind=tok_kind,
                      tokenizer_data=tok_data, source=source, name=folder.resolve().name,
                      files=files, chat_template=chat_template, tokenizer_info=tok_info)


def _hf_weights(folder: Path, files: list) -> tuple:
    """(tensors by HF name, description) from the first weight layout the folder has."""
    for fname, is_index, reader, label in _HF_WEIGHTS:
        path = folder / fname
        if not path.is_file():
            continue
        if not is_index:
            tf = reader(path)
            files.append(tf)
            return dict(tf.tensors), f"hf, {fname}"
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path}: no weight_map object")
        opened: dict = {}
        tensors = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{path}: weight_map names a bad file {shard!r} for {name}")
            if shard not in opened:
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{path}: shard {shard} (holding {name}) is missing")
                opened[shard] = tf = reader(folder / shard)
                files.append(tf)
            if name not in opened[shard].tensors:
                raise CheckpointError(f"{folder / shard}: lacks {name}, which {fname} places there")
            tensors[name] = opened[shard].tensors[name]
        n = len(opened)
        return tensors, f"hf, {n} {label} shard{'s' if n > 1 else ''}"
    raise CheckpointError(f"{folder}: config.json but no model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or "
                          "pytorch_model.bin.index.json")


def _hf_canonical(raw: dict) -> dict:
    out = {}
    for name, t in raw.items():
        if name in _HF_GLOBAL:
            canon = _HF_GLOBAL[name]
        else:
            layer, rest = _split_layer(name, "model.layers.")
            if layer is not None and rest in _HF_IGNORED_LAYER:
                continue
            if layer is None or rest not in _HF_LAYER:
                raise CheckpointError(f"{t.where}: unexpected tensor {name} (not a LlamaForCausalLM "
                                      "weight)")
            canon = f"layers.{layer}.{_HF_LAYER[rest]}"
        _check_dtype(t)
        out[canon] = t
    return out


def _hf_rope(conf: dict, where: str) -> tuple:
    # Newer transformers nest the RoPE settings as rope_parameters.
    params = conf.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = conf["rope_theta"] if conf.get("rope_theta") is not None else params.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise CheckpointError(f"{where}: rope_theta must be a number, got {theta!r}")
    scaling = conf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
    return float(theta), scaling


def _hf_tokenizer(folder: Path) -> tuple:
    sp = folder / "tokenizer.model"
    if sp.is_file():
        data, n_pieces, _, _ = _read_sentencepiece(sp)
        return "sentencepiece", data, n_pieces
    js = folder / "tokenizer.json"
    if js.is_file():
        _read_json(js)
        return "hf-json", _read_bytes(js, MAX_JSON_BYTES), None
    raise CheckpointError(f"{folder}: no tokenizer.model or tokenizer.json")


def _hf_tokenizer_config(folder: Path, tok_kind: str, tok_data: bytes) -> tuple:
    """(chat template or None, tokenizer info) from tokenizer_config.json and
    chat_template.jinja, when the folder has them."""
    info: dict = {}
    template = None
    cfg_path = folder / "tokenizer_config.json"
    conf = _read_json(cfg_path) if cfg_path.is_file() else {}
    where = str(cfg_path)
    raw = conf.get("chat_template")
    if isinstance(raw, list):
        # Several named templates: the "default" one is the chat template.
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        raw = named.get("default", next(iter(named.values()), None))
    if raw is not None and not isinstance(raw, str):
        raise CheckpointError(f"{where}: chat_template must be a string, got {type(raw).__name__}")
    template = raw or None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = _read_bytes(jinja, MAX_JSON_BYTES).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{jinja}: not UTF-8 text") from None
    if "add_bos_token" in conf:
        if not isinstance(conf["add_bos_token"], bool):
            raise CheckpointError(f"{where}: add_bos_token must be true or false")
        info["add_bos"] = conf["add_bos_token"]
    lookup = _token_lookup(tok_kind, tok_data)
    for role in ("bos", "eos"):
        tok = conf.get(f"{role}_token")
        if isinstance(tok, dict):  # an AddedToken written out as an object
            tok = tok.get("content")
        if tok is None:
            continue
        if not isinstance(tok, str):
            raise CheckpointError(f"{where}: {role}_token must be a string, got {tok!r}")
        info[f"{role}_token"] = tok
        tid = lookup(tok)
        if tid is not None:
            info[f"{role}_id"] = tid
    return template, info


def _token_lookup(tok_kind: str, tok_data: bytes):
    """A function from a token's text to its id (None if the tokenizer lacks it)."""
    if tok_kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=tok_data)

        def sp_lookup(piece):
            i = sp.PieceToId(piece)
            return i if sp.IdToPiece(i) == piece else None
        return sp_lookup
    tj = json.loads(tok_data.decode("utf-8"))
    tj = tj if isinstance(tj, dict) else {}
    table = {}
    model = tj.get("model")
    if isinstance(model, dict) and isinstance(model.get("vocab"), dict):
        table.update({k: v for k, v in model["vocab"].items() if _is_int(v)})
    added = tj.get("added_tokens")
    for t in added if isinstance(added, list) else []:
        if isinstance(t, dict) and isinstance(t.get("content"), str) and _is_int(t.get("id")):
            table[t["content"]] = t["id"]
    return table.get


# ----------------------------------------------------------------------------- checks


def _split_layer(name: str, prefix: str) -> tuple:
    """(layer index, rest) for "<prefix>N.rest"; (None, None) otherwise."""
    m = re.fullmatch(re.escape(prefix) + r"(0|[1-9][0-9]{0,5})\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


def _check_dtype(t: LazyTensor) -> None:
    if t.dtype not in ITEMSIZE:
        raise CheckpointError(f"{t.where}: tensor {t.name} is stored as {t.dtype}; only float32, "
                              "float16 and bfloat16 weights can be converted")


def _check_layers(found: dict, n_layers: int, where: str, field_name: str) -> None:
    present = {int(k.split(".")[1]) for k in found if k.startswith("layers.")}
    if present and max(present) >= n_layers:
        raise CheckpointError(f"{where}: {field_name}={n_layers}, but the checkpoint has layers up "
                              f"to {max(present)}")


def _check_present(found: dict, n_layers: int, tied: bool, where: str, source_name) -> None:
    for canon in canonical_names(n_layers, tied):
        if canon not in found:
            raise CheckpointError(f"{where}: the checkpoint lacks tensor {source_name(canon)} "
                                  f"({canon})")


def _meta_name(canon: str) -> str:
    layer, rest = _split_layer(canon, "layers.")
    table = _META_GLOBAL if layer is None else _META_LAYER
    name = next(k for k, (c, _) in table.items() if c == (canon if layer is None else rest))
    return name if layer is None else f"layers.{layer}.{name}"


def _hf_name(canon: str) -> str:
    layer, rest = _split_layer(canon, "layers.")
    table = _HF_GLOBAL if layer is None else _HF_LAYER
    name = next(k for k, c in table.items() if c == (canon if layer is None else rest))
    return name if layer is None else f"model.layers.{layer}.{name}"


def _check_shapes(found: dict, c: ModelConfig, where: str) -> None:
    d, q, kv, f, v = c.dim, c.q_dim, c.kv_dim, c.ffn_dim, c.vocab_size
    rules = {
        "tok_embeddings": ((v, d), "vocab_size x dim"),
        "output": ((v, d), "vocab_size x dim"),
        "norm": ((d,), "dim"),
        "attention_norm": ((d,), "dim"),
        "ffn_norm": ((d,), "dim"),
        "wq": ((q, d), "n_heads*head_dim x dim"),
        "wk": ((kv, d), "n_kv_heads*head_dim x dim"),
        "wv": ((kv, d), "n_kv_heads*head_dim x dim"),
        "wo": ((d, q), "dim x n_heads*head_dim"),
        "w1": ((f, d), "ffn_dim x dim"),
        "w2": ((d, f), "dim x ffn_dim"),
        "w3": ((f, d), "ffn_dim x dim"),
    }
    for canon, t in found.items():
        shape, rule = rules[canon.rsplit(".", 1)[-1]]
        if t.shape != shape:
            raise CheckpointError(f"{where}: {t.name} has shape {list(t.shape)}, but the config "
                                  f"implies {list(shape)} ({rule})")


def _make_config(where: str, fields: dict) -> ModelConfig:
    try:
        return ModelConfig(**fields).validate(where)
    except ModelFileError as e:
        raise CheckpointError(str(e)) from None


def _ordered(found: dict, config: ModelConfig) -> dict:
    return {k: found[k] for k in canonical_names(config.n_layers, config.tied_output)}


# ----------------------------------------------------------------------------- files


def _find_file(folder: Path, name: str, also_parent: bool = False) -> Optional[Path]:
    for d in (folder, folder.resolve().parent) if also_parent else (folder,):
        if (d / name).is_file():
            return d / name
    return None


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than {limit >> 20} MiB")
    return data


def _read_json(path: Path) -> dict:
    data = _read_bytes(path, MAX_JSON_BYTES)
    try:
        obj = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, "
                              f"column {e.colno})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_sentencepiece(path: Path) -> tuple:
    """(bytes, piece count, bos id, eos id) of a SentencePiece model file."""
    import sentencepiece

    data = _read_bytes(path, 256 << 20)
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        return data, sp.get_piece_size(), sp.bos_id(), sp.eos_id()
    except Exception as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({str(e).strip() or type(e).__name__})"
                              .replace("\n", " ")) from None


def _check_tokenizer_fits(path: Path, n_pieces: int, config: ModelConfig) -> None:
    if n_pieces > config.vocab_size:
        raise CheckpointError(f"{path}: has {n_pieces} pieces but the model's vocab_size is "
                              f"{config.vocab_size}")


# ----------------------------------------------------------------------------- JSON fields


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get_int(d: dict, key: str, where: str, default=_REQUIRED, minimum: int = 1) -> int:
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{where}: lacks {key}")
        return default
    if not _is_int(v) or v < minimum:
        raise CheckpointError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _get_number(d: dict, key: str, where: str, default):
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CheckpointError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def _token_id(conf: dict, key: str, where: str, default: int) -> int:
    if key not in conf:
        return default
    v = conf[key]
    if v is None:
        return -1
    if not _is_int(v):
        raise CheckpointError(f"{where}: {key} must be an integer, got {v!r}")
    return v
