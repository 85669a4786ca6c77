"""Small valid inputs for every loader, built from stories260K.

make_corpus.py writes them under corpus/ as the fuzzers' seeds; the hostile-input tests
start from the same builders. A tiny model keeps stories260K's tokenizer (512 pieces, with
byte pieces) and a one-layer, 32-wide slice of its weights: it loads and generates like a
real model, and its file is small enough to damage at every byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / "tests" / "data" / "stories260K"

TINY = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32)


def stories_checkpoint():
    """stories260K's Meta checkpoint, opened (close it, or use it in a with block)."""
    from llamacpu.convert import open_checkpoint

    return open_checkpoint(STORIES / "meta")


def _array_tensor(name: str, a: np.ndarray):
    from llamacpu.convert import LazyTensor

    class ArrayTensor(LazyTensor):
        def _read_rows(self, r0, r1):
            return a[r0:r1]

    return ArrayTensor(name, a.shape, "f32", "stories260K slice")


def tiny_checkpoint(tokenizer_data: bytes = None, chat_template: str = None):
    """A one-layer model cut from stories260K's weights, as a converter Checkpoint."""
    from llamacpu.config import ModelConfig
    from llamacpu.convert import Checkpoint

    with stories_checkpoint() as ck:
        sd = {k: t.read() for k, t in ck.tensors.items()}
        tok = ck.tokenizer_data if tokenizer_data is None else tokenizer_data
        base = ck.config
    d, f, kv = TINY["dim"], TINY["ffn_dim"], TINY["n_kv_heads"] * (TINY["dim"] // TINY["n_heads"])
    cut = {"tok_embeddings": sd["tok_embeddings"][:, :d], "norm": sd["norm"][:d],
           "layers.0.attention_norm": sd["layers.0.attention_norm"][:d],
           "layers.0.wq": sd["layers.0.wq"][:d, :d], "layers.0.wk": sd["layers.0.wk"][:kv, :d],
           "layers.0.wv": sd["layers.0.wv"][:kv, :d], "layers.0.wo": sd["layers.0.wo"][:d, :d],
           "layers.0.ffn_norm": sd["layers.0.ffn_norm"][:d], "layers.0.w1": sd["layers.0.w1"][:f, :d],
           "layers.0.w2": sd["layers.0.w2"][:d, :f], "layers.0.w3": sd["layers.0.w3"][:f, :d]}
    config = ModelConfig(vocab_size=base.vocab_size, max_seq_len=256, tied_output=True, **TINY)
    tensors = {k: _array_tensor(k, np.ascontiguousarray(v, np.float32)) for k, v in cut.items()}
    return Checkpoint(config=config, tensors=tensors, tokenizer_kind="sentencepiece", tokenizer_data=tok,
                      source="stories260K slice", name="tiny", chat_template=chat_template)


def write_tiny_model(path, dtype: str = "q4_0", **kw) -> Path:
    from llamacpu.convert import convert_checkpoint

    convert_checkpoint(tiny_checkpoint(**kw), path, dtype, progress=False)
    return Path(path)


def spm_vocab(model_bytes: bytes):
    """(tokens, scores, types, processor) of a SentencePiece model, as llama.cpp lists them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
                     else 6 if sp.IsByte(i) else 1)
    return tokens, scores, types, sp


def stories_tokenizer() -> bytes:
    return (STORIES / "meta" / "tokenizer.model").read_bytes()


def tokenizer_without_eos() -> bytes:
    """stories260K's tokenizer rebuilt with no end-of-text token: a model that never stops
    on its own, for tests that must interrupt an answer."""
    from llamacpu.convert.gguf_tokenizer import build_sentencepiece_model

    tokens, scores, types, sp = spm_vocab(stories_tokenizer())
    return build_sentencepiece_model(tokens, scores, types, unk_id=sp.unk_id(), bos_id=sp.bos_id(), eos_id=-1,
                                     add_dummy_prefix=True, remove_extra_whitespaces=True)


def write_endless_model(path, dtype: str = "q8_0") -> Path:
    """stories260K with tokenizer_without_eos(): it tells stories until it is stopped."""
    from llamacpu.convert import convert_checkpoint

    with stories_checkpoint() as ck:
        ck.tokenizer_data = tokenizer_without_eos()
        convert_checkpoint(ck, path, dtype, progress=False)
    return Path(path)


def write_tiny_gguf(path) -> Path:
    """The tiny model as llama.cpp would write it (needs the gguf package)."""
    import gguf

    ck = tiny_checkpoint()
    cfg = ck.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    tokens, scores, types, sp = spm_vocab(ck.tokenizer_data)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    names = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight"}
    layer = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
             "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
    for canon, t in ck.tensors.items():
        a = t.read()
        name = names.get(canon) or f"blk.0.{layer[canon.split('.')[-1]]}.weight"
        if a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def safetensors_bytes(tensors: dict, metadata: dict = None) -> bytes:
    """A .safetensors file of float32 arrays, written by hand (the format is that simple)."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def tiny_safetensors() -> bytes:
    ck = tiny_checkpoint()
    pick = ("norm", "layers.0.wk", "layers.0.attention_norm")
    return safetensors_bytes({f"model.{k}.weight": ck.tensors[k].read()[:8] for k in pick},
                             {"format": "pt"})


def write_tiny_torch_zip(path) -> Path:
    """A small torch.save archive (needs torch): a state dict with a strided view, a half
    tensor and a nested dict, as checkpoints have them."""
    import torch

    ck = tiny_checkpoint()
    wk = torch.from_numpy(ck.tensors["layers.0.wk"].read()[:8, :8].copy())
    sd = {"layers.0.attention.wk.weight": wk, "layers.0.attention.wk.t": wk.t(),
          "norm.weight": torch.from_numpy(ck.tensors["norm"].read()[:16].copy()).half(),
          "step": 3, "extra": {"lr": 0.1}}
    torch.save(sd, str(path))
    return Path(path)
