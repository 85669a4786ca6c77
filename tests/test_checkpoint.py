"""Tests of the converter's checkpoint readers (llamacpu.convert): Meta and Hugging Face
layouts, storage types, shard merging, the safe unpickler and the error messages."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llamacpu.convert import open_checkpoint, read_safetensors, read_torch_zip, unrotate_half_perm
from llamacpu.convert.tensor import SourceFile
from llamacpu.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError


def find_assets():
    """The shared test assets: ../shared/assets beside the repo, or a copy in tests/data."""
    repo = Path(__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "assets", repo / "shared" / "assets", repo / "tests" / "data"):
        if (cand / "stories260K" / "meta" / "params.json").is_file():
            return cand
    return None


ASSETS = find_assets()
STORIES = ASSETS / "stories260K" if ASSETS else None
needs_assets = pytest.mark.skipif(ASSETS is None, reason="stories260K assets not found")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def st_torch():
    return pytest.importorskip("safetensors.torch")


# --------------------------------------------------------------------------- helpers

# Meta name of each canonical name's suffix, and the dim model-parallel shards split.
META = {
    "tok_embeddings": ("tok_embeddings.weight", 1), "norm": ("norm.weight", None),
    "output": ("output.weight", 0),
    "attention_norm": ("attention_norm.weight", None), "ffn_norm": ("ffn_norm.weight", None),
    "wq": ("attention.wq.weight", 0), "wk": ("attention.wk.weight", 0),
    "wv": ("attention.wv.weight", 0), "wo": ("attention.wo.weight", 1),
    "w1": ("feed_forward.w1.weight", 0), "w2": ("feed_forward.w2.weight", 1),
    "w3": ("feed_forward.w3.weight", 0),
}
META_SPLIT = {name: dim for name, dim in META.values()}


def meta_name(canon):
    if canon.startswith("layers."):
        _, i, suffix = canon.split(".")
        return f"layers.{i}.{META[suffix][0]}"
    return META[canon][0]


def split_dim(meta_key):
    for suffix, dim in META_SPLIT.items():
        if meta_key == suffix or meta_key.endswith("." + suffix):
            return dim
    return None


def read_all(path):
    with open_checkpoint(path) as ck:
        return ck.config, {k: t.read() for k, t in ck.tensors.items()}


def write_meta(folder, torch, shards, params=None, tokenizer=True):
    folder.mkdir(parents=True, exist_ok=True)
    p = json.loads((STORIES / "meta" / "params.json").read_text())
    p.update(params or {})
    (folder / "params.json").write_text(json.dumps(p))
    for i, sd in enumerate(shards):
        torch.save(sd, folder / f"consolidated.{i:02d}.pth")
    if tokenizer:
        shutil.copy(STORIES / "meta" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def shard_state_dict(sd, n):
    shards = [{} for _ in range(n)]
    for k, t in sd.items():
        dim = split_dim(k)
        parts = [t] * n if dim is None else t.chunk(n, dim)
        for shard, part in zip(shards, parts):
            shard[k] = part.clone()
    return shards


def write_hf(folder, config=None, tokenizer=True):
    folder.mkdir(parents=True, exist_ok=True)
    c = json.loads((STORIES / "hf" / "config.json").read_text())
    c.update(config or {})
    (folder / "config.json").write_text(json.dumps(c))
    if tokenizer:
        shutil.copy(STORIES / "hf" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def rewrite_zip(src, dst, compress=zipfile.ZIP_STORED, transform=None):
    """Copy a zip record by record, optionally compressing or changing record contents."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if transform:
                data = transform(info.filename, data)
            zout.writestr(info.filename, data)


