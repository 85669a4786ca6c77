"""Fuzz target: a .safetensors file, parsed and every tensor read."""

import os

from harness import instrumented, main, scratch_dir

with instrumented():
    from llamacpu.convert import read_safetensors

SCRATCH = scratch_dir()


def target(data: bytes) -> None:
    path = os.path.join(SCRATCH, "model.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    with read_safetensors(path) as tf:
        for t in tf.tensors.values():
            t.read()


if __name__ == "__main__":
    main("safetensors", target)
