"""Tokenizers, built from the bytes stored inside the model file.

Each tokenizer also knows the exact bytes every token stands for, so that streamed output
is assembled from bytes and decoded incrementally: a character split across tokens (byte
fallback pieces) is never printed in halves.

Loading stays fast: what a full scan of the vocabulary would tell (special ids, control
tokens, stop tokens) is computed once by the converter and stored in the file as the
tokenizer's "summary"; per-token bytes are computed when first needed, and a byte-level BPE
tokenizer is parsed only when text is first encoded.
"""

from __future__ import annotations

import codecs
from typing import Optional, Sequence, Union

from .config import MAX_VOCAB
from .errors import ModelFileError

Text = Union[str, bytes]


def _summary_ids(summary, key, n_vocab) -> Optional[frozenset]:
    v = summary.get(key) if isinstance(summary, dict) else None
    if not isinstance(v, list) or len(v) > 4096:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab for i in v):
        return None
    return frozenset(v)


def _list_field(info: dict, key: str) -> list:
    """A list-valued field of the file's tokenizer metadata; anything else counts as absent."""
    v = info.get(key)
    return v if isinstance(v, list) else []


def _is_library_failure(e: BaseException) -> bool:
    """An error from a tokenizer library fed damaged data. A Rust panic inside ``tokenizers``
    arrives as pyo3's PanicException, which derives from BaseException, not Exception."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _damaged(where: str, what: str = "") -> ModelFileError:
    return ModelFileError(f"{where}: the tokenizer inside the file is damaged{what}")


class Tokenizer:
    """Common interface: encode/decode, special ids and per-token bytes."""

    n_vocab: int
    bos_id: int
    eos_id: int
    add_bos: bool = True
    # Tokens that end a turn or a text (eos and, for chat models, end-of-turn markers).
    stop_ids: frozenset = frozenset()
    # Pieces that decode to nothing visible (bos, eos and other control tokens).
    control_ids: frozenset = frozenset()
    strips_leading_space = False

    def encode(self, text: Text, add_bos: bool = True, special: bool = False) -> list:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def piece(self, token: int) -> str:
        raise NotImplementedError

    def token_id(self, piece: str) -> Optional[int]:
        raise NotImplementedError

    def summary(self) -> dict:
        """What the converter stores so that loading needs no scan of the vocabulary."""
        return {"n_vocab": self.n_vocab, "bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": bool(self.add_bos),
                "control_ids": sorted(self.control_ids), "stop_ids": sorted(self.stop_ids)}


def _as_text(text: Text) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates, which no tokenizer library accepts: bytes that were not UTF-8 in a
        # command line (Python's surrogateescape), or a broken string from a caller. Each
        # becomes U+FFFD, as invalid bytes do.
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", errors="replace")
    return text


def _splitter(pieces):
    import re

    if not pieces:
        return re.compile(r"(?!)")
    alts = sorted(pieces, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(p) for p in alts) + ")")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2 style SentencePiece (BPE with byte fallback)."""

    strips_leading_space = True  # it adds a space before the first word, and removes it when decoding

    def __init__(self, model_bytes: bytes, where: str = "model", summary: Optional[dict] = None):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            ok = sp.LoadFromSerializedProto(model_bytes)
        except Exception:  # sentencepiece raises RuntimeError/OSError on damaged protos
            ok = False
        if not ok or sp.GetPieceSize() <= 0:
            raise _damaged(where)
        self.sp = sp
        self._where = where
        self.n_vocab = sp.GetPieceSize()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.stop_ids = frozenset(i for i in (self.eos_id,) if i >= 0)
        control = _summary_ids(summary, "control_ids", self.n_vocab)
        if control is None:
            control = frozenset(i for i in range(self.n_vocab) if sp.IsControl(i))
        self.control_ids = control
        self._bytes = [None] * self.n_vocab  # filled as tokens are first seen
        self._special = {p: i for i in control for p in (self.piece(i),) if p}
        self._special_re = _splitter(self._special)

    def encode(self, text: Text, add_bos: bool = True, special: bool = False) -> list:
        text = _as_text(text)
        ids = [self.bos_id] if add_bos and self.bos_id >= 0 else []
        if not special:
            return ids + self.sp.EncodeAsIds(text)
        # Control pieces written in the text ("<s>", "</s>") become their ids; each stretch
        # of text between them is encoded on its own, as a chat template's turns are.
        for part in self._special_re.split(text):
            if not part:
                continue
            sid = self._special.get(part)
            ids += [sid] if sid is not None else self.sp.EncodeAsIds(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.n_vocab]
        try:
            return self.sp.DecodeIds(ids)
        except UnicodeDecodeError:
            raise _damaged(self._where, " (a piece is not UTF-8)") from None

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.n_vocab:
            return b""
        b = self._bytes[token]
        if b is None:
            sp = self.sp
            if token in self.control_ids:
                b = b""
            elif sp.IsByte(token):
                try:
                    b = bytes([int(self.piece(token)[3:5], 16)])
                except ValueError:
                    raise _damaged(self._where, f" (byte piece {token} is {self.piece(token)!r})") from None
            elif sp.IsUnknown(token):
                b = " \u2047 ".encode()
            else:
                b = self.piece(token).replace("\u2581", " ").encode("utf-8")
            self._bytes[token] = b
        return b

    def piece(self, token: int) -> str:
        if not 0 <= token < self.n_vocab:
            return ""
        try:
            return self.sp.IdToPiece(token)
        except UnicodeDecodeError:
            raise _damaged(self._where, f" (piece {token} is not UTF-8)") from None

    def token_id(self, piece: str) -> Optional[int]:
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.piece(i) else i


