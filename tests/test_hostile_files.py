"""Damaged, truncated, hostile and wrong-kind model files, through the API and the CLI.

Whatever the file holds, loading it (and then using it) ends in one of two ways: it works, or
the package's own error type is raised with one line naming the file. Never a crash, a hang,
or another exception. The files are a tiny one-layer model cut from stories260K
(tests/fuzz/seeds.py), small enough to damage at every byte, and stories260K itself.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llamacpu
from llamacpu import _core
from llamacpu.fileformat import HEADER, MappedModelFile, parse

from conftest import asset

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
import seeds  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return seeds.write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-q4_0.bin", "q4_0")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> Path:
    return seeds.write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-f32.bin", "f32")


class Layout:
    """A model file taken apart: header fields, metadata (JSON and bytes), data section."""

    def __init__(self, data: bytes):
        self.data = data
        (_, _, _, self.meta_off, self.meta_size, self.data_off, self.data_size, _) = HEADER.unpack_from(data)
        self.meta = json.loads(data[self.meta_off:self.meta_off + self.meta_size])
        self.payload = data[self.data_off:self.data_off + self.data_size]

    @property
    def meta_end(self) -> int:
        return self.meta_off + self.meta_size

    def with_meta(self, meta, payload: bytes = None) -> bytes:
        """The file with other metadata (a dict, or raw bytes) and the same (or another) data."""
        raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
        payload = self.payload if payload is None else payload
        data_off = -(-(HEADER.size + len(raw)) // 4096) * 4096
        head = HEADER.pack(b"LLAMACPU", 1, 0, HEADER.size, len(raw), data_off, len(payload), b"\0" * 16)
        return head + raw + b"\0" * (data_off - HEADER.size - len(raw)) + payload

    def tensor(self, name: str) -> dict:
        return next(t for t in self.meta["tensors"] if t["name"] == name)


class Patched:
    """A copy of a file whose bytes are changed and restored in place: rewriting the whole
    file for each of thousands of damaged variants would be most of the test's time."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data
        path.write_bytes(data)
        self.fd = os.open(path, os.O_RDWR)

    def damage(self, changes: dict) -> "Patched":
        for pos, value in changes.items():
            os.pwrite(self.fd, bytes([value]), pos)
        self.changed = changes
        return self

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        for pos in self.changed:
            os.pwrite(self.fd, self.data[pos:pos + 1], pos)

    def close(self):
        os.close(self.fd)


def assert_one_line(e: BaseException, path) -> str:
    msg = str(e)
    assert isinstance(e, llamacpu.LlamaCPUError), repr(e)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def use(llm) -> None:
    """Everything a caller does with a loaded model, each call checked for sanity."""
    toks = llm.tokenize("Once upon a time")
    assert all(0 <= t < llm.n_vocab for t in toks)
    llm.detokenize(toks)
    for temperature in (0.0, 0.8):
        for chunk in llm("Once upon", max_tokens=6, temperature=temperature, stream=True):
            chunk["choices"][0]["text"].encode("utf-8")
    out = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def outcome(path, **kw) -> str:
    """'ok' if the file loads and works, else the one-line error (checked)."""
    try:
        with llamacpu.Llama(path, n_ctx=32, n_threads=1, seed=0, **kw) as llm:
            use(llm)
        return "ok"
    except llamacpu.LlamaCPUError as e:
        return assert_one_line(e, path) if str(path) in str(e) else _template_error(e)


def _template_error(e) -> str:
    # A chat template is the one part of a file whose failure shows only when it renders.
    assert isinstance(e, llamacpu.UsageError) and str(e).startswith("chat template"), repr(e)
    assert "\n" not in str(e)
    return str(e)


# ---- truncation -----------------------------------------------------------------------

def test_truncated_at_every_length(tiny):
    data = tiny.read_bytes()
    view = memoryview(data)
    for cut in range(len(data)):
        with pytest.raises(llamacpu.ModelFileError) as e:
            parse(view[:cut], "cut.bin", cut)
        assert_one_line(e.value, "cut.bin")
    assert parse(view, "whole.bin", len(data)).config.dim == seeds.TINY["dim"]