def assert_one_line_error(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


@pytest.fixture(scope="module")
def meta_sd(torch):
    return torch.load(STORIES / "meta" / "consolidated.00.pth", weights_only=True)


@pytest.fixture(scope="module")
def hf_sd(st_torch):
    return st_torch.load_file(STORIES / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def reference():
    if ASSETS is None:
        pytest.skip("stories260K assets not found")
    return read_all(STORIES / "meta")


# --------------------------------------------------------------------------- layouts


@needs_assets
def test_meta_and_hf_give_identical_canonical_tensors(reference, meta_sd):
    config, ref = reference
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (64, 5, 8, 4)
    assert (config.ffn_dim, config.vocab_size, config.head_dim, config.max_seq_len) == (172, 512, 8, 512)
    assert config.tied_output and "output" not in ref
    assert (config.bos_id, config.eos_id) == (1, 2)
    hf_config, hf = read_all(STORIES / "hf")
    assert hf_config.to_dict() == config.to_dict()
    assert list(hf) == list(ref)  # same names, same order
    for name in ref:
        assert ref[name].dtype == np.float32 and ref[name].flags.c_contiguous
        np.testing.assert_array_equal(hf[name], ref[name], err_msg=name)  # proves the q/k un-permutation
        np.testing.assert_array_equal(ref[name], meta_sd[meta_name(name)].numpy(), err_msg=name)
    assert set(meta_sd) - {meta_name(n) for n in ref} <= {"rope.freqs"}


@needs_assets
def test_checkpoint_metadata():
    with open_checkpoint(STORIES / "meta") as ck:
        assert ck.tokenizer_kind == "sentencepiece"
        assert ck.tokenizer_data == (STORIES / "meta" / "tokenizer.model").read_bytes()
        assert ck.source == "meta, 1 shard" and ck.name == "meta"
        assert ck.tensors["layers.0.wk"].shape == (32, 64) and ck.tensors["norm"].dtype == "f32"
    with open_checkpoint(STORIES / "hf") as ck:
        assert ck.source == "hf, model.safetensors"


@needs_assets
@pytest.mark.parametrize("n", [2, 4])
def test_meta_shards_merge_back_exactly(tmp_path, torch, meta_sd, reference, n):
    _, ref = reference
    sd = dict(meta_sd)
    sd["output.weight"] = sd["tok_embeddings.weight"] * 0.5  # untied, so output merges too
    folder = write_meta(tmp_path / "model", torch, shard_state_dict(sd, n), tokenizer=False)
    # Meta's releases keep tokenizer.model in the parent folder.
    shutil.copy(STORIES / "meta" / "tokenizer.model", tmp_path / "tokenizer.model")
    with open_checkpoint(folder) as ck:
        assert ck.source == f"meta, {n} shards" and not ck.config.tied_output
        got = {k: t.read() for k, t in ck.tensors.items()}
        # Row blocks that straddle shard boundaries (dim 0) and column joins (dim 1).
        wq, w2 = ck.tensors["layers.1.wq"], ck.tensors["layers.1.w2"]
        np.testing.assert_array_equal(wq.read_rows(5, 50), got["layers.1.wq"][5:50])
        np.testing.assert_array_equal(w2.read_rows(3, 9), got["layers.1.w2"][3:9])
        np.testing.assert_array_equal(ck.tensors["norm"].read_rows(60, 64), ref["norm"][60:])
    np.testing.assert_array_equal(got.pop("output"), ref["tok_embeddings"] * 0.5)
    assert list(got) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


@needs_assets
@pytest.mark.parametrize("layout", ["bin", "bin-index", "safetensors-index"])
def test_hf_weight_layouts(tmp_path, torch, st_torch, hf_sd, reference, layout):
    _, ref = reference
    folder = write_hf(tmp_path / "m")
    if layout == "bin":
        torch.save(hf_sd, folder / "pytorch_model.bin")
    else:
        keys = sorted(hf_sd)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        ext = "bin" if layout == "bin-index" else "safetensors"
        stem = "pytorch_model" if ext == "bin" else "model"
        weight_map = {}
        for i, half in enumerate(halves):
            fname = f"{stem}-{i + 1:05d}-of-00002.{ext}"
            part = {k: hf_sd[k] for k in half}
            if ext == "bin":
                torch.save(part, folder / fname)
            else:
                st_torch.save_file(part, folder / fname)
            weight_map.update({k: fname for k in half})
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config, got = read_all(folder)
    assert list(got) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


@needs_assets
def test_nested_state_dict(tmp_path, torch, meta_sd, reference):
    folder = write_meta(tmp_path / "m", torch, [{"model": meta_sd, "epoch": 3}])
    _, got = read_all(folder)
    np.testing.assert_array_equal(got["layers.4.w2"], reference[1]["layers.4.w2"])


@needs_assets
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_storage_types(tmp_path, torch, st_torch, meta_sd, hf_sd, dtype):
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    meta = {k: v.to(tdtype) for k, v in meta_sd.items()}
    write_meta(tmp_path / "meta", torch, [meta])
    hf = write_hf(tmp_path / "hf")
    st_torch.save_file({k: v.to(tdtype) for k, v in hf_sd.items()}, hf / "model.safetensors")
    with open_checkpoint(tmp_path / "meta") as ck:
        assert {t.dtype for t in ck.tensors.values()} == {dtype}
        got = {k: t.read() for k, t in ck.tensors.items()}
    for name, arr in got.items():
        # torch's own widening is the reference.
        np.testing.assert_array_equal(arr, meta[meta_name(name)].float().numpy(), err_msg=name)
    _, got_hf = read_all(hf)
    for name in got:
        np.testing.assert_array_equal(got_hf[name], got[name], err_msg=name)


@needs_assets
def test_hf_tied_and_untied_output(tmp_path, st_torch, hf_sd, reference):
    _, ref = reference
    sd = dict(hf_sd)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] * 2
    untied = write_hf(tmp_path / "untied", {"tie_word_embeddings": False})
    st_torch.save_file(sd, untied / "model.safetensors")
    config, got = read_all(untied)
    assert not config.tied_output
    np.testing.assert_array_equal(got["output"], ref["tok_embeddings"] * 2)
    # Declared untied, but lm_head absent: the output is tied after all.
    absent = write_hf(tmp_path / "absent", {"tie_word_embeddings": False})
    shutil.copy(STORIES / "hf" / "model.safetensors", absent / "model.safetensors")
    config, got = read_all(absent)
    assert config.tied_output and "output" not in got


@needs_assets
def test_hf_config_fields(tmp_path):
    folder = write_hf(tmp_path / "m", {"eos_token_id": [2, 7], "rope_theta": 500000.0,
                                       "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    shutil.copy(STORIES / "hf" / "model.safetensors", folder / "model.safetensors")
    with open_checkpoint(folder) as ck:
        c = ck.config
        assert c.eos_id == 2 and c.extra["eos_ids"] == [2, 7] and c.rope_theta == 500000.0
        assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@needs_assets
def test_hf_json_tokenizer_is_carried(tmp_path):
    folder = write_hf(tmp_path / "m", tokenizer=False)
    shutil.copy(STORIES / "hf" / "model.safetensors", folder / "model.safetensors")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with open_checkpoint(folder) as ck:
        assert ck.tokenizer_kind == "hf-json"
        assert ck.tokenizer_data == b'{"model": {"type": "BPE"}}'


@needs_assets
def test_vocab_size_minus_one_comes_from_tokenizer(tmp_path, torch, meta_sd):
    folder = write_meta(tmp_path / "m", torch, [meta_sd], {"vocab_size": -1})
    config, _ = read_all(folder)
    assert config.vocab_size == 512


def test_unrotate_half_perm_inverts_hf_permutation():
    n_heads, hd, dim = 3, 8, 5
    meta = np.arange(n_heads * hd * dim, dtype=np.float32).reshape(n_heads * hd, dim)
    # transformers' convert_llama_weights_to_hf.permute
    hf = meta.reshape(n_heads, hd // 2, 2, dim).transpose(0, 2, 1, 3).reshape(n_heads * hd, dim)
    np.testing.assert_array_equal(hf[unrotate_half_perm(n_heads, hd)], meta)


@needs_assets
def test_no_torch_import():
    code = ("import sys; from llamacpu.convert import open_checkpoint\n"
            f"ck = open_checkpoint({str(STORIES / 'meta')!r}); ck.tensors['layers.0.wq'].read()\n"
            f"ck = open_checkpoint({str(STORIES / 'hf')!r}); ck.tensors['layers.0.wq'].read()\n"
            "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


@needs_assets
def test_rows_are_read_lazily(monkeypatch):
    asked = []
    real_read = SourceFile.read
    monkeypatch.setattr(SourceFile, "read", lambda self, off, n: asked.append(n) or real_read(self, off, n))
    with open_checkpoint(STORIES / "meta") as ck:
        asked.clear()
        rows = ck.tensors["tok_embeddings"].read_rows(100, 103)
    assert rows.shape == (3, 64) and asked == [3 * 64 * 4]


# --------------------------------------------------------------------------- torch zip details


def test_strided_and_shared_storage_views(tmp_path, torch):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {"t": base.t(), "slice": base[2:5, 3:8], "row": base[4], "expand": base[1, :3].expand(4, 3),
          "same": base, "again": base}
    torch.save(sd, tmp_path / "x.pth")
    with read_torch_zip(tmp_path / "x.pth") as tf:
        for name, t in sd.items():
            np.testing.assert_array_equal(tf.tensors[name].read(), t.numpy(), err_msg=name)
            assert tf.tensors[name].name == name
        np.testing.assert_array_equal(tf.tensors["t"].read_rows(3, 7), base.t()[3:7].numpy())


@needs_assets
def test_big_endian_archive(tmp_path, meta_sd, reference):
    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data

    folder = tmp_path / "m"
    shutil.copytree(STORIES / "meta", folder)
    (folder / "consolidated.00.pth").unlink()
    rewrite_zip(STORIES / "meta" / "consolidated.00.pth", folder / "consolidated.00.pth", transform=to_big)
    _, got = read_all(folder)
    for name, arr in reference[1].items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_torch_style_zip(path, data_pkl):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("payload", ["top", "nested"])
def test_hostile_pickle_is_refused_before_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsCommand(f"touch {marker}")
    obj = evil if payload == "top" else {"tok_embeddings.weight": [1, {"x": evil}]}
    folder = tmp_path / "m"
    folder.mkdir()
    write_torch_style_zip(folder / "consolidated.00.pth", pickle.dumps(obj, protocol=2))
    (folder / "params.json").write_text('{"dim": 64, "n_layers": 5, "n_heads": 8}')
    if ASSETS:
        shutil.copy(STORIES / "meta" / "tokenizer.model", folder / "tokenizer.model")
        with pytest.raises(UnsafeCheckpointError) as e:
            open_checkpoint(folder)
        assert_one_line_error(e, "consolidated.00.pth", "refuses pickle global", "system")
    with pytest.raises(UnsafeCheckpointError):
        read_torch_zip(folder / "consolidated.00.pth")
    assert not marker.exists()


@pytest.mark.parametrize("obj", [
    (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval"),
    (b"\x80\x02ctorch\nload\n.", "torch.load"),
])
def test_other_globals_are_refused(tmp_path, obj):
    data, name = obj
    write_torch_style_zip(tmp_path / "x.pth", data)
    with pytest.raises(UnsafeCheckpointError) as e:
        read_torch_zip(tmp_path / "x.pth")
    assert_one_line_error(e, name)


def test_malformed_storage_references(tmp_path):
    # A persistent id naming a record the archive lacks, and one that is not a storage tuple.
    missing = (b"\x80\x02}X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\n"
               b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x009X\x03\x00\x00\x00cpuK\x04tQ"
               b"K\x00K\x04\x85K\x01\x85\x89tRs.")
    write_torch_style_zip(tmp_path / "a.pth", missing)
    with pytest.raises(CheckpointError) as e:
        read_torch_zip(tmp_path / "a.pth")
    assert_one_line_error(e, "data/9")
    write_torch_style_zip(tmp_path / "b.pth", b"\x80\x02X\x03\x00\x00\x00abcQ.")
    with pytest.raises(CheckpointError) as e:
        read_torch_zip(tmp_path / "b.pth")
    assert_one_line_error(e, "persistent id")


def test_view_outside_storage_is_refused(tmp_path, torch):
    torch.save({"a": torch.zeros(4)}, tmp_path / "x.pth")
    # Patch the pickled size (4,) to (5,): the view would read past its 4-element storage.
    def grow(name, data):
        return data.replace(b"K\x00K\x04\x85", b"K\x00K\x05\x85") if name.endswith("data.pkl") else data
    rewrite_zip(tmp_path / "x.pth", tmp_path / "y.pth", transform=grow)
    with pytest.raises(CheckpointError) as e:
        read_torch_zip(tmp_path / "y.pth")
    assert_one_line_error(e, "y.pth", "tensor a:", "storage of 4")


# --------------------------------------------------------------------------- safetensors


def write_safetensors(path, header, data=b""):
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def test_safetensors_parser(tmp_path):
    vals = np.arange(6, dtype="<f4")
    write_safetensors(tmp_path / "a.safetensors", {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "ids": {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]},
    }, vals.tobytes() + b"\0" * 8)
    with read_safetensors(tmp_path / "a.safetensors") as tf:
        np.testing.assert_array_equal(tf.tensors["w"].read(), vals.reshape(2, 3))
        with pytest.raises(CheckpointError):  # deferred until read
            tf.tensors["ids"].read()


@pytest.mark.parametrize("header,data,fragment", [
    ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 24, "needs 24"),
    ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, b"\0" * 12, "outside"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "bad shape"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"", "bad data_offsets"),
    ([1, 2], b"", "not a JSON object"),
])
def test_safetensors_bad_headers(tmp_path, header, data, fragment):
    write_safetensors(tmp_path / "a.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tmp_path / "a.safetensors")
    assert_one_line_error(e, "a.safetensors", fragment)


def test_safetensors_huge_or_broken_header(tmp_path):
    (tmp_path / "a.safetensors").write_bytes((1 << 40).to_bytes(8, "little"))
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tmp_path / "a.safetensors")
    assert_one_line_error(e, "limit")
    (tmp_path / "b.safetensors").write_bytes((5).to_bytes(8, "little") + b"{oops")
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tmp_path / "b.safetensors")
    assert_one_line_error(e, "not valid JSON")


# --------------------------------------------------------------------------- error cases


def test_missing_paths_and_non_checkpoints(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        open_checkpoint(tmp_path / "nope")
    assert_one_line_error(e, "nope", "no such file")
    (tmp_path / "file.bin").write_bytes(b"xyz")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "file.bin")
    assert_one_line_error(e, "file.bin", "expected a Meta checkpoint folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "empty")
    assert_one_line_error(e, "empty", "not a checkpoint")


@needs_assets
def test_missing_params_json(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(STORIES / "meta", folder)
    (folder / "params.json").unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "no params.json")


@needs_assets
@pytest.mark.parametrize("name", ["params.json", "config.json"])
def test_invalid_json(tmp_path, name):
    folder = tmp_path / "m"
    shutil.copytree(STORIES / ("meta" if name == "params.json" else "hf"), folder)
    (folder / name).write_text('{"dim": 64,')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, name, "invalid JSON")


@needs_assets
def test_gap_in_shard_numbering(tmp_path, torch, meta_sd):
    folder = write_meta(tmp_path / "m", torch, shard_state_dict(meta_sd, 2))
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "missing shard consolidated.01.pth")


@needs_assets
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_shard(tmp_path, keep):
    folder = tmp_path / "m"
    shutil.copytree(STORIES / "meta", folder)
    shard = folder / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "consolidated.00.pth")


