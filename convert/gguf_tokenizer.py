"""Tokenizers rebuilt from a GGUF file's metadata.

llama.cpp keeps the vocabulary inside the GGUF file rather than as the original tokenizer
file, so the converter rebuilds one our runtime can load:

- ``tokenizer.ggml.model == "llama"`` (SentencePiece BPE with byte fallback, LLaMA-1/2 style):
  a SentencePiece ModelProto, written in the protobuf wire format by hand, which tokenizes as
  the original tokenizer.model did (pieces, scores and piece types are all in the GGUF file).
- ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, LLaMA-3 / SmolLM2 style): a Hugging Face
  tokenizer.json whose pre-tokenizer splits text with the regexes llama.cpp's llama-vocab.cpp
  uses for the file's ``tokenizer.ggml.pre`` type.

Alongside the data comes a small ``info`` dict with what the tokenizer data does not say
itself (bos/eos ids, whether to add BOS, end-of-turn tokens).
"""

from __future__ import annotations

import json
import struct
from typing import Sequence

import numpy as np

from .gguf import _FLOAT32, _FLOAT64, _INT_TYPES, _STRING

# llama.cpp's token types (llama_token_type); SentencePiece's piece types use the same numbers.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

# Token texts llama.cpp treats as ending generation whatever ids they have (llama-vocab.cpp).
EOG_PIECES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<|return|>", "<|call|>")