def boundaries(data: bytes) -> set:
    lay = Layout(data)
    cuts = {0, 1, 8, 63, 64, 65, lay.meta_end - 1, lay.meta_end, lay.data_off - 1, lay.data_off,
            lay.data_off + 1, len(data) - 1}
    for t in lay.meta["tensors"] + [lay.meta["tokenizer"]]:
        for at in (t["offset"], t["offset"] + t["size"]):
            cuts |= {lay.data_off + at - 1, lay.data_off + at}
    return {c for c in cuts if 0 <= c < len(data)}


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_truncated_files_through_the_api(tmp_path, tiny, stories_models, which):
    data = (tiny if which == "tiny" else stories_models["q4_0"]).read_bytes()
    rng = np.random.default_rng(5)
    cuts = boundaries(data) | set(rng.integers(0, len(data), 60).tolist())
    path = tmp_path / "cut.bin"
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        with pytest.raises(llamacpu.ModelFileError) as e:
            llamacpu.Llama(path, n_threads=1)
        assert_one_line(e.value, path)


# ---- flipped bytes ---------------------------------------------------------------------

def test_every_header_and_metadata_byte_flipped(tmp_path, tiny):
    """Each byte of the header and the metadata, replaced by two other values: the file
    still works (a byte of a name or a template) or gives a one-line error."""
    data = tiny.read_bytes()
    lay = Layout(data)
    file = Patched(tmp_path / "flip.bin", data)
    results = {"ok": 0, "error": 0}
    for pos in range(lay.meta_end):
        for value in (data[pos] ^ 0xFF, data[pos] ^ 0x01):
            with file.damage({pos: value}) as path:
                results["ok" if outcome(path) == "ok" else "error"] += 1
    file.close()
    # Most damage is caught; some (in a string value) is harmless.
    assert results["error"] > 5 * results["ok"] > 0, results


def test_random_damage_anywhere(tmp_path, tiny, stories_models):
    rng = np.random.default_rng(11)
    for source in (tiny, stories_models["q4_0"]):
        data = source.read_bytes()
        file = Patched(tmp_path / source.name, data)
        for _ in range(100):
            at = rng.integers(0, len(data), int(rng.integers(1, 8))).tolist()
            with file.damage({pos: int(rng.integers(0, 256)) for pos in at}) as path:
                outcome(path)
        file.close()


