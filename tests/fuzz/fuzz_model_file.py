"""Fuzz target: a whole llamacpu model file, loaded with Llama() and used (tokenize,
generate, chat). Seeds: tiny models cut from stories260K (make_corpus.py)."""

import os
import sys

from harness import instrumented, main, scratch_dir

with instrumented():
    import llamacpu
    from llamacpu import jinja_template

jinja_template.RENDER_SECONDS = 0.5  # a looping template must not eat the time budget
SCRATCH = scratch_dir()


def use(llm) -> None:
    llm.tokenize("Once upon a time é")
    for chunk in llm("Once", max_tokens=4, stream=True, seed=1):
        chunk["choices"][0]["text"].encode("utf-8")
    llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2, seed=1)


def load_and_use(path: str) -> None:
    with llamacpu.Llama(path, n_ctx=16, n_threads=1, seed=0) as llm:
        use(llm)


def target(data: bytes) -> None:
    path = os.path.join(SCRATCH, "model.bin")
    with open(path, "wb") as f:
        f.write(data)
    load_and_use(path)


if __name__ == "__main__":
    main("model_file", target)