def tokenizer_from_gguf(md) -> tuple:
    """(kind, data bytes, info dict, number of tokens) from a GGUF file's metadata (a
    convert.gguf._Meta)."""
    model = md.string("tokenizer.ggml.model")
    tokens = md.array("tokenizer.ggml.tokens", (_STRING,), "strings")
    n = len(tokens)
    if not n:
        md.fail("tokenizer.ggml.tokens is empty")
    types = md.array("tokenizer.ggml.token_type", _INT_TYPES, "integers", required=False)
    if types is None:
        types = np.full(n, NORMAL, np.int32)
    if len(types) != n:
        md.fail(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    types = np.asarray(types, np.int64)
    bad = np.nonzero((types < UNDEFINED) | (types > BYTE))[0]
    if len(bad):
        md.fail(f"tokenizer.ggml.token_type[{bad[0]}] is {types[bad[0]]}, not a token type (0..6)")

    def token_id(key, default):
        if not md.has(key):
            return default
        v = md.integer(key, lo=-(1 << 31), hi=(1 << 32) - 1)
        if v < 0 or v == 0xFFFFFFFF:  # -1, written signed or as uint32, means "none"
            return -1
        # llama.cpp ignores an id past the vocabulary (with a warning) and keeps its default.
        return v if v < n else default

    if model == "llama":
        bos, eos = token_id("tokenizer.ggml.bos_token_id", 1), token_id("tokenizer.ggml.eos_token_id", 2)
        add_bos = md.flag("tokenizer.ggml.add_bos_token", True)
        scores = md.array("tokenizer.ggml.scores", (_FLOAT32, _FLOAT64), "numbers", required=False)
        if scores is None:
            scores = np.zeros(n, np.float32)
        if len(scores) != n:
            md.fail(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        try:
            data = build_sentencepiece_model(
                tokens, scores, types,
                unk_id=token_id("tokenizer.ggml.unknown_token_id", _first(types, UNKNOWN, 0)),
                bos_id=bos, eos_id=eos, pad_id=token_id("tokenizer.ggml.padding_token_id", -1),
                add_dummy_prefix=md.flag("tokenizer.ggml.add_space_prefix", True),
                remove_extra_whitespaces=md.flag("tokenizer.ggml.remove_extra_whitespaces", False))
        except ValueError as e:
            md.fail(f"cannot rebuild the SentencePiece tokenizer: {e}")
        kind = "sentencepiece"
        info = {"model": "llama", "add_space_prefix": md.flag("tokenizer.ggml.add_space_prefix", True)}
    elif model == "gpt2":
        pre = md.string("tokenizer.ggml.pre", default="default")
        spec = PRE_TOKENIZERS.get(pre)
        if spec is None:
            md.fail(f"tokenizer.ggml.pre {pre!r} is not a pre-tokenizer llamacpu knows (known: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))})")
        bos, eos = token_id("tokenizer.ggml.bos_token_id", -1), token_id("tokenizer.ggml.eos_token_id", -1)
        add_bos = md.flag("tokenizer.ggml.add_bos_token", spec.add_bos)
        merges = md.array("tokenizer.ggml.merges", (_STRING,), "strings")
        try:
            data = build_bpe_tokenizer_json(tokens, types, merges, pre)
        except ValueError as e:
            md.fail(f"cannot rebuild the BPE tokenizer: {e}")
        kind = "hf-json"
        info = {"model": "gpt2", "pre": pre}
    else:
        md.fail(f"tokenizer.ggml.model {model!r} is not supported (only 'llama' and 'gpt2')")
    if add_bos and bos < 0:
        add_bos = False
    eot = [i for i in (token_id("tokenizer.ggml.eot_token_id", -1),
                       token_id("tokenizer.ggml.eom_token_id", -1)) if i >= 0]
    eog = sorted({i for i in eot + [eos] if i >= 0}
                 | {i for i, t in enumerate(tokens) if t in EOG_PIECES})
    info.update(bos_id=bos, eos_id=eos, add_bos=bool(add_bos),
                add_eos=md.flag("tokenizer.ggml.add_eos_token", False), eot_ids=eot,
                eog_pieces=[tokens[i] for i in eog])
    return kind, data, info, n


def _first(types: np.ndarray, kind: int, default: int) -> int:
    hits = np.nonzero(types == kind)[0]
    return int(hits[0]) if len(hits) else default


# ----------------------------------------------------------------------------- SentencePiece
#
# The few fields of sentencepiece_model.proto that encoding reads.

_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_TRAINER_IDS = {"unk": 40, "bos": 41, "eos": 42, "pad": 43}
_TRAINER_PIECES = {"unk": 45, "bos": 46, "eos": 47, "pad": 48}
_MODEL_TYPE_BPE = 2
_NORM_NAME, _NORM_ADD_DUMMY_PREFIX, _NORM_REMOVE_EXTRA_WS, _NORM_ESCAPE_WS = 1, 3, 4, 5


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int32s are written as ten-byte two's complement
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v)


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _field_float(field: int, v: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", v)


def build_sentencepiece_model(tokens: Sequence[str], scores, types, *, unk_id: int, bos_id: int,
                              eos_id: int, pad_id: int = -1, add_dummy_prefix: bool = True,
                              remove_extra_whitespaces: bool = False) -> bytes:
    """A serialized SentencePiece BPE ModelProto; raises ValueError for an unusable vocabulary."""
    n = len(tokens)
    types = [NORMAL if int(t) == UNDEFINED else int(t) for t in types]
    if not 0 <= unk_id < n:
        raise ValueError(f"unknown-token id {unk_id} is not a token")
    unknowns = [i for i, t in enumerate(types) if t == UNKNOWN]
    if not unknowns:
        types[unk_id] = UNKNOWN  # SentencePiece needs exactly one unknown piece
    elif unknowns != [unk_id]:
        raise ValueError(f"tokens {unknowns} are of type unknown, but the unknown-token id is {unk_id}")
    seen: dict = {}
    out = []
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
        if not text:
            raise ValueError(f"token {i} is empty")
        if text in seen:
            raise ValueError(f"tokens {seen[text]} and {i} are both {text!r}")
        seen[text] = i
        body = _field_bytes(_PIECE_TEXT, text.encode("utf-8")) + _field_float(_PIECE_SCORE, float(score))
        if kind != NORMAL:
            body += _field_varint(_PIECE_TYPE, kind)
        out.append(_field_bytes(_MODEL_PIECES, body))
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    has_bytes = sum(1 for text, kind in zip(tokens, types) if kind == BYTE and text in byte_pieces)
    trainer = (_field_varint(_TRAINER_MODEL_TYPE, _MODEL_TYPE_BPE)
               + _field_varint(_TRAINER_VOCAB_SIZE, n)
               + _field_varint(_TRAINER_BYTE_FALLBACK, int(has_bytes == 256)))
    for role, i in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
        trainer += _field_varint(_TRAINER_IDS[role], i if 0 <= i < n else -1)
        # SentencePiece finds bos/eos/pad by their text; a text no token has means "none".
        piece = tokens[i] if 0 <= i < n else f"<llamacpu:no-{role}>"
        trainer += _field_bytes(_TRAINER_PIECES[role], piece.encode("utf-8"))
    normalizer = (_field_bytes(_NORM_NAME, b"identity")
                  + _field_varint(_NORM_ADD_DUMMY_PREFIX, int(add_dummy_prefix))
                  + _field_varint(_NORM_REMOVE_EXTRA_WS, int(remove_extra_whitespaces))
                  + _field_varint(_NORM_ESCAPE_WS, 1))
    data = b"".join(out) + _field_bytes(_MODEL_TRAINER, trainer) + _field_bytes(_MODEL_NORMALIZER, normalizer)
    _check_sentencepiece(data)
    return data


def _check_sentencepiece(data: bytes) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        ok = sp.LoadFromSerializedProto(data)
    except Exception as e:  # sentencepiece reports a bad model as RuntimeError/OSError
        raise ValueError(str(e).strip().replace("\n", " ") or type(e).__name__) from None
    if not ok:
        raise ValueError("SentencePiece refused the rebuilt model")


# ----------------------------------------------------------------------------- byte-level BPE


class PreTokenizer:
    """How llama.cpp splits text before BPE for one ``tokenizer.ggml.pre`` type."""

    def __init__(self, regexes: Sequence[str], ignore_merges: bool = False, add_bos: bool = False):
        self.regexes = tuple(regexes)
        # LLaMA-3 style: a word that is itself a token is taken whole, merges or not.
        self.ignore_merges = ignore_merges
        # llama.cpp's default for add_bos when the file has no tokenizer.ggml.add_bos_token.
        self.add_bos = add_bos


# The regexes of llama-vocab.cpp (llm_tokenizer_bpe), applied one after the other, each
# splitting the pieces the previous left. Where llama.cpp rewrote an upstream regex only to
# suit std::regex, the upstream form is used, as Oniguruma (which `tokenizers` uses) reads it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"

_DEFAULT = PreTokenizer([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"])


def _table() -> dict:
    llama3 = PreTokenizer([_LLAMA3], ignore_merges=True, add_bos=True)
    gpt2 = PreTokenizer([_GPT2])
    starcoder = PreTokenizer([r"\p{N}", _GPT2])
    qwen2 = PreTokenizer([_QWEN2])
    groups = [
        (("default", ""), _DEFAULT),
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
         llama3),
        (("dbrx", "smaug-bpe"), PreTokenizer([_LLAMA3])),
        (("gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
          "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling",
          "exaone4"), gpt2),
        (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
          "mellum2"), starcoder),
        (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open",
          "megrez"), qwen2),
        (("tekken",), PreTokenizer([_TEKKEN], ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4"), PreTokenizer([_GPT4O])),
        (("falcon",), PreTokenizer([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"])),
        (("poro-chat", "bloom", "gpt3-finnish"), PreTokenizer([_BLOOM])),
        (("viking",), PreTokenizer([_BLOOM, r"\p{N}"])),
    ]
    return {name: spec for names, spec in groups for name in names}


PRE_TOKENIZERS = _table()


def build_bpe_tokenizer_json(tokens: Sequence[str], types, merges: Sequence[str], pre: str) -> bytes:
    """A Hugging Face tokenizer.json for a byte-level BPE vocabulary; ValueError if unusable."""
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise ValueError(f"unknown pre-tokenizer type {pre!r}")
    types = [int(t) for t in types]
    # A text that appears twice belongs to its last id, as in llama.cpp's token_to_id map.
    vocab = {text: i for i, text in enumerate(tokens) if text}
    pairs, seen = [], set()
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)  # as llama.cpp splits: the first part may itself be a space
        if cut < 0 or cut == len(m) - 1:
            raise ValueError(f"merge {i} ({m!r}) is not two pieces separated by a space")
        a, b = m[:cut], m[cut + 1:]
        # tokenizers refuses merges of or into pieces outside the vocabulary; llama.cpp would
        # spell such a merge out in bytes anyway.
        if a in vocab and b in vocab and a + b in vocab and (a, b) not in seen:
            seen.add((a, b))
            pairs.append([a, b])
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind != USER_DEFINED}
             for i, (text, kind) in enumerate(zip(tokens, types))
             if kind in (UNKNOWN, CONTROL, USER_DEFINED) and text and vocab.get(text) == i]
    pre_tokenizers = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
                      for r in spec.regexes]
    pre_tokenizers.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False})
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": spec.ignore_merges,
                  "vocab": vocab, "merges": pairs},
    }
    data = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    _check_tokenizers(data, len(tokens))
    return data


def _check_tokenizers(data: bytes, n: int) -> None:
    try:
        import tokenizers
    except ImportError:  # the runtime needs it; the converter can do without the check
        return
    try:
        tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except BaseException as e:
        # A Rust panic arrives as pyo3's PanicException, a BaseException.
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"tokenizers refused it ({str(e).strip() or type(e).__name__})") from None
    if tok.get_vocab_size(with_added_tokens=True) > n:
        raise ValueError(f"tokenizers made {tok.get_vocab_size(with_added_tokens=True)} tokens of {n}")