def test_damaged_weights_do_not_crash(tmp_path, tiny, tiny_f32):
    """Weights carry no checksum: damage there cannot be detected, and must only give
    garbage. NaN and Inf weights make NaN logits, which the sampler must survive."""
    path = tmp_path / "weights.bin"
    rng = np.random.default_rng(2)
    for source in (tiny, tiny_f32):
        lay = Layout(source.read_bytes())
        norm = lay.tensor("norm")
        emb = lay.tensor("tok_embeddings")
        variants = []
        for bad in (np.nan, np.inf, -np.inf):
            payload = bytearray(lay.payload)
            payload[norm["offset"]:norm["offset"] + norm["size"]] = np.full(norm["size"] // 4, bad, np.float32).tobytes()
            variants.append(payload)
        for fill in (b"\xff", b"\x7c", b"\x00"):  # fp16 NaN and Inf scales, or zeros
            payload = bytearray(lay.payload)
            payload[emb["offset"]:emb["offset"] + emb["size"]] = fill * emb["size"]
            variants.append(payload)
        garbage = bytearray(lay.payload)
        tok = lay.meta["tokenizer"]
        garbage[:tok["offset"]] = rng.integers(0, 256, tok["offset"], dtype=np.uint8).tobytes()
        variants.append(garbage)
        for payload in variants:
            path.write_bytes(lay.with_meta(lay.meta, bytes(payload)))
            assert outcome(path) == "ok"
            with llamacpu.Llama(path, n_ctx=32, n_threads=1) as llm:
                logits = llm.logits(llm.tokenize("Once"))
                assert logits.shape == (2, llm.n_vocab)
                toks = list(llm.generate(llm.tokenize("Once"), max_tokens=8, temperature=0.8, seed=1))
                assert all(0 <= t < llm.n_vocab for t in toks)


def test_sampler_survives_nan_and_inf_logits():
    s = _core.Sampler(0)
    rng = np.random.default_rng(0)
    specials = np.array([np.nan, np.inf, -np.inf], np.float32)
    for _ in range(3000):
        n = int(rng.integers(1, 700))
        logits = (rng.normal(size=n) * 5).astype(np.float32)
        mask = rng.random(n) < rng.random()
        logits[mask] = rng.choice(specials, int(mask.sum()))
        recent = rng.integers(0, n, int(rng.integers(0, 70)), dtype=np.int32)
        for temperature, top_k, top_p, min_p in ((0.0, 40, 0.95, 0.05), (0.8, 40, 0.95, 0.05), (1.5, 0, 1.0, 0.0),
                                                 (0.7, 3, 0.5, 1.0)):
            t = s.sample(logits, temperature, top_k, top_p, min_p, 1.1, recent)
            assert 0 <= t < n
            if np.isposinf(logits).any():
                assert np.isposinf(logits[t])  # +inf outranks everything
            elif np.isfinite(logits).any():
                assert np.isfinite(logits[t])  # NaN never wins over a number


# ---- metadata that is valid JSON but hostile -------------------------------------------

def _set(path_keys, value):
    def mutate(meta, lay):
        node = meta
        for k in path_keys[:-1]:
            node = node[k]
        node[path_keys[-1]] = value
    return mutate


def _tensor(name, **fields):
    def mutate(meta, lay):
        next(t for t in meta["tensors"] if t["name"] == name).update(fields)
    return mutate


def _alias_layers(n_layers):
    """n_layers layers, every one on layer 0's bytes: a tiny file claiming a huge model."""
    def mutate(meta, lay):
        meta["config"]["n_layers"] = n_layers
        layer0 = [t for t in meta["tensors"] if t["name"].startswith("layers.0.")]
        for i in range(1, n_layers):
            meta["tensors"] += [dict(t, name=t["name"].replace("layers.0.", f"layers.{i}.")) for t in layer0]
    return mutate


def _overlap_tokenizer(meta, lay):
    emb = next(t for t in meta["tensors"] if t["name"] == "tok_embeddings")
    meta["tokenizer"]["offset"] = emb["offset"]


def _many_tensors(meta, lay):
    meta["tensors"] = meta["tensors"] * 9000  # 72000 entries


def _garbage_tokenizer(kind, blob):
    def mutate(meta, lay):
        meta["tokenizer"] = {"kind": kind, "offset": meta["tokenizer"]["offset"], "size": len(blob)}
        lay.blob = blob
    return mutate


_PANICS = b'{"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}, "merges": ["a b"]}}'

HOSTILE = [
    # (id, mutation, expected: "ok" or a fragment of the error)
    ("config-missing", lambda m, lay: m.pop("config"), "'config' missing"),
    ("config-list", _set(["config"], [1, 2]), "'config' missing or of the wrong type"),
    ("dim-zero", _set(["config", "dim"], 0), "dim=0 is outside"),
    ("dim-bool", _set(["config", "dim"], True), "dim must be an integer"),
    ("dim-float", _set(["config", "dim"], 32.0), "dim must be an integer"),
    ("dim-huge", _set(["config", "dim"], 1 << 62), "dim=4611686018427387904 is outside"),
    ("layers-over-cap", _set(["config", "n_layers"], 1 << 20), "n_layers=1048576 is outside"),
    ("head-dim-huge", _set(["config", "head_dim"], 1 << 16), "head_dim=65536 is outside"),
    ("head-dim-odd", _set(["config", "head_dim"], 7), "must be even"),
    ("heads-not-multiple", _set(["config", "n_kv_heads"], 3), "not a multiple"),
    ("vocab-over-cap", _set(["config", "vocab_size"], (1 << 22) + 1), "vocab_size=4194305 is outside"),
    ("vocab-below-tokenizer", _set(["config", "vocab_size"], 100), "tensor 'tok_embeddings' has shape"),
    ("max-seq-zero", _set(["config", "max_seq_len"], 0), "max_seq_len=0 is outside"),
    ("max-seq-at-cap", _set(["config", "max_seq_len"], 1 << 22), "ok"),
    ("eps-nan", _set(["config", "norm_eps"], float("nan")), "norm_eps must be a positive number"),
    ("theta-inf", _set(["config", "rope_theta"], float("inf")), "rope_theta must be a positive number"),
    ("rope-scaling-list", _set(["config", "rope_scaling"], [1]), "rope_scaling must be an object"),
    ("rope-factor-text", _set(["config", "rope_scaling"], {"rope_type": "llama3", "factor": "8"}),
     "rope_scaling factor must be a positive number"),
    ("rope-factor-zero", _set(["config", "rope_scaling"], {"rope_type": "linear", "factor": 0}),
     "rope_scaling factor must be a positive number"),
    ("rope-llama3-equal-bounds", _set(["config", "rope_scaling"], {"rope_type": "llama3", "low_freq_factor": 4,
                                                                   "high_freq_factor": 4}), "low_freq_factor"),
    ("rope-unknown-kind", _set(["config", "rope_scaling"], {"rope_type": "yarn", "factor": "x"}), "ok"),
    ("bos-out-of-vocab", _set(["config", "bos_id"], 4000), "ok"),
    ("tensors-not-list", _set(["tensors"], {"a": 1}), "'tensors' missing"),
    ("too-many-tensors", _many_tensors, "too many tensors"),
    ("tensor-negative-offset", _tensor("norm", offset=-64), "bad offset or size"),
    ("tensor-offset-bool", _tensor("norm", offset=True), "bad offset or size"),
    ("tensor-past-data", _tensor("norm", offset=1 << 40), "outside the data section"),
    ("tensor-unaligned", _tensor("norm", offset=8), "outside the data section"),
    ("tensor-size-mismatch", _tensor("norm", size=4), "its shape needs"),
    ("tensor-shape-3d", _tensor("norm", shape=[2, 2, 8]), "bad shape"),
    ("tensor-shape-huge", _tensor("tok_embeddings", shape=[1 << 40, 32]), "bad shape"),
    ("tensor-shape-negative", _tensor("tok_embeddings", shape=[-512, 32]), "bad shape"),
    ("tensor-shape-string", _tensor("norm", shape="32"), "has no shape"),
    ("tensor-dtype-unknown", _tensor("norm", dtype="q2_k"), "unknown dtype"),
    ("norm-not-f32", _tensor("norm", dtype="f16", size=64), "must be f32"),
    ("q4-odd-columns", _tensor("layers.0.wo", shape=[32, 33]), "multiple of 32"),
    ("tensor-missing", lambda m, lay: m["tensors"].pop(), "is missing"),
    ("tensor-unknown", lambda m, lay: m["tensors"].append(dict(m["tensors"][1], name="lm_head")), "overlaps"),
    ("tensor-twice", lambda m, lay: m["tensors"].append(m["tensors"][0]), "listed twice"),
    ("aliased-layers", _alias_layers(64), "overlaps"),
    ("tokenizer-overlaps-weights", _overlap_tokenizer, "overlaps"),
    ("tokenizer-kind-unknown", _set(["tokenizer", "kind"], "tiktoken"), "not supported"),
    ("tokenizer-kind-missing", lambda m, lay: m["tokenizer"].pop("kind"), "tokenizer kind"),
    ("tokenizer-past-data", _set(["tokenizer", "size"], 1 << 30), "outside the data section"),
    ("tokenizer-empty", _set(["tokenizer", "size"], 0), "the tokenizer inside the file is damaged"),
    ("tokenizer-garbage", _garbage_tokenizer("sentencepiece", bytes(range(256)) * 8), "tokenizer inside the file is damaged"),
    ("tokenizer-json-garbage", _garbage_tokenizer("hf-json", b"{not json"), "tokenizer inside the file is damaged"),
    ("tokenizer-json-panics", _garbage_tokenizer("hf-json", _PANICS), "tokenizer inside the file is damaged"),
    ("summary-wrong-ids", _set(["tokenizer", "summary"], {"n_vocab": 10 ** 9, "bos_id": -7, "control_ids": [-1, 99999],
                                                          "stop_ids": "2"}), "ok"),
    ("summary-not-object", _set(["tokenizer", "summary"], [1]), "ok"),
    ("eot-ids-not-list", _set(["tokenizer", "eot_ids"], 2), "ok"),
    ("eot-ids-garbage", _set(["tokenizer", "eot_ids"], [10 ** 30, -5, "a", None]), "ok"),
    ("eog-pieces-garbage", _set(["tokenizer", "eog_pieces"], [None, 5, "</s>", "no such piece"]), "ok"),
    ("template-not-string", _set(["chat_template"], 5), "damaged metadata (chat_template)"),
    ("template-unknown-name", _set(["chat_template"], "vicuna-9"), "chat template this llamacpu lacks"),
    ("template-raises", _set(["chat_template"], "{{ raise_exception('no chat for you') }}"), "no chat for you"),
    ("template-bad-jinja", _set(["chat_template"], "{% for %}"), "not valid Jinja"),
    ("template-too-deep", _set(["chat_template"], "{{" + "(" * 3000 + "1" + ")" * 3000 + "}}"), "cannot be compiled"),
    ("template-recursion", _set(["chat_template"], "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"), "RecursionError"),
    ("template-loops", _set(["chat_template"], "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}"
                                               "{% endfor %}"), "took over"),
    ("template-memory-bomb", _set(["chat_template"], "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                                     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"), "over the limit"),
    ("template-renders-nothing", _set(["chat_template"], "{% if false %}{% endif %}"), "ok"),
    ("source-not-object", _set(["source"], 5), "ok"),
    ("extra-keys", _set(["surprise"], {"nested": [[[]]]}), "ok"),
]


@pytest.mark.parametrize("mutation, expected", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_metadata(tmp_path, tiny, monkeypatch, mutation, expected):
    from llamacpu import jinja_template

    monkeypatch.setattr(jinja_template, "RENDER_SECONDS", 0.3)
    lay = Layout(tiny.read_bytes())
    meta = json.loads(json.dumps(lay.meta))
    lay.blob = None
    mutation(meta, lay)
    payload = lay.payload
    if lay.blob is not None:  # a replacement tokenizer, at the old tokenizer's place
        off = lay.meta["tokenizer"]["offset"]
        payload = payload[:off] + lay.blob
    path = tmp_path / "hostile.bin"
    path.write_bytes(lay.with_meta(meta, payload))
    got = outcome(path)
    assert (got == "ok") if expected == "ok" else (expected in got), got


def test_deeply_nested_metadata(tmp_path, tiny):
    lay = Layout(tiny.read_bytes())
    path = tmp_path / "nested.bin"
    path.write_bytes(lay.with_meta(b"[" * 200_000 + b"]" * 200_000))
    with pytest.raises(llamacpu.ModelFileError) as e:
        llamacpu.Llama(path)
    assert "damaged metadata" in assert_one_line(e.value, path)


def test_metadata_not_utf8_or_not_json(tmp_path, tiny):
    lay = Layout(tiny.read_bytes())
    path = tmp_path / "meta.bin"
    for raw in (b"\xff\xfe{}", b"{", b"null", b'"text"', b"1e999", b"{" + b'"a":1,' * 1000 + b"}"):
        path.write_bytes(lay.with_meta(raw))
        with pytest.raises(llamacpu.ModelFileError) as e:
            llamacpu.Llama(path)
        assert "damaged metadata" in assert_one_line(e.value, path)


HEADER_FIELDS = {"version": 1, "meta_offset": 3, "meta_size": 4, "data_offset": 5, "data_size": 6}


@pytest.mark.parametrize("field, value, message", [
    ("version", 2, "version 2 is not supported"), ("version", 1 << 31, "is not supported"),
    ("meta_offset", 0, "damaged header"), ("meta_offset", 1 << 63, "damaged header"),
    ("meta_size", 0, "damaged header"), ("meta_size", 1 << 40, "damaged header"),
    ("meta_size", 4000, "damaged metadata"), ("meta_size", 100, "damaged metadata"),
    ("data_offset", 4095, "data section outside the file"), ("data_offset", 1 << 63, "outside the file"),
    ("data_offset", 0, "data section outside the file"),
    ("data_size", (1 << 64) - 1, "data section outside the file"), ("data_size", 100, "outside the data section"),
])
def test_header_fields(tmp_path, tiny, field, value, message):
    data = bytearray(tiny.read_bytes())
    fields = list(HEADER.unpack_from(data))
    fields[HEADER_FIELDS[field]] = value
    data[:HEADER.size] = HEADER.pack(*fields)
    path = tmp_path / "header.bin"
    path.write_bytes(data)
    with pytest.raises(llamacpu.ModelFileError) as e:
        llamacpu.Llama(path)
    assert message in assert_one_line(e.value, path)


def test_context_too_large_for_memory(tmp_path, tiny, monkeypatch):
    """The KV cache a context needs is compared with the machine's memory before it is
    allocated: an error, not an out-of-memory kill."""
    with pytest.raises(llamacpu.UsageError, match="choose a smaller n_ctx"):
        llamacpu.Llama(tiny, n_ctx=1 << 40, n_threads=1)
    from llamacpu import llama

    monkeypatch.setattr(llama, "physical_memory", lambda: 64 << 10)
    with pytest.raises(llamacpu.ModelFileError) as e:  # the context the file asks for
        llamacpu.Llama(tiny, n_threads=1)
    assert "max_seq_len 256" in assert_one_line(e.value, tiny)
    monkeypatch.setattr(llama, "physical_memory", lambda: None)  # unknown: no check
    with llamacpu.Llama(tiny, n_ctx=16, n_threads=1) as llm:
        assert llm.n_ctx == 16


# ---- files of the wrong kind -------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def wrong_kinds(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("wrong")
    files = {
        "pth": (asset("stories260K/meta/consolidated.00.pth"), "zip archive"),
        "safetensors": (asset("stories260K/hf/model.safetensors"), "safetensors file"),
        "tokenizer": (asset("stories260K/meta/tokenizer.model"), "not a llamacpu model file"),
        "json": (asset("stories260K/hf/config.json"), "not a llamacpu model file"),
        "png": (d / "image.png", "not a llamacpu model file"),
        "gguf": (d / "model.gguf", "is a GGUF file; convert it first"),
        "empty": (d / "empty.bin", "too small"),
        "folder": (d / "folder", "is a folder"),
        "fifo": (d / "fifo", "not a regular file"),
        "device": (Path(os.devnull), "not a regular file"),
        "missing": (d / "missing.bin", "no such file"),
    }
    files["png"][0].write_bytes(PNG)
    files["gguf"][0].write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 64)
    files["empty"][0].write_bytes(b"")
    files["folder"][0].mkdir()
    os.mkfifo(files["fifo"][0])  # opening it for reading would wait for a writer forever
    return files


@pytest.mark.parametrize("kind", ["pth", "safetensors", "tokenizer", "json", "png", "gguf", "empty", "folder",
                                  "fifo", "device", "missing"])
def test_wrong_kind_of_file(wrong_kinds, kind):
    path, message = wrong_kinds[kind]
    with pytest.raises(llamacpu.LlamaCPUError) as e:
        llamacpu.Llama(path)
    assert message in assert_one_line(e.value, path)
    expected = llamacpu.ModelNotFoundError if kind == "missing" else llamacpu.ModelFileError
    assert isinstance(e.value, expected)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, tiny):
    path = tmp_path / "locked.bin"
    path.write_bytes(tiny.read_bytes())
    path.chmod(0)
    with pytest.raises(llamacpu.ModelNotFoundError) as e:
        llamacpu.Llama(path)
    assert "cannot open" in assert_one_line(e.value, path)