def _bytes_to_unicode() -> dict:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}

# Token texts that end a turn or a text, whatever their ids (as llama.cpp decides).
END_OF_TURN_PIECES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|eom_id|>", "<EOT>", "<|end_of_text|>")


def _json_types(node, found: set) -> set:
    """Every "type" value anywhere in a tokenizer.json component (Sequences nest them)."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for v in node.values():
            _json_types(v, found)
    elif isinstance(node, list):
        for v in node:
            _json_types(v, found)
    return found


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (``tokenizers`` package): byte-level BPE as in LLaMA-3 and
    SmolLM2, or SentencePiece-style BPE with byte fallback.

    ``info`` says what tokenizer.json leaves to other files: bos_id, eos_id, add_bos, and
    end-of-turn tokens (eot_ids, eog_pieces). With the converter's ``summary`` in it, the
    tokenizer.json is parsed only when first needed (parsing 50k merges takes ~0.15 s).
    """

    _SUMMARY_FLAGS = ("byte_level", "byte_fallback", "strips_leading_space", "add_bos")

    def __init__(self, data: bytes, where: str = "model", info: Optional[dict] = None):
        self._data = data
        self._where = where
        self._info = info or {}
        self._tok = None
        self.n_vocab = None
        if not self._use_summary(self._info.get("summary")):
            self._build()

    def _use_summary(self, s) -> bool:
        if not isinstance(s, dict):
            return False
        n = s.get("n_vocab")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_VOCAB:
            return False
        ids = {k: s.get(k) for k in ("bos_id", "eos_id")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and -1 <= v < n for v in ids.values()):
            return False
        if not all(isinstance(s.get(k), bool) for k in self._SUMMARY_FLAGS):
            return False
        control, stops = _summary_ids(s, "control_ids", n), _summary_ids(s, "stop_ids", n)
        if control is None or stops is None:
            return False
        self.n_vocab, self.bos_id, self.eos_id = n, ids["bos_id"], ids["eos_id"]
        self.control_ids, self.stop_ids = control, stops
        self._byte_level, self._byte_fallback = s["byte_level"], s["byte_fallback"]
        self._strips, self.add_bos = s["strips_leading_space"], s["add_bos"]
        return True

    def _build(self) -> None:
        import json

        where, info = self._where, self._info
        try:
            import tokenizers
        except ImportError:
            raise ModelFileError(f"{where}: this model's tokenizer needs the 'tokenizers' package "
                                 "(pip install tokenizers)") from None
        try:
            text = bytes(self._data).decode("utf-8")
            doc = json.loads(text)
            tok = tokenizers.Tokenizer.from_str(text)
        except BaseException as e:
            if not _is_library_failure(e):
                raise
            raise _damaged(where) from None
        if not isinstance(doc, dict):
            raise ModelFileError(f"{where}: the tokenizer inside the file is damaged")
        n_vocab = tok.get_vocab_size(with_added_tokens=True)
        if not 0 < n_vocab <= MAX_VOCAB:
            raise ModelFileError(f"{where}: the tokenizer has {n_vocab} tokens (limit {MAX_VOCAB})")
        if self.n_vocab is not None and self.n_vocab != n_vocab:
            raise ModelFileError(f"{where}: the tokenizer inside the file is damaged (it has {n_vocab} tokens, "
                                 f"its summary says {self.n_vocab})")
        self._added = tok.get_added_tokens_decoder()
        self._pieces = [None] * n_vocab
        self._bytes = [None] * n_vocab
        self._tok = tok
        if self.n_vocab is not None:
            return  # the summary already said the rest
        self.n_vocab = n_vocab
        self.control_ids = frozenset(i for i, t in self._added.items() if t.special and 0 <= i < n_vocab)
        try:
            kinds = _json_types(doc.get("pre_tokenizer"), set()) | _json_types(doc.get("decoder"), set())
            strips = "Metaspace" in kinds or "Prepend" in _json_types(doc.get("normalizer"), set())
        except RecursionError:
            raise ModelFileError(f"{where}: the tokenizer inside the file is damaged") from None
        self._byte_level = "ByteLevel" in kinds
        model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
        self._byte_fallback = bool(model.get("byte_fallback"))
        self._strips = not self._byte_level and strips

        def special_id(key):
            v = info.get(f"{key}_id")
            if isinstance(v, int) and not isinstance(v, bool) and -1 <= v < n_vocab:
                return v
            piece = info.get(f"{key}_token")
            found = tok.token_to_id(piece) if isinstance(piece, str) else None
            return -1 if found is None else found

        self.bos_id = special_id("bos")
        self.eos_id = special_id("eos")
        add_bos = info.get("add_bos")
        if not isinstance(add_bos, bool):
            add_bos = self._template_adds_bos(doc)
        self.add_bos = add_bos and self.bos_id >= 0
        stops = {self.eos_id}
        stops.update(i for i in _list_field(info, "eot_ids") if isinstance(i, int))
        names = set(END_OF_TURN_PIECES) | {p for p in _list_field(info, "eog_pieces") if isinstance(p, str)}
        stops.update(i for i in self.control_ids if self.piece(i) in names)
        stops.update(i for i in (tok.token_to_id(p) for p in _list_field(info, "eog_pieces")
                                 if isinstance(p, str)) if i is not None)
        self.stop_ids = frozenset(i for i in stops if 0 <= i < n_vocab)

    def _ready(self):
        if self._tok is None:
            self._build()
        return self._tok

    def summary(self) -> dict:
        return dict(super().summary(), byte_level=self._byte_level, byte_fallback=self._byte_fallback,
                    strips_leading_space=self._strips)

    def _piece_bytes(self, i: int, piece: str) -> bytes:
        if i in self.control_ids or not piece:
            return b""
        if i in self._added:  # a user-defined token: its text is the text it stands for
            return self._added[i].content.encode("utf-8")
        if self._byte_level:
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            except KeyError:
                return piece.encode("utf-8")
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    def _template_adds_bos(self, doc: dict) -> bool:
        """Whether the post-processor puts the bos token first (when nothing else says)."""
        if self.bos_id < 0:
            return False
        bos = self.piece(self.bos_id)
        stack = [doc.get("post_processor")]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, dict):
                single = node.get("single")
                if node.get("type") == "TemplateProcessing" and isinstance(single, list) and single:
                    first = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
                    return isinstance(first, dict) and first.get("id") == bos
                stack.extend(node.values())
        return False

    def encode(self, text: Text, add_bos: bool = True, special: bool = False) -> list:
        text = _as_text(text)
        tok = self._ready()
        # With special=False, special-token texts stay text. The flag lives on the tokenizer;
        # a Llama serializes its calls, so setting it per call is safe.
        tok.encode_special_tokens = not special
        try:
            try:
                ids = tok.encode(text, add_special_tokens=False).ids
            except Exception:  # lone surrogates cannot cross into Rust
                ids = tok.encode(text.encode("utf-8", "replace").decode("utf-8"), add_special_tokens=False).ids
        except BaseException as e:
            if not _is_library_failure(e):
                raise
            raise _damaged(self._where, f" ({type(e).__name__} while encoding)") from None
        return ([self.bos_id] if add_bos and self.add_bos else []) + list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        raw = b"".join(self.token_bytes(int(i)) for i in ids)
        text = raw.decode("utf-8", errors="replace")
        return text[1:] if self._strips and text.startswith(" ") else text

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.n_vocab:
            return b""
        self._ready()
        b = self._bytes[token]
        if b is None:
            b = self._bytes[token] = self._piece_bytes(token, self.piece(token))
        return b

    def piece(self, token: int) -> str:
        if not 0 <= token < self.n_vocab:
            return ""
        tok = self._ready()
        p = self._pieces[token]
        if p is None:
            p = self._pieces[token] = tok.id_to_token(token) or ""
        return p

    def token_id(self, piece: str) -> Optional[int]:
        return self._ready().token_to_id(piece)

    @property
    def strips_leading_space(self) -> bool:
        # Byte-level BPE adds no space of its own; SentencePiece-style ones add one at the start.
        return self._strips


