"""Tokenizers, built from the bytes stored inside the model file.

Each tokenizer also knows the exact bytes every token stands for, so that streamed output
is assembled from bytes and decoded incrementally: a character split across tokens (byte
fallback pieces) is never printed in halves.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Optional, Sequence, Union

from .errors import ModelFileError

Text = Union[str, bytes]


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


def _as_text(text: Text) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
    return text


def _splitter(pieces):
    import re

    if not pieces:
        return re.compile(r"(?!)")
    alts = sorted(pieces, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(p) for p in alts) + ")")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2 style SentencePiece (BPE with byte fallback)."""

    def __init__(self, model_bytes: bytes, where: str = "model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            ok = sp.LoadFromSerializedProto(model_bytes)
        except Exception:  # sentencepiece raises RuntimeError/OSError on damaged protos
            ok = False
        if not ok or sp.GetPieceSize() <= 0:
            raise ModelFileError(f"{where}: the tokenizer inside the file is damaged")
        self.sp = sp
        self.n_vocab = sp.GetPieceSize()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.stop_ids = frozenset(i for i in (self.eos_id,) if i >= 0)
        table = []
        control = set()
        for i in range(self.n_vocab):
            if sp.IsControl(i):
                table.append(b"")
                control.add(i)
            elif sp.IsByte(i):
                table.append(bytes([int(sp.IdToPiece(i)[3:5], 16)]))
            elif sp.IsUnknown(i):
                table.append(" \u2047 ".encode())
            else:
                table.append(sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
        self._bytes = table
        self.control_ids = frozenset(control)
        self._special = {sp.IdToPiece(i): i for i in control if sp.IdToPiece(i)}
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
        return self.sp.DecodeIds(ids)

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < self.n_vocab else b""

    def piece(self, token: int) -> str:
        return self.sp.IdToPiece(token)

    def token_id(self, piece: str) -> Optional[int]:
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else i

    @property
    def strips_leading_space(self) -> bool:
        # SentencePiece adds a space before the first word when encoding, and removes it when
        # decoding the start of a text.
        return True


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
    if kind == "sentencepiece":
        return SentencePieceTokenizer(data, where)
    raise ModelFileError(f"{where}: tokenizer kind {kind!r} is not supported by this llamacpu")