def cli(*args, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LLAMACPU_DEBUG", None)
    here = os.path.dirname(os.path.dirname(os.path.abspath(llamacpu.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "llamacpu.cli", *map(str, args)], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, env=env)


@pytest.mark.parametrize("kind", ["pth", "safetensors", "png", "gguf", "fifo", "damaged"])
def test_cli_generate_refuses_with_one_line(tmp_path, wrong_kinds, tiny, kind):
    if kind == "damaged":
        data = bytearray(tiny.read_bytes())
        data[Layout(bytes(data)).meta_off + 20] ^= 0xFF
        path = tmp_path / "damaged.bin"
        path.write_bytes(data)
    else:
        path = wrong_kinds[kind][0]
    proc = cli("generate", path, "Once", "-n", "4")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert proc.stdout == b"" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("llamacpu: error: ") and str(path) in err, err


def test_cli_info_on_odd_but_valid_metadata(tmp_path, tiny):
    lay = Layout(tiny.read_bytes())
    meta = dict(lay.meta, source=5, quantization=["?"], chat_template="{{ messages }}" * 10)
    path = tmp_path / "odd.bin"
    path.write_bytes(lay.with_meta(meta))
    proc = cli("info", path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"source:        ?" in proc.stdout


# ---- GGUF --------------------------------------------------------------------------------

def test_gguf_names_with_line_breaks_stay_on_one_line(tmp_path):
    """Error messages quote keys and tensor names from the file (found by fuzz_gguf)."""
    key = "evil\nkey\r\x00\u2028".encode()
    path = tmp_path / "names.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<I", 99))
    from llamacpu.convert import read_gguf

    with pytest.raises(llamacpu.ModelFileError) as e:
        read_gguf(path)
    assert "unknown metadata value type 99" in assert_one_line(e.value, path)
    assert "evil\\x0akey" in str(e.value)


def test_damaged_gguf_converts_or_refuses(tmp_path):
    """Bytes of a small LLaMA GGUF damaged one at a time, through the converter: a clean
    refusal, or a model file that then loads (or is refused) like any other."""
    pytest.importorskip("gguf")
    from llamacpu.convert import convert_checkpoint, open_source

    good = seeds.write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    rng = np.random.default_rng(9)
    # Every byte of the fixed header and the first key, then a sample of the rest of the
    # metadata and tensor directory (the data section is weights).
    positions = list(range(48)) + sorted(rng.choice(np.arange(48, len(good) - 17 * 1024), 100, replace=False))
    src, out = tmp_path / "d.gguf", tmp_path / "d.bin"
    converted = 0
    for pos in positions:
        damaged = bytearray(good)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        src.write_bytes(damaged)
        try:
            with open_source(src) as ck:
                convert_checkpoint(ck, out, progress=False)
        except llamacpu.LlamaCPUError as e:
            assert_one_line(e, src)
            continue
        converted += 1
        outcome(out)
    assert converted > 0


# ---- checkpoints through `llamacpu convert` ---------------------------------------------
#
# tests/test_checkpoint.py checks the readers' errors; here each broken checkpoint goes
# through the command (in-process: cli.main is all the command does), which must print one
# line, exit non-zero, leave no file behind and leave an existing output alone.

def _meta_copy(tmp_path) -> Path:
    folder = tmp_path / "meta"
    folder.mkdir()
    for f in asset("stories260K/meta").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _hf_copy(tmp_path, change=None) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in asset("stories260K/hf").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if change is not None:
        st = pytest.importorskip("safetensors.numpy")
        weights = st.load_file(str(folder / "model.safetensors"))
        change(weights)
        st.save_file(weights, str(folder / "model.safetensors"))
    return folder


def _rezip(path: Path, drop=(), replace=None) -> None:
    """Rewrites a torch.save archive without some records, or with new contents for some."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        records = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            if not any(name.endswith(d) for d in drop):
                z.writestr(name, (replace or {}).get(name.rsplit("/", 1)[-1], data))


def _break(case: str, tmp_path: Path) -> tuple:
    """(source, what the error must mention) for one broken checkpoint."""
    if case.startswith("hf-"):
        change = {"hf-f64-weight": lambda w: w.update({"model.norm.weight": w["model.norm.weight"].astype(np.float64)}),
                  "hf-nan-weight": lambda w: w["model.layers.2.mlp.up_proj.weight"].__setitem__((3, 5), np.nan),
                  "hf-inf-weight": lambda w: w["model.embed_tokens.weight"].__setitem__((7, 1), -np.inf)}[case]
        folder = _hf_copy(tmp_path, change)
        return folder, {"hf-f64-weight": "model.norm.weight is stored as",
                        "hf-nan-weight": "model.layers.2.mlp.up_proj.weight (for layers.2.w13) holds NaN or Inf "
                                         "values (row 3)",
                        "hf-inf-weight": "model.embed_tokens.weight (for tok_embeddings) holds NaN or Inf values "
                                         "(row 7)"}[case]
    folder = _meta_copy(tmp_path)
    shard, params = folder / "consolidated.00.pth", folder / "params.json"
    if case == "no-params":
        params.unlink()
        return folder, "no params.json"
    if case == "params-is-folder":
        params.unlink()
        params.mkdir()
        return folder, "no params.json"
    if case == "params-invalid-json":
        params.write_text('{"dim": 64,')
        return folder, "invalid JSON"
    if case == "params-disagree":
        params.write_text(json.dumps(dict(json.loads(asset("stories260K/meta/params.json").read_text()), n_layers=4)))
        return folder, "n_layers=4"
    if case == "params-dim-disagrees":
        params.write_text(json.dumps(dict(json.loads(asset("stories260K/meta/params.json").read_text()), dim=128)))
        return folder, "params.json"
    if case == "missing-shard":
        shard.rename(folder / "consolidated.01.pth")
        return folder, "missing shard consolidated.00.pth"
    if case == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:600_000])
        return folder, "consolidated.00.pth"
    if case == "missing-storage-record":
        _rezip(shard, drop=("/data/3",))
        return folder, "data/3"
    if case == "missing-tokenizer":
        (folder / "tokenizer.model").unlink()
        return folder, "no tokenizer.model"
    if case == "garbage-tokenizer":
        (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
        return folder, "not a SentencePiece model"
    if case == "hostile-pickle":
        marker = tmp_path / "pwned"
        evil = (b"\x80\x02cposix\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little")
                + f"touch {marker}".encode() + b"\x85R.")
        _rezip(shard, replace={"data.pkl": evil})
        return folder, "refuses pickle global posix.system"
    raise AssertionError(case)


CONVERT_CASES = ["no-params", "params-is-folder", "params-invalid-json", "params-disagree", "params-dim-disagrees",
                 "missing-shard", "truncated-shard", "missing-storage-record", "missing-tokenizer",
                 "garbage-tokenizer", "hostile-pickle", "hf-f64-weight", "hf-nan-weight", "hf-inf-weight"]


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_refuses_a_broken_checkpoint(tmp_path, capsys, case):
    from llamacpu import cli

    source, mention = _break(case, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    precious = out_dir / "model.bin"
    precious.write_bytes(b"keep me")
    assert cli.main(["convert", str(source), str(precious), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamacpu: error: "), captured.err
    assert mention in lines[0]
    assert sorted(os.listdir(out_dir)) == ["model.bin"] and precious.read_bytes() == b"keep me"
    assert not (tmp_path / "pwned").exists()  # the hostile pickle ran nothing


@pytest.mark.parametrize("args, code, mention", [
    (["--dtype", "q3_x"], 2, "unknown --dtype 'q3_x'"),
    (["--dtype", ""], 2, "unknown --dtype ''"),
])
def test_convert_refuses_bad_options(tmp_path, capsys, args, code, mention):
    from llamacpu import cli

    precious = tmp_path / "model.bin"
    precious.write_bytes(b"keep me")
    assert cli.main(["convert", str(asset("stories260K/meta")), str(precious), "--no-progress", *args]) == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and mention in err, err
    assert sorted(os.listdir(tmp_path)) == ["model.bin"] and precious.read_bytes() == b"keep me"


def test_convert_into_a_missing_folder_or_onto_a_folder(tmp_path, capsys):
    from llamacpu import cli

    for out, mention in ((tmp_path / "no" / "such" / "m.bin", "does not exist"), (tmp_path, "is a folder")):
        assert cli.main(["convert", str(asset("stories260K/meta")), str(out), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and mention in err, err
    assert os.listdir(tmp_path) == []


def test_convert_broken_checkpoint_as_a_process(tmp_path):
    """The same through a real process: exit status 1, one line on stderr."""
    source, mention = _break("truncated-shard", tmp_path)
    proc = cli("convert", source, tmp_path / "m.bin", "--no-progress")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b""
    assert len(err.splitlines()) == 1 and mention in err, err
    assert not (tmp_path / "m.bin").exists() and not list(tmp_path.glob(".m.bin*"))
