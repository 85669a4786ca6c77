"""Chat templates: turning a list of messages into the text a model was trained on.

Built-in formats render in Python; a model's own Jinja template (GGUF / Hugging Face
files) renders in a sandbox. Special tokens appear in the rendered text as their pieces
("<s>", "<|im_end|>") and are turned into their ids when the text is encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import UsageError

BUILTIN = ("llama-2", "chatml", "plain")

_LLAMA2_SYS = "<<SYS>>\n{}\n<</SYS>>\n\n"


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UsageError("each message needs a 'role' (system, user or assistant) and a 'content'")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise UsageError("message content must be a string")
        if m["role"] not in ("system", "user", "assistant"):
            raise UsageError(f"unknown message role {m['role']!r}")
        out.append({"role": m["role"], "content": content})
    return out


def _llama2(messages, add_generation_prompt, bos, eos):
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = ""
    for m in messages:
        if m["role"] == "user":
            content = m["content"]
            if system is not None:
                # As Meta's chat_completion: the system block and the message are one text,
                # stripped together (the system prompt's own whitespace stays).
                content = _LLAMA2_SYS.format(system) + content
                system = None
            text += f"{bos}[INST] {content.strip()} [/INST]"
        elif m["role"] == "assistant":
            text += f" {m['content'].strip()} {eos}"
    return text


def _chatml(messages, add_generation_prompt, bos, eos):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def _plain(messages, add_generation_prompt, bos, eos):
    # A transcript a base model continues naturally; it stops when it writes the next "User:".
    text = bos
    for m in messages:
        if m["role"] == "system":
            text += m["content"].strip() + "\n\n"
        elif m["role"] == "user":
            text += f"User: {m['content'].strip()}\n"
        else:
            text += f"Assistant: {m['content'].strip()}\n"
    if add_generation_prompt:
        text += "Assistant:"
    return text


_RENDER = {"llama-2": _llama2, "chatml": _chatml, "plain": _plain}


@dataclass
class ChatFormat:
    """A chat template with what generation needs to know about it."""

    name: str
    source: Optional[str] = None  # Jinja source for a model's own template
    stop_strings: list = field(default_factory=list)
    stop_pieces: list = field(default_factory=list)  # special tokens that end a turn

    def render(self, messages, add_generation_prompt: bool, bos: str, eos: str) -> str:
        messages = _check_messages(messages)
        if self.source is not None:
            from .jinja_template import render_jinja

            return render_jinja(self.source, messages, add_generation_prompt, bos, eos)
        return _RENDER[self.name](messages, add_generation_prompt, bos, eos)


def chat_format(name_or_source: Optional[str]) -> ChatFormat:
    """A ChatFormat from a built-in name or a Jinja template source."""
    name = name_or_source or "plain"
    if name == "llama-2":
        return ChatFormat("llama-2")
    if name == "chatml":
        return ChatFormat("chatml", stop_pieces=["<|im_end|>"])
    if name == "plain":
        return ChatFormat("plain", stop_strings=["\nUser:"])
    if "{%" in name or "{{" in name:
        return ChatFormat("model", source=name)
    raise UsageError(f"unknown chat template {name!r}; choose one of {', '.join(BUILTIN)}")
