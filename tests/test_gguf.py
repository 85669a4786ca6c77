"""GGUF input: parsing, dequantization, hyperparameters, hostile files, and the q/k layout.

The GGUF files here are written by the tests themselves with the `gguf` package (llama.cpp's
own writer) from stories260K's weights, the way llama.cpp's converter writes a LLaMA model;
malformed ones are built byte by byte with the small writer below, which can also write what
the gguf package refuses to (duplicate names, bad offsets, huge counts).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import asset

gguf = pytest.importorskip("gguf")

from llamacpu.convert import open_checkpoint, open_source  # noqa: E402
from llamacpu.convert.gguf import (GGML_TYPES, dequantize_blocks, open_gguf,  # noqa: E402
                                   read_gguf, read_gguf_tokenizer)
from llamacpu.errors import CheckpointError, LlamaCPUError, ModelFileError, ModelNotFoundError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from seeds import spm_vocab  # noqa: E402  (the fuzz seeds' GGUF writer lists vocabularies the same way)

Q = gguf.GGMLQuantizationType

# Canonical names -> GGUF names (llama.cpp's tensor names for the "llama" architecture).
GGUF_NAMES = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
              "output": "output.weight"}
LAYER_NAMES = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
               "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
               "w3": "ffn_up"}


def gguf_name(canon: str) -> str:
    if canon in GGUF_NAMES:
        return GGUF_NAMES[canon]
    _, i, t = canon.split(".")
    return f"blk.{i}.{LAYER_NAMES[t]}.weight"


# ----------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="module")
def stories():
    """stories260K's Meta-layout weights {canonical name: float32 array} and its config."""
    with open_checkpoint(asset("stories260K/meta")) as ck:
        return {k: t.read() for k, t in ck.tensors.items()}, ck.config, ck.tokenizer_data


def add_hparams(w, cfg, **over):
    w.add_context_length(over.get("context_length", cfg.max_seq_len))
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(over.get("rope_theta", cfg.rope_theta))
    w.add_rope_dimension_count(over.get("rope_dims", cfg.head_dim))
    w.add_vocab_size(cfg.vocab_size)


def add_spm_tokenizer(w, model_bytes: bytes):
    tokens, scores, types, sp = spm_vocab(model_bytes)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # stories260K's tokenizer.model keeps SentencePiece's defaults: a dummy prefix, and extra
    # whitespace removed (llama.cpp's converter copies both from normalizer_spec).
    w.add_add_space_prefix(True)
    w.add_remove_extra_whitespaces(True)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())


