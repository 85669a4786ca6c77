"""An interactive conversation that lives in the KV cache.

Each turn renders the whole conversation with the chat template, but only the text that is
new since the last turn is tokenized and evaluated: the cache already holds the rest.
When the context fills up, the oldest turns are dropped from the cache (keeping the
start, with the system prompt) as llama.cpp does, and the conversation goes on.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from .chat import ChatFormat
from .sampling import SamplingParams


class ChatSession:
    def __init__(self, llm, system: Optional[str], fmt: ChatFormat):
        self.llm = llm
        self.fmt = fmt
        self.messages = [{"role": "system", "content": system}] if system else []
        self.text = ""  # the conversation's text as rendered, up to what the cache holds
        self.pending: list = []  # conversation tokens not yet in the cache
        self.n_keep = 1
        self.last_finish: Optional[str] = None
        self._started = False

    def _first_prompt(self, full: str) -> np.ndarray:
        llm = self.llm
        toks = llm._encode_chat_text(full, start=True)
        if self.messages and self.messages[0]["role"] == "system":
            bos, eos = llm._special_pieces()
            sys_text = self.fmt.render(self.messages[:1], False, bos, eos)
            if sys_text and full.startswith(sys_text):
                # Kept through every context shift; a system prompt as long as the context
                # keeps only its start, so that the conversation still has room.
                self.n_keep = min(max(1, len(llm._encode_chat_text(sys_text, start=True))), max(1, llm.n_ctx // 4))
        return np.asarray(toks, np.int32)

    def _make_room(self, n_new: int) -> None:
        """Shifts the cache until n_new tokens and some room to answer fit."""
        llm = self.llm
        reserve = min(256, llm.n_ctx // 4)
        while llm._n_past + n_new + reserve > llm.n_ctx and llm._n_past - self.n_keep > 2:
            llm._shift_context(self.n_keep)

    def send(self, user_text: str, params: SamplingParams, max_tokens: Optional[int] = None,
             stop: Optional[list] = None) -> Iterator[str]:
        """Streams the answer to user_text. Closing the iterator early (Ctrl-C) keeps what was
        said so far in the conversation."""
        llm = self.llm
        msgs = self.messages + [{"role": "user", "content": user_text}]
        bos, eos = llm._special_pieces()
        full = self.fmt.render(msgs, True, bos, eos)
        stops = list(self.fmt.stop_strings) + list(stop or [])
        answer, raw = [], []
        with llm._using():
            stop_ids = llm._chat_stop_ids()
            if self._started and full.startswith(self.text):
                delta = self.pending + llm._encode_chat_text(full[len(self.text):], start=False)
                # _make_room may stop 2 tokens short of its goal: that slack is reserved too.
                room = max(1, llm.n_ctx - self.n_keep - min(256, llm.n_ctx // 4) - 2)
                if len(delta) > room:
                    llm._notice(f"message of {len(delta)} tokens is longer than the context allows; "
                                f"kept its last {room} tokens")
                    delta = delta[-room:]
                self._make_room(len(delta))
                over = llm._n_past + len(delta) - llm.n_ctx
                if over > 0:  # only in a context of a few tokens
                    delta = delta[over:]
                llm._eval(np.asarray(delta, np.int32), llm._n_past)
            else:
                llm._load_prompt(llm._fit_prompt(self._first_prompt(full), self.n_keep))
            self._started = True
            self.text = full
            self.pending = []
            limit = llm._max_tokens(max_tokens, 0)
            tokens = llm._continue(params, limit, stop_ids, self.n_keep)
            reason = None
            try:
                for text, reason, _ in llm._text_stream(tokens, stops, stop_ids, False, raw.append):
                    if text:
                        answer.append(text)
                        yield text
            finally:
                # The last sampled token is not in the cache yet: it opens the next turn.
                if raw:
                    self.pending = [raw[-1]]
                t = llm.tokenizer
                said = b"".join(t.piece(x).encode() if x in t.control_ids or x in stop_ids else t.token_bytes(x)
                                for x in raw)
                self.text += said.decode("utf-8", "replace")
                self.messages = msgs + [{"role": "assistant", "content": "".join(answer).strip()}]
                self.last_finish = reason or "interrupted"
