"""Fuzz target: a GGUF file through the converter: parse, read every tensor, rebuild the
tokenizer, convert, and load the result."""

import os

from harness import instrumented, main, scratch_dir

with instrumented():
    from llamacpu.convert import convert_checkpoint, open_source, read_gguf

from fuzz_model_file import load_and_use

SCRATCH = scratch_dir()


def target(data: bytes) -> None:
    src, out = os.path.join(SCRATCH, "in.gguf"), os.path.join(SCRATCH, "out.bin")
    with open(src, "wb") as f:
        f.write(data)
    with read_gguf(src) as gf:
        for t in gf.tensors.values():
            t.read_rows(0, min(t.nrows, 4))
    with open_source(src) as ck:
        convert_checkpoint(ck, out, progress=False)
    load_and_use(out)


if __name__ == "__main__":
    main("gguf", target)
