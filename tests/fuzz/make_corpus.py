"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/<target>/) from stories260K.

Run it again when the model file format changes (harness.py runs every seed first). Files
named regress-* are inputs that once found a bug; they are kept. Needs the test extras (gguf) and torch, for the GGUF and torch.save seeds.

    PYTHONPATH=... python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import seeds

CORPUS = Path(__file__).resolve().parent / "corpus"

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
FEATURES = ("{%- macro turn(m) -%}<{{ m.role|upper }}>{{ m.content|trim|replace('\\n', ' ')|truncate(40) }}"
            "{%- endmacro -%}{% set ns = namespace(n=0, sys='') %}{% for m in messages %}"
            "{% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}"
            "{% set ns.n = ns.n + 1 %}{{ turn(m) }}{{ loop.cycle('|', '/') }}{% endfor %}"
            "{{ ns.sys|center(12) }}{{ messages|map(attribute='role')|join(',') }}{{ ns.n * 2 }}"
            "{{ '%03d'|format(ns.n) }}{{ messages|tojson }}{{ strftime_now('%Y') | length }}"
            "{% if add_generation_prompt %}<ASSISTANT>{% endif %}")


def write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    print(f"{target}/{name}: {len(data)} bytes")


def model_files(tmp: Path) -> None:
    variants = {"tiny-q4_0.bin": ("q4_0", None), "tiny-q4_1-chatml.bin": ("q4_1", CHATML),
                "tiny-f16-llama2.bin": ("f16", LLAMA2)}
    for name, (dtype, template) in variants.items():
        path = seeds.write_tiny_model(tmp / name, dtype, chat_template=template)
        write("model_file", name, path.read_bytes())
    data = (CORPUS / "model_file" / "tiny-q4_0.bin").read_bytes()
    meta_size = struct.unpack_from("<Q", data, 24)[0]
    meta = json.loads(data[64:64 + meta_size])
    write("model_meta", "tiny-q4_0.json", json.dumps(meta).encode())
    write("model_meta", "jinja-template.json", json.dumps(dict(meta, chat_template=FEATURES)).encode())
    no_summary = json.loads(json.dumps(meta))
    del no_summary["tokenizer"]["summary"]
    no_summary["tokenizer"]["eot_ids"] = [2]
    write("model_meta", "no-summary.json", json.dumps(no_summary, indent=1).encode())


def gguf_files(tmp: Path) -> None:
    write("gguf", "tiny.gguf", seeds.write_tiny_gguf(tmp / "tiny.gguf").read_bytes())
    import gguf
    import numpy as np

    # A small file with every metadata value type, nested arrays and three tensor types.
    w = gguf.GGUFWriter(str(tmp / "types.gguf"), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -7)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float64("t.f64", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "é漢")
    w.add_array("t.arr", [1, 2, 3])
    w.add_array("t.strs", ["a", "b"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("b", np.ones(32, np.float16))
    w.add_tensor("c", gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32),
                                           gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    write("gguf", "types.gguf", (tmp / "types.gguf").read_bytes())


def checkpoint_files(tmp: Path) -> None:
    write("safetensors", "tiny.safetensors", seeds.tiny_safetensors())
    write("safetensors", "empty.safetensors", seeds.safetensors_bytes({}))
    pth = seeds.write_tiny_torch_zip(tmp / "tiny.pth")
    write("torchzip", "tiny.pth", pth.read_bytes())
    with zipfile.ZipFile(pth) as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
        write("pickle", "state_dict.pkl", z.read(pkl))
    # GLOBAL __main__.canary, an empty tuple, REDUCE: what an attack looks like.
    write("pickle", "canary.pkl", b"\x80\x02c__main__\ncanary\nq\x00)R.")


def templates() -> None:
    for name, text in (("chatml.jinja", CHATML), ("llama2.jinja", LLAMA2), ("features.jinja", FEATURES)):
        write("chat_template", name, text.encode())


def main() -> None:
    # Rewrites the seeds it makes; regress-* files (inputs that once found a bug) stay.
    for old in CORPUS.glob("*/*"):
        if not old.name.startswith("regress-"):
            old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        model_files(Path(tmp))
        gguf_files(Path(tmp))
        checkpoint_files(Path(tmp))
    templates()


if __name__ == "__main__":
    sys.exit(main())