@needs_assets
def test_record_past_end_of_file(tmp_path):
    # Cut out the data of the first tensor but keep a valid central directory.
    def shrink(name, data):
        return data[:100] if name.endswith("/data/0") else data
    folder = tmp_path / "m"
    shutil.copytree(STORIES / "meta", folder)
    rewrite_zip(STORIES / "meta" / "consolidated.00.pth", folder / "consolidated.00.pth", transform=shrink)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "consolidated.00.pth", "data/0")


@needs_assets
@pytest.mark.parametrize("params,fragments", [
    ({"n_kv_heads": 8}, ["layers.0.attention.wk.weight", "[32, 64]", "[64, 64]"]),
    ({"multiple_of": 32}, ["172", "192"]),
    ({"vocab_size": 600}, ["tok_embeddings.weight", "[600, 64]"]),
    ({"n_layers": 4}, ["n_layers=4", "layers up to 4"]),
    ({"n_layers": 6}, ["lacks tensor layers.5.attention_norm.weight (layers.5.attention_norm)"]),
    ({"dim": 60}, ["dim=60"]),
])
def test_params_disagree_with_tensors(tmp_path, params, fragments):
    folder = tmp_path / "m"
    shutil.copytree(STORIES / "meta", folder)
    p = json.loads((folder / "params.json").read_text())
    p.update(params)
    (folder / "params.json").write_text(json.dumps(p))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, *fragments)