class StreamDecoder:
    """Turns generated tokens into text pieces as they come, never splitting a character."""

    def __init__(self, tokenizer: Tokenizer, at_start: bool):
        self.tok = tokenizer
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # At the start of a text, SentencePiece's leading space is not part of the text.
        self.strip = at_start and getattr(tokenizer, "strips_leading_space", False)

    def push(self, token: int) -> str:
        b = self.tok.token_bytes(token)
        if self.strip and b:
            self.strip = False
            if b.startswith(b" "):
                b = b[1:]
        return self.dec.decode(b)

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


def load_tokenizer(kind: str, data: bytes, where: str, info: Optional[dict] = None) -> Tokenizer:
    """The tokenizer stored in a model file; ``info`` is the file's tokenizer metadata."""
    info = info or {}
    if kind == "hf-json":
        return HFTokenizer(data, where, info)
    if kind == "sentencepiece":
        tok = SentencePieceTokenizer(data, where, info.get("summary"))
        # A GGUF source may name end-of-turn tokens beyond eos.
        extra = [i for i in _list_field(info, "eot_ids") if isinstance(i, int) and 0 <= i < tok.n_vocab]
        extra += [i for i in (tok.token_id(p) for p in _list_field(info, "eog_pieces")
                              if isinstance(p, str)) if i is not None]
        if extra:
            tok.stop_ids = tok.stop_ids | frozenset(extra)
        return tok
    raise ModelFileError(f"{where}: tokenizer kind {kind!r} is not supported by this llamacpu")
