"""Fuzz target: the metadata JSON of a llamacpu model file. The input becomes the metadata
of a file whose data section is a real tiny model's, so that mutations of names, shapes,
offsets, config values, the tokenizer entry and the chat template all reach the loader."""

import json
import os

from harness import HERE, instrumented, main, scratch_dir

with instrumented():
    from llamacpu.fileformat import HEADER

from fuzz_model_file import load_and_use

SCRATCH = scratch_dir()


def _base_payload() -> bytes:
    data = (HERE / "corpus" / "model_file" / "tiny-q4_0.bin").read_bytes()
    _, _, _, _, _, data_off, data_size, _ = HEADER.unpack_from(data)
    return data[data_off:data_off + data_size]


PAYLOAD = _base_payload()


def model_file(meta: bytes) -> bytes:
    data_off = -(-(HEADER.size + len(meta)) // 4096) * 4096
    head = HEADER.pack(b"LLAMACPU", 1, 0, HEADER.size, len(meta), data_off, len(PAYLOAD), b"\0" * 16)
    return head + meta + b"\0" * (data_off - HEADER.size - len(meta)) + PAYLOAD


def target(data: bytes) -> None:
    path = os.path.join(SCRATCH, "model.bin")
    with open(path, "wb") as f:
        f.write(model_file(data))
    load_and_use(path)


if __name__ == "__main__":
    main("model_meta", target)
