"""Fuzz target: a torch.save zip archive, opened without torch and every tensor read."""

import os

from harness import instrumented, main, scratch_dir

with instrumented():
    from llamacpu.convert import read_torch_zip

SCRATCH = scratch_dir()


def read_all(path: str) -> None:
    with read_torch_zip(path) as tf:
        for t in tf.tensors.values():
            t.read()


def target(data: bytes) -> None:
    path = os.path.join(SCRATCH, "model.pth")
    with open(path, "wb") as f:
        f.write(data)
    read_all(path)


if __name__ == "__main__":
    main("torchzip", target)
