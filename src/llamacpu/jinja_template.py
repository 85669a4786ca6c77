"""A model's own chat template (Jinja), rendered the way transformers' apply_chat_template
renders it: in an immutable sandbox, so a template from a downloaded file can build strings
and nothing else.

The template comes from a file, so the sandbox also bounds what rendering may cost: a time
limit (a template that loops), a cap on the text it produces, and refusals of the single
operations that could allocate without bound in one step (``"x" * 10**9``, ``center(10**9)``,
a doubling macro). A template that hits one gets a TemplateError, not a hang or an
out-of-memory kill.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache

from .errors import UsageError

# Real chat templates are a few KB and render in well under a millisecond per message.
MAX_SOURCE_CHARS = 1 << 20
RENDER_SECONDS = 2.0
MAX_TEXT = 4 << 20  # characters in the output, or in any one value the template builds
MAX_NUMBER = 1 << 20  # widths, repeat counts and other integers passed to calls

_TEMPLATE_FILE = "<template>"  # the filename Jinja compiles from_string() templates under


class TemplateError(UsageError):
    """The chat template failed to render (it raised, or it is not valid Jinja)."""


def _raise(message):
    raise TemplateError(f"chat template: {message}")


def _too_big(what: str):
    raise TemplateError(f"chat template: {what} is over the limit (a runaway template?)")


def _size(v) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple)) else 0


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_NUMBER:
            _too_big(f"the number {a}")
        if _size(a) > MAX_TEXT or (isinstance(a, (list, tuple)) and sum(map(_size, a)) > MAX_TEXT):
            _too_big("an argument")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, int) and indent > 64:
        _too_big("the tojson indent")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _pass_arg_like(wrapper, f):
    """Keeps Jinja's pass_context / pass_eval_context / pass_environment marker of f."""
    if hasattr(f, "jinja_pass_arg"):
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    wrapper.__name__ = getattr(f, "__name__", "filter")
    return wrapper


def _bounded_filter(f):
    """A filter whose arguments (widths, format strings) are bounded, and whose result is
    checked before the template can use it."""

    def bounded(*args, **kwargs):
        _check_args(args, kwargs)
        for a in args:
            if isinstance(a, str) and _FORMAT_WIDTH.search(a):
                _too_big("a format width")
        out = f(*args, **kwargs)
        if _size(out) > MAX_TEXT:
            _too_big("a filter result")
        return out

    return _pass_arg_like(bounded, f)


def _indent_bounded(f):
    def indent(s, width=4, first=False, blank=False):
        lines = str(s).count("\n") + 1
        if _size(s) + lines * (len(width) if isinstance(width, str) else 0) > MAX_TEXT:
            _too_big("an indent result")
        _check_args((width,), {})
        return f(s, width, first, blank)

    return _pass_arg_like(indent, f)


def _replace_size(s, old, new, count) -> int:
    s, old, new = str(s), str(old), str(new)
    n = s.count(old) if count is None or count < 0 else min(count, s.count(old) if old else len(s) + 1)
    return len(s) + n * max(0, len(new) - len(old))


def _replace_bounded(f):
    def replace(eval_ctx, s, old, new, count=None):
        if _replace_size(s, old, new, count) > MAX_TEXT:
            _too_big("a replace result")
        return f(eval_ctx, s, old, new, count)

    return _pass_arg_like(replace, f)


def _join_bounded(f):
    def join(eval_ctx, value, d="", attribute=None):
        items = list(value)
        if _size(d) * len(items) + sum(_size(x) for x in items) > MAX_TEXT:
            _too_big("a join result")
        return f(eval_ctx, items, d, attribute)

    return _pass_arg_like(join, f)


# printf-style and str.format widths or precisions of seven digits or more.
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d{7,}|\*)|%[-+ #0]*\d*\.(\d{7,}|\*)|\{[^{}]*:[^{}]*\d{7,}")


def _check_str_method(obj, args) -> None:
    """The str methods whose result can be far larger than their arguments."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    s = getattr(obj, "__self__", None)
    if not isinstance(s, str):
        return
    name = getattr(obj, "__name__", "")
    if name == "replace" and len(args) >= 2:
        size = _replace_size(s, args[0], args[1], args[2] if len(args) > 2 else None)
    elif name == "join" and args:
        items = list(args[0]) if isinstance(args[0], (list, tuple, str)) else []
        size = len(s) * len(items) + sum(map(_size, items))
    elif name == "expandtabs":
        size = len(s) + s.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
    elif name in ("format", "format_map"):
        size = MAX_TEXT + 1 if _FORMAT_WIDTH.search(s) else 0
    else:
        return
    if size > MAX_TEXT:
        _too_big(f"a str.{name} result")


@lru_cache(maxsize=None)
def _environment_class():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class BoundedNamespace(Namespace):
        def __setitem__(self, name, value):
            if _size(value) > MAX_TEXT:
                _too_big("a namespace value")
            super().__setitem__(name, value)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                _too_big("an exponent")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_TEXT:
                        _too_big("a repeated sequence")
            if operator == "+" and _size(left) + _size(right) > MAX_TEXT:
                _too_big("a concatenation")
            if operator == "%" and isinstance(left, str) and _FORMAT_WIDTH.search(left):
                _too_big("a % format width")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            _check_args(args, kwargs)
            _check_str_method(__obj, args)
            out = super().call(__context, __obj, *args, **kwargs)
            if _size(out) > MAX_TEXT:
                _too_big("a call result")
            return out

    def configure(env):
        env.globals["namespace"] = BoundedNamespace
        for name in ("center", "format", "wordwrap", "truncate"):
            env.filters[name] = _bounded_filter(env.filters[name])
        env.filters["indent"] = _indent_bounded(env.filters["indent"])
        env.filters["replace"] = _replace_bounded(env.filters["replace"])
        env.filters["join"] = _join_bounded(env.filters["join"])
        return env

    return BoundedSandbox, configure, jinja2


@lru_cache(maxsize=8)
def _compile(source: str):
    if len(source) > MAX_SOURCE_CHARS:
        raise TemplateError(f"chat template is {len(source)} characters, over the limit of {MAX_SOURCE_CHARS}")
    sandbox, configure, jinja2 = _environment_class()
    env = configure(sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]))
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template is not valid Jinja ({_short(e)})") from None
    except (RecursionError, SyntaxError, MemoryError, ValueError, OverflowError) as e:
        # Python's compiler refuses what Jinja generates for a deeply nested template.
        raise TemplateError(f"chat template cannot be compiled ({type(e).__name__})") from None


def _deadline_tracer(deadline: float):
    """A trace function that stops template code (and only template code) past the deadline.
    Python calls it on each line the template's compiled code runs, so a loop that produces
    nothing is stopped too."""

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateError(f"chat template: rendering took over {RENDER_SECONDS:g} s (a loop?)")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    return on_call


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def render_jinja(source: str, messages, add_generation_prompt: bool, bos: str, eos: str) -> str:
    template = _compile(source)
    parts, n = [], 0
    previous = sys.gettrace()
    sys.settrace(_deadline_tracer(time.monotonic() + RENDER_SECONDS))
    try:
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos, eos_token=eos, tools=None, documents=None):
            n += len(piece)
            if n > MAX_TEXT:
                _too_big("the rendered text")
            parts.append(piece)
    except TemplateError:
        raise
    except Exception as e:  # whatever the template's code raised: Jinja's errors, TypeError, ...
        raise TemplateError(f"chat template failed to render ({type(e).__name__}: {_short(e)})") from None
    finally:
        sys.settrace(previous)
    return "".join(parts)