def quantized(a: np.ndarray, qtype) -> np.ndarray:
    """a in qtype as gguf stores it (F32 stays float32); rows that do not fill whole blocks
    stay F32, as llama.cpp's quantizer leaves them in a float type."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.ndim == 1 or a.shape[-1] % block:
        return a.astype(np.float32)
    if qtype == Q.BF16:
        return gguf.quants.quantize(a, qtype)
    return gguf.quants.quantize(a.astype(np.float32), qtype)


def write_stories(path, stories, qtype=Q.F32, *, drop=(), extra=None, tokenizer=True, arch="llama",
                  weights=None, more_tensors=None, **over):
    """stories260K as llama.cpp writes a LLaMA GGUF; returns {gguf name: (stored array, type)}.
    more_tensors: {gguf name: float32 array} written as they are after the model's."""
    sd, cfg, tok = stories
    weights = sd if weights is None else weights
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, cfg, **over)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    if tokenizer:
        add_spm_tokenizer(w, tok)
    stored = {}
    for canon, a in weights.items():
        name = gguf_name(canon)
        if name in drop:
            continue
        data = quantized(a, qtype)
        t = qtype if data.dtype != np.float32 else Q.F32
        w.add_tensor(name, data, raw_dtype=t)
        stored[name] = (data, t)
    for name, a in (more_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def one_line(e: BaseException, path) -> str:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ----------------------------------------------------------------------------- every type

FILE_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda t: t.name)
def test_open_each_type(tmp_path, stories, qtype):
    sd, cfg, _ = stories
    path = tmp_path / "m.gguf"
    stored = write_stories(path, stories, qtype)
    with open_gguf(path) as ck:
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "head_dim",
                  "max_seq_len", "tied_output", "bos_id", "eos_id", "rope_scaling"):
            assert getattr(ck.config, f) == getattr(cfg, f), f
        assert ck.config.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-7)
        assert ck.config.rope_theta == cfg.rope_theta
        assert list(ck.tensors) == list(sd), "canonical names, in file order"
        assert ck.tokenizer_kind == "sentencepiece" and ck.name == "m"
        for canon, t in ck.tensors.items():
            data, t_type = stored[gguf_name(canon)]
            expect = gguf.quants.dequantize(data, t_type).reshape(sd[canon].shape)
            got = t.read()
            assert t.shape == sd[canon].shape and t.ggml_type == t_type.name
            assert got.dtype == np.float32 and np.array_equal(got, expect), canon
            if t_type == Q.F32:
                assert np.array_equal(got, sd[canon])
            # Any row range reads the same values as the whole tensor.
            n = t.nrows
            assert np.array_equal(t.read_rows(n // 3, n // 3 + 2), got[n // 3:n // 3 + 2])
        # Quantization error stays that of the type (a wrong layout would be far off).
        emb = ck.tensors["tok_embeddings"].read()
        tol = {"Q4_0": 0.2, "Q4_1": 0.2, "Q5_0": 0.1, "Q5_1": 0.1}.get(qtype.name, 0.02)
        assert np.abs(emb - sd["tok_embeddings"]).max() < tol * np.abs(sd["tok_embeddings"]).max()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_read_blocks_is_lossless(tmp_path, stories, qtype):
    path = tmp_path / "m.gguf"
    stored = write_stories(path, stories, qtype)
    with open_gguf(path) as ck:
        t = ck.tensors["layers.1.wq"]
        raw, _ = stored[t.name]
        b = t.read_blocks(0, t.nrows)
        n, k = t.shape
        # Packing the values back gives exactly the bytes in the file.
        d = b["d"].astype("<u2").view(np.uint8).reshape(n, k // 32, 2)
        if qtype == Q.Q8_0:
            assert b["q"].dtype == np.int8 and b["q"].shape == (n, k)
            qs = b["q"].view(np.uint8).reshape(n, k // 32, 32)
            blocks = np.concatenate([d, qs], axis=2)
        else:
            assert b["q"].dtype == np.uint8 and b["q"].shape == (n, k) and b["q"].max() <= 15
            q = b["q"].reshape(n, k // 32, 32)
            qs = q[..., :16] | (q[..., 16:] << 4)
            head = [d] if qtype == Q.Q4_0 else [d, b["m"].astype("<u2").view(np.uint8).reshape(n, k // 32, 2)]
            blocks = np.concatenate(head + [qs], axis=2)
        assert np.array_equal(blocks.reshape(raw.shape), raw)
        # ... and the documented formula gives what read_rows does.
        dq = b["d"].view(np.float16).astype(np.float32)[:, :, None]
        qf = b["q"].reshape(n, k // 32, 32).astype(np.float32)
        vals = {"Q4_0": lambda: (qf - 8) * dq, "Q8_0": lambda: qf * dq,
                "Q4_1": lambda: qf * dq + b["m"].view(np.float16).astype(np.float32)[:, :, None]}[qtype.name]()
        assert np.array_equal(vals.reshape(n, k), t.read())
        part = t.read_blocks(3, 5)
        assert np.array_equal(part["q"], b["q"][3:5]) and np.array_equal(part["d"], b["d"][3:5])
        with pytest.raises(ValueError):
            ck.tensors["norm"].read_blocks(0, 1)


def random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """Random blocks with finite fp16 scales (the rest of each block is any bytes)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = lambda: rng.uniform(-2, 2, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)  # noqa: E731
    for lo in {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}.get(qtype.name, []):
        raw[:, lo:lo + 2] = scale()
    if qtype in (Q.F16, Q.BF16, Q.F32):
        vals = rng.standard_normal(n_blocks * block).astype(np.float32)
        return gguf.quants.quantize(vals, qtype).view(np.uint8).reshape(n_blocks, size)
    return raw


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                                   Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_dequantizers_match_gguf(qtype):
    rng = np.random.default_rng(qtype.value)
    raw = random_blocks(qtype, 300, rng)
    got = dequantize_blocks(qtype.name, raw)
    expect = gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(got.shape)
    assert got.dtype == np.float32
    assert np.array_equal(got, expect, equal_nan=True)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_k_quant_tensor_in_file(tmp_path, qtype):
    # The gguf package cannot quantize K-quants, so the file holds hand-built blocks.
    rng = np.random.default_rng(7)
    rows, cols = 6, 512
    raw = random_blocks(qtype, rows * cols // 256, rng).reshape(rows, -1)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with read_gguf(tmp_path / "k.gguf") as gf:
        t = gf.tensors["blk.0.attn_q.weight"]
        assert t.shape == (rows, cols) and t.ggml_type == qtype.name
        expect = gguf.quants.dequantize(raw, qtype)
        assert np.array_equal(t.read(), expect)
        assert np.array_equal(t.read_rows(2, 5), expect[2:5])


def test_version_2_reads_like_3(tmp_path, stories):
    path = tmp_path / "v2.gguf"
    write_stories(path, stories, Q.Q8_0)
    data = bytearray(path.read_bytes())
    assert data[4:8] == struct.pack("<I", 3)
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout (v3 only allows big endian)
    path.write_bytes(bytes(data))
    with open_gguf(path) as ck:
        assert ck.source.startswith("gguf v2") and ck.config.dim == stories[1].dim
        assert np.array_equal(ck.tensors["layers.0.wv"].read(),
                              gguf.quants.dequantize(gguf.quants.quantize(stories[0]["layers.0.wv"], Q.Q8_0), Q.Q8_0))


def test_untied_output_and_alignment(tmp_path, stories):
    sd, cfg, _ = stories
    weights = dict(sd, output=sd["tok_embeddings"] * 0.5)
    path = tmp_path / "untied.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    add_hparams(w, cfg)
    add_spm_tokenizer(w, stories[2])
    for canon, a in weights.items():
        w.add_tensor(gguf_name(canon), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_gguf(path) as ck:
        assert not ck.config.tied_output and "output" in ck.tensors
        assert np.array_equal(ck.tensors["output"].read(), weights["output"])
        assert np.array_equal(ck.tensors["layers.4.w2"].read(), sd["layers.4.w2"])


# ----------------------------------------------------------------------------- q/k layout


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv=None) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py: Hugging Face's rotate-half
    q/k rows back to interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.fixture(scope="module")
def hf_as_llama_cpp_writes(stories):
    """stories260K's Hugging Face weights, canonical names, with q/k rows as llama.cpp's
    converter leaves them (un-permuted to Meta order)."""
    from llamacpu.convert.safetensors import read_safetensors

    sd, cfg, _ = stories
    hf_names = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm"}
    parts = {"input_layernorm": "attention_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk",
             "self_attn.v_proj": "wv", "self_attn.o_proj": "wo", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "w1", "mlp.down_proj": "w2", "mlp.up_proj": "w3"}
    for i in range(cfg.n_layers):
        for hf, canon in parts.items():
            hf_names[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{canon}"
    out = {}
    with read_safetensors(asset("stories260K/hf/model.safetensors")) as tf:
        for name, t in tf.tensors.items():
            a = t.read()
            canon = hf_names[name]
            if canon.endswith(".wq"):
                a = llama_cpp_permute(a, cfg.n_heads, cfg.n_heads)
            elif canon.endswith(".wk"):
                a = llama_cpp_permute(a, cfg.n_heads, cfg.n_kv_heads)
            out[canon] = a
    return {k: out[k] for k in sd}


def test_llama_cpp_qk_rows_are_meta_order(tmp_path, stories, hf_as_llama_cpp_writes):
    """llama.cpp's converter turns HF q/k rows back into Meta's order, which our runtime uses:
    the GGUF tensors equal the Meta checkpoint's exactly, with no permutation on our side."""
    sd = stories[0]
    path = tmp_path / "from-hf.gguf"
    write_stories(path, stories, weights=hf_as_llama_cpp_writes)
    with open_gguf(path) as ck:
        for canon, t in ck.tensors.items():
            assert np.array_equal(t.read(), sd[canon]), canon
    # Without llama.cpp's permutation the weights would differ: the check can fail.
    from llamacpu.convert.safetensors import read_safetensors

    with read_safetensors(asset("stories260K/hf/model.safetensors")) as tf:
        assert not np.array_equal(tf.tensors["model.layers.0.self_attn.q_proj.weight"].read(),
                                  sd["layers.0.wq"])


def test_gguf_model_logits_match_reference(tmp_path, stories, hf_as_llama_cpp_writes):
    """End to end: GGUF (as llama.cpp writes it from HF weights) -> llamacpu file -> logits,
    against the independent float64 Hugging Face-convention reference forward pass."""
    reference = pytest.importorskip("reference")
    from llamacpu import Llama
    from llamacpu.convert import convert_checkpoint

    gg = tmp_path / "m.gguf"
    write_stories(gg, stories, weights=hf_as_llama_cpp_writes)
    out = tmp_path / "m.bin"
    with open_source(gg) as ck:
        convert_checkpoint(ck, out, "f32", progress=False)
    toks = [1, 403, 407, 261, 378, 300, 42, 500]
    with Llama(str(out), n_threads=1) as llm:
        got = llm.logits(toks)
    ref = reference.reference_logits(toks)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# ----------------------------------------------------------------------------- metadata


def byte_level_vocab(n: int):
    """A byte-level BPE vocabulary of n tokens: three control tokens, the 256 byte characters,
    then merges of frequent letters (GPT-2's alphabet: a space is written Ġ)."""
    from llamacpu.tokenizer import _bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(_bytes_to_unicode().values())
    merges = []
    for a in "Ġetaoinsrhldu":
        for b in "etaoinsrhldu":
            if len(tokens) < n:
                merges.append(f"{a} {b}")
                tokens.append(a + b)
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges


def test_byte_level_bpe_model(tmp_path, stories):
    from llamacpu.tokenizer import load_tokenizer

    sd, cfg, _ = stories
    tokens, types, merges = byte_level_vocab(cfg.vocab_size)
    path = tmp_path / "bpe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    add_hparams(w, cfg)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    for canon, a in sd.items():
        w.add_tensor(gguf_name(canon), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_gguf(path) as ck:
        assert ck.tokenizer_kind == "hf-json" and ck.chat_template.startswith("{% for m in messages %}")
        assert ck.tokenizer_info == {"model": "gpt2", "pre": "smollm", "bos_id": 1, "eos_id": 2,
                                     "add_bos": False, "add_eos": False, "eot_ids": [],
                                     "eog_pieces": ["<|endoftext|>", "<|im_end|>"]}
        assert (ck.config.bos_id, ck.config.eos_id, ck.config.vocab_size) == (1, 2, 512)
        tok = load_tokenizer(ck.tokenizer_kind, ck.tokenizer_data, str(path), ck.tokenizer_info)
    ids = tok.encode("<|im_start|>the tea", special=True)
    assert [tok.piece(i) for i in ids] == ["<|im_start|>", "th", "e", "Ġt", "ea"]
    assert tok.stop_ids == {0, 2} and tok.decode(ids) == "the tea"


def test_rope_scaling_linear(tmp_path, stories):
    path = tmp_path / "m.gguf"
    write_stories(path, stories, extra={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    with open_gguf(path) as ck:
        assert ck.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_rope_scaling_unsupported_kind_refused(tmp_path, stories):
    path = tmp_path / "m.gguf"
    write_stories(path, stories, extra={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                                        "llama.rope.scaling.original_context_length": 512})
    with pytest.raises(CheckpointError, match="yarn.*not supported") as e:
        open_gguf(path)
    one_line(e.value, path)


@pytest.mark.parametrize("params", [(8.0, 1.0, 4.0, 8192), (4.0, 1.0, 2.0, 64)])
def test_rope_freqs_become_llama3_scaling(tmp_path, stories, params):
    """LLaMA-3.1 GGUFs carry the rope scaling as a rope_freqs tensor, not as metadata."""
    from llamacpu.model import rope_frequencies

    sd, cfg, _ = stories
    factor, low, high, old = params
    theta, hd = 500000.0, cfg.head_dim
    freqs = 1.0 / (theta ** (np.arange(0, hd, 2) / hd))
    # As convert_hf_to_gguf.py's LlamaModel computes them.
    factors = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "m.gguf"
    write_stories(path, stories, rope_theta=theta,
                  more_tensors={"rope_freqs.weight": np.array(factors, np.float32)})
    with open_gguf(path) as ck:
        rs = ck.config.rope_scaling
        assert rs["rope_type"] == "llama3" and rs["factor"] == pytest.approx(factor)
        assert "rope_freqs" not in ck.tensors
        # Whatever parameters were recovered, the runtime's frequencies are the file's.
        assert np.allclose(rope_frequencies(ck.config), freqs / np.array(factors), rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(arch="qwen2"), "architecture 'qwen2' is not supported"),
    (dict(rope_dims=4), "partial rotary"),
    (dict(extra={"llama.expert_count": 8}), "mixture-of-experts"),
    (dict(drop=("blk.2.ffn_up.weight",)), "lacks tensor blk.2.ffn_up.weight"),
    (dict(extra={"llama.block_count": 4}), "block_count=4"),
    (dict(tokenizer=False), "lacks metadata key tokenizer.ggml.model"),
])
def test_refused_models(tmp_path, stories, change, message):
    path = tmp_path / "m.gguf"
    change = dict(change)
    extra = change.pop("extra", None)
    if extra and "llama.block_count" in extra:
        # Replace a key the writer always adds: write the file, then patch its value.
        write_stories(path, stories, **change)
        data = path.read_bytes()
        key = b"llama.block_count"
        at = data.index(key) + len(key) + 4
        path.write_bytes(data[:at] + struct.pack("<I", extra["llama.block_count"]) + data[at + 4:])
    else:
        write_stories(path, stories, extra=extra, **change)
    with pytest.raises(CheckpointError) as e:
        open_gguf(path)
    assert message in one_line(e.value, path)


def test_wrong_shape_refused(tmp_path, stories):
    sd = dict(stories[0])
    sd["layers.1.wk"] = sd["layers.1.wk"][:, :32].copy()
    path = tmp_path / "m.gguf"
    write_stories(path, stories, weights=sd)
    with pytest.raises(CheckpointError, match="blk.1.attn_k.weight has shape") as e:
        open_gguf(path)
    one_line(e.value, path)


def test_unexpected_tensor_refused(tmp_path, stories):
    path = tmp_path / "m.gguf"
    write_stories(path, stories, more_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor blk.0.attn_q.bias"):
        open_gguf(path)


def test_open_source_dispatch(tmp_path, stories):
    gg = tmp_path / "m.gguf"
    write_stories(gg, stories, Q.Q8_0)
    with open_source(gg) as ck:
        assert ck.source.startswith("gguf v3")
    with open_source(asset("stories260K/meta")) as ck:
        assert ck.source.startswith("meta")
    other = tmp_path / "notes.txt"
    other.write_bytes(b"hello, not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        open_source(other)
    one_line(e.value, other)
    with pytest.raises(ModelNotFoundError):
        open_source(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------- hostile files


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key, value):
    return kv(key, 8, gstr(value))


def kv_u32(key, value):
    return kv(key, 4, struct.pack("<I", value))


def tinfo(name, dims, ttype=0, offset=0) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ttype, offset))


def build(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, alignment=32) -> bytes:
    head = (b"GGUF" + struct.pack("<I", version)
            + struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tensors))
    pad = -len(head) % alignment
    return head + b"\0" * pad + data


def valid_small() -> bytes:
    """A well-formed file: metadata of every value type (nested arrays too) and two tensors."""
    kvs = [
        kv_str("general.architecture", "llama"),
        kv("u8", 0, b"\x07"), kv("i8", 1, b"\xff"), kv("u16", 2, struct.pack("<H", 7)),
        kv("i16", 3, struct.pack("<h", -7)), kv_u32("u32", 7), kv("i32", 5, struct.pack("<i", -7)),
        kv("f32", 6, struct.pack("<f", 0.5)), kv("bool", 7, b"\x01"), kv("u64", 10, struct.pack("<Q", 7)),
        kv("i64", 11, struct.pack("<q", -7)), kv("f64", 12, struct.pack("<d", 0.25)),
        kv("arr.i32", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, -2, 3)),
        kv("arr.str", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("bé")),
        kv("arr.nested", 9, struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 9)
           + struct.pack("<IQ", 8, 1) + gstr("x")),
    ]
    w = np.arange(64, dtype=np.float32)
    tensors = [tinfo("a", [8, 8], 0, 0), tinfo("b", [32], 0, 256)]
    return build(kvs, tensors, w.tobytes() + np.ones(32, np.float32).tobytes())


def test_small_file_parses(tmp_path):
    path = tmp_path / "s.gguf"
    path.write_bytes(valid_small())
    with read_gguf(path) as gf:
        md = gf.metadata
        assert (md["u8"], md["i8"], md["u16"], md["i16"], md["u32"], md["i32"]) == (7, -1, 7, -7, 7, -7)
        assert (md["f32"], md["bool"], md["u64"], md["i64"], md["f64"]) == (0.5, True, 7, -7, 0.25)
        assert md["arr.i32"].tolist() == [1, -2, 3] and md["arr.str"] == ["a", "bé"]
        assert md["arr.nested"][0].tolist() == [9] and md["arr.nested"][1] == ["x"]
        assert gf.tensors["a"].shape == (8, 8) and gf.tensors["b"].shape == (32,)
        assert np.array_equal(gf.tensors["a"].read(), np.arange(64, dtype=np.float32).reshape(8, 8))
        assert np.array_equal(gf.tensors["b"].read_rows(3, 5), np.ones(2, np.float32))


def test_truncated_anywhere(tmp_path):
    full = valid_small()
    path = tmp_path / "t.gguf"
    for cut in range(0, len(full)):
        path.write_bytes(full[:cut])
        with pytest.raises(ModelFileError) as e:
            read_gguf(path)
        one_line(e.value, path)


def test_truncated_real_model(tmp_path, stories):
    full_path = tmp_path / "full.gguf"
    write_stories(full_path, stories, Q.Q4_0)
    full = full_path.read_bytes()
    with read_gguf(full_path) as gf:
        # Past the last tensor lies only padding, which the file may lack.
        end = max(t.offset + t.nbytes for t in gf.tensors.values())
    path = tmp_path / "t.gguf"
    rng = np.random.default_rng(1)
    cuts = sorted(set(rng.integers(0, end, 150).tolist()) | {4, 8, 16, 24, end - 1})
    for cut in cuts:
        path.write_bytes(full[:cut])
        with pytest.raises(ModelFileError) as e:
            open_gguf(path)
        one_line(e.value, path)


MALFORMED = [
    (b"", "empty file"),
    (b"GGU", "truncated"),
    (b"GGML" + b"\0" * 40, "not a GGUF file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "not a GGUF file"),
    (build(version=1), "version 1 is too old"),
    (build(version=4), "unsupported GGUF version 4"),
    (b"GGUF" + struct.pack(">I", 3) + b"\0" * 16, "big-endian"),
    (build(n_tensors=1 << 62), "tensor count is 4611686018427387904, more than the limit"),
    (build(n_tensors=1000), "tensor count is 1000, but only"),
    (build(n_kv=1 << 40), "metadata key/value count"),
    (build([gstr("k" * 10)[:8] + b"k"], alignment=1), "only 9 bytes are left"),
    (build([struct.pack("<Q", 1 << 60) + b"key"]), "more than the limit"),
    (build([kv("k", 8, struct.pack("<Q", 1 << 40))]), "claims 1099511627776 bytes"),
    (build([kv("k", 8, struct.pack("<Q", 1000) + b"abc")]), "truncated"),
    (build([kv("k", 9, struct.pack("<IQ", 4, 1 << 50))]), "length of array k is"),
    (build([kv("k", 9, struct.pack("<IQ", 8, 1 << 20) + gstr("a"))]), "length of array k is 1048576, but only"),
    (build([kv("k", 99, b"")]), "unknown metadata value type 99"),
    (build([kv("k", 9, struct.pack("<IQ", 42, 1))]), "unknown array element type 42"),
    (build([kv("k", 7, b"\x02")]), "neither 0 nor 1"),
    (build([kv("k", 8, gstr(b"\xff\xfe"))]), "not valid UTF-8"),
    (build([kv_u32("k", 1), kv_u32("k", 2)]), "appears twice"),
    (build([kv_u32("general.alignment", 24)]), "power of two"),
    (build([kv("general.alignment", 10, struct.pack("<Q", 32))]), "must be a uint32"),
    (build([kv("deep", 9, (struct.pack("<IQ", 9, 1)) * 6 + struct.pack("<IQ", 4, 0))]), "nested more than"),
    (build(tensors=[tinfo("a", [8])] * 2, data=b"\0" * 64), "tensor a appears twice"),
    (build(tensors=[tinfo("a", [8, 8, 1, 1, 1])], data=b"\0" * 256), "5 dimensions"),
    (build(tensors=[tinfo("a", [])], data=b""), "0 dimensions"),
    (build(tensors=[tinfo("a", [8, 0])], data=b""), "each must be between 1"),
    (build(tensors=[tinfo("a", [1 << 39, 1 << 39])], data=b""), "more than the limit"),
    (build(tensors=[tinfo("a", [(1 << 64) - 1])], data=b""), "each must be between 1"),
    (build(tensors=[tinfo("a", [8, 8], 0, 1 << 62)], data=b"\0" * 256), "lies past the end"),
    (build(tensors=[tinfo("a", [8, 8], 0, 32)], data=b"\0" * 256), "lies past the end"),
    (build(tensors=[tinfo("a", [8], 0, 4)], data=b"\0" * 64), "not a multiple of the alignment"),
    (build(tensors=[tinfo("a", [8, 8], 99)], data=b"\0" * 256), "unknown type 99"),
    (build(tensors=[tinfo("a", [8, 8], 4)], data=b"\0" * 256), "Q4_2"),
    (build(tensors=[tinfo("a", [33, 2], 2)], data=b"\0" * 256), "not a multiple of its block of 32"),
    (build(tensors=[tinfo("a" * 2000, [8])], data=b"\0" * 64), "more than the limit"),
]


@pytest.mark.parametrize("data, message", MALFORMED, ids=[f"{i}-{m}" for i, (_, m) in enumerate(MALFORMED)])
def test_malformed(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFileError) as e:
        read_gguf(path)
    assert message in one_line(e.value, path)


def test_garbage_never_escapes(tmp_path):
    """Random bytes after a valid magic, and random flips in a valid file: always one of our
    errors (or a clean parse), never a crash or an exception of another kind."""
    rng = np.random.default_rng(3)
    good = valid_small()
    path = tmp_path / "g.gguf"
    for i in range(300):
        if i < 100:
            data = b"GGUF" + struct.pack("<I", 3) + rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        else:
            data = bytearray(good)
            for at in rng.integers(0, len(good), int(rng.integers(1, 4))):
                data[at] = int(rng.integers(0, 256))
            data = bytes(data)
        path.write_bytes(data)
        try:
            with read_gguf(path) as gf:
                for t in gf.tensors.values():
                    t.read()
        except LlamaCPUError as e:
            one_line(e, path)


def test_unsupported_tensor_type_named(tmp_path):
    path = tmp_path / "iq.gguf"
    path.write_bytes(build(tensors=[tinfo("blk.0.attn_q.weight", [256, 2], 17)], data=b"\0" * 256))
    with pytest.raises(CheckpointError, match="blk.0.attn_q.weight is stored as IQ2_XS") as e:
        read_gguf(path)
    one_line(e.value, path)


def test_every_known_type_has_a_size():
    # The table names every type ggml defines, so errors can name them; block sizes must
    # agree with the gguf package's.
    for tid, (name, block, size) in GGML_TYPES.items():
        # Q8_1 (never stored in files) shrank to 36 bytes in ggml; the gguf package still says 40.
        if name != "Q8_1" and hasattr(Q, name) and Q[name] in gguf.GGML_QUANT_SIZES:
            assert (block, size) == gguf.GGML_QUANT_SIZES[Q[name]], name


# ----------------------------------------------------------------------------- real file


def smollm2_path():
    env = os.environ.get("LLAMACPU_SMOLLM2_GGUF")
    candidates = [Path(env)] if env else []
    home = os.environ.get("LLAMACPU_HOME")
    cache = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamacpu"
    candidates += [cache / "SmolLM2-135M-Instruct.Q4_1.gguf", cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"]
    for p in candidates:
        if p.is_file():
            return p
    pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf not found (set LLAMACPU_SMOLLM2_GGUF)")


def test_real_smollm2_opens():
    path = smollm2_path()
    with open_source(path) as ck:
        c = ck.config
        assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size, c.head_dim) == \
            (576, 30, 9, 3, 1536, 49152, 64)
        assert c.rope_theta == 100000.0 and c.norm_eps == 1e-5 and c.max_seq_len == 8192
        assert c.tied_output and c.rope_scaling is None and (c.bos_id, c.eos_id) == (1, 2)
        assert ck.tokenizer_kind == "hf-json" and "<|im_start|>" in ck.chat_template
        info = ck.tokenizer_info
        assert info["add_bos"] is False and info["pre"] == "smollm"
        assert set(info["eog_pieces"]) == {"<|im_end|>", "<|endoftext|>"}
        types = {t.ggml_type for t in ck.tensors.values()}
        assert types == {"Q4_1", "Q8_0", "F32"} and ck.tensors["tok_embeddings"].ggml_type == "Q8_0"
        reader = gguf.GGUFReader(str(path))
        ref = {t.name: t for t in reader.tensors}
        for canon in ("tok_embeddings", "layers.29.w2", "layers.3.wk", "norm"):
            t = ck.tensors[canon]
            r = ref[t.name]
            expect = gguf.quants.dequantize(r.data, r.tensor_type).reshape(t.shape)
            assert np.array_equal(t.read(), expect), canon
    kind, _, info = read_gguf_tokenizer(path)
    assert kind == "hf-json" and info["eos_id"] == 2
