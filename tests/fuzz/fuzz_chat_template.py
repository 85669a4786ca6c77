"""Fuzz target: a model's chat template (Jinja source from a file), rendered in the
sandbox. Any failure must be a TemplateError, and no template may run past the limit."""

import time

from harness import instrumented, main

with instrumented():
    from llamacpu import jinja_template

jinja_template.RENDER_SECONDS = 0.5
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é 🙂"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "{{ not a template }}"}]


def target(data: bytes) -> None:
    source = data.decode("utf-8", "replace")
    start = time.monotonic()
    try:
        jinja_template.render_jinja(source, MESSAGES, True, "<s>", "</s>")
    finally:
        if time.monotonic() - start > 5:
            raise AssertionError(f"rendering took {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main("chat_template", target)
