"""A model's own chat template (Jinja), rendered the way transformers' apply_chat_template
renders it: in an immutable sandbox, so a template from a downloaded file can build strings
and nothing else."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import UsageError


class TemplateError(UsageError):
    """The chat template failed to render (it raised, or it is not valid Jinja)."""


def _raise(message):
    raise TemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template is not valid Jinja ({e})") from None


def render_jinja(source: str, messages, add_generation_prompt: bool, bos: str, eos: str) -> str:
    import jinja2

    template = _compile(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=bos, eos_token=eos, tools=None, documents=None)
    except TemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            RecursionError) as e:
        raise TemplateError(f"chat template failed to render ({type(e).__name__}: {e})") from None