@needs_assets
def test_integer_weights_refused_but_unused_int_buffers_skipped(tmp_path, torch, meta_sd):
    sd = dict(meta_sd, **{"rope.freqs": torch.arange(4)})
    _, got = read_all(write_meta(tmp_path / "ok", torch, [sd]))
    assert "rope.freqs" not in got
    sd["norm.weight"] = torch.ones(64, dtype=torch.int64)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(write_meta(tmp_path / "bad", torch, [sd]))
    assert_one_line_error(e, "norm.weight", "int64")


@needs_assets
def test_unexpected_tensor_refused(tmp_path, torch, meta_sd):
    sd = dict(meta_sd, **{"layers.0.attention.wq.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(write_meta(tmp_path / "m", torch, [sd]))
    assert_one_line_error(e, "unexpected tensor layers.0.attention.wq.bias")


@needs_assets
def test_missing_tokenizer(tmp_path, torch, meta_sd):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(write_meta(tmp_path / "m", torch, [meta_sd], tokenizer=False))
    assert_one_line_error(e, "tokenizer.model")
    hf = write_hf(tmp_path / "hf", tokenizer=False)
    shutil.copy(STORIES / "hf" / "model.safetensors", hf / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(hf)
    assert_one_line_error(e, "no tokenizer.model or tokenizer.json")


@needs_assets
def test_compressed_record_refused(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(STORIES / "meta", folder)
    rewrite_zip(STORIES / "meta" / "consolidated.00.pth", folder / "consolidated.00.pth",
                compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "consolidated.00.pth", "compressed")


def test_legacy_torch_format_refused(tmp_path, torch):
    torch.save({"a": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as e:
        read_torch_zip(tmp_path / "old.pth")
    assert_one_line_error(e, "old.pth", "legacy")


@needs_assets
def test_unknown_architecture(tmp_path):
    folder = write_hf(tmp_path / "m", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "config.json", "GPT2LMHeadModel")


@needs_assets
def test_hf_missing_tensor_and_bad_index(tmp_path, st_torch, hf_sd):
    folder = write_hf(tmp_path / "m")
    st_torch.save_file({k: v for k, v in hf_sd.items() if k != "model.layers.3.self_attn.k_proj.weight"},
                       folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "lacks tensor model.layers.3.self_attn.k_proj.weight (layers.3.wk)")
    folder = write_hf(tmp_path / "idx")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "bad file")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert_one_line_error(e, "model-00001-of-00002.safetensors", "missing")
