"""Tokenizers: the LLaMA SentencePiece test vectors, tokenizers rebuilt from GGUF metadata
(SentencePiece and byte-level BPE), the Hugging Face tokenizer.json runtime, and the
tokenizer settings read from a Hugging Face folder's tokenizer_config.json.

Expected ids come from outside llamacpu: llama.cpp's test vectors for the LLaMA tokenizer,
the original tokenizer.model files, and for SmolLM2 the ids llama.cpp itself computed from
the same GGUF file (tests/data/smollm2-tokens.json, which says how it was made).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, asset

from llamacpu.errors import CheckpointError, ModelFileError
from llamacpu.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

VARIED = [
    "Hello world", " Hello world", "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "1234567", "3.14159 and 2,718,281", "a  b   c    d", "     leading", "trailing     ",
    "\t\ttabs\tand\tmore", "line1\nline2\r\nline3\n\n\nend", " \n \n", "\n", "",
    "héllo wörld — naïve café", "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया", "日本語のテキストです。",
    "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "e\u0301 combining", "zero\u200bwidth\u200djoin",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "<s>not special</s>", "<|im_start|>user\nhi<|im_end|>\n", "\u00a0nbsp\u3000ideographic",
    "x" * 100, "9" * 40, "\x00\x01 control chars\x7f",
]


def llama_vectors():
    """llama.cpp's LLaMA tokenizer test vectors: [(text, ids without BOS)]."""
    inp = asset("llama-tokenizer/ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    out = asset("llama-tokenizer/ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8")
    # Each input is followed by a line __ggml_vocab_test__; each output is one line.
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(x) for x in line.split()] for line in out.split("\n")[:len(texts)]]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids))


@pytest.fixture(scope="module")
def llama_spm():
    return SentencePieceTokenizer(asset("llama-tokenizer/tokenizer.model").read_bytes())


# ----------------------------------------------------------------------------- SentencePiece


def test_llama_vectors(llama_spm):
    # sentencepiece and llama.cpp agree on every one of llama.cpp's vectors.
    for text, ids in llama_vectors():
        assert llama_spm.encode(text, add_bos=False) == ids, repr(text)


def test_hello_world(llama_spm):
    assert llama_spm.encode("Hello world") == [1, 15043, 3186]


def write_spm_gguf(path, model_bytes: bytes):
    """A vocabulary-only GGUF with a SentencePiece tokenizer, as llama.cpp's converter writes
    it (tokens, scores and types from the model; normalizer flags from normalizer_spec)."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    tokens = [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
             else 6 if sp.IsByte(i) else 1 for i in range(sp.vocab_size())]
    add_prefix, remove_ws = normalizer_flags(model_bytes)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([sp.GetScore(i) for i in range(sp.vocab_size())])
    w.add_token_types(types)
    w.add_add_space_prefix(add_prefix)
    w.add_remove_extra_whitespaces(remove_ws)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def normalizer_flags(model: bytes) -> tuple:
    """(add_dummy_prefix, remove_extra_whitespaces) of a ModelProto's normalizer_spec (field 3),
    read from the protobuf wire format; both default to true."""
    def varint(b, i):
        r = shift = 0
        while True:
            c = b[i]
            i += 1
            r |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return r, i

    def fields(b):
        i = 0
        while i < len(b):
            key, i = varint(b, i)
            wt = key & 7
            if wt == 0:
                v, i = varint(b, i)
            elif wt in (1, 5):
                v, i = None, i + (8 if wt == 1 else 4)
            else:
                n, i = varint(b, i)
                v, i = b[i:i + n], i + n
            yield key >> 3, v

    flags = {3: 1, 4: 1}
    for f, v in fields(model):
        if f == 3:
            flags.update((ff, vv) for ff, vv in fields(v) if ff in flags)
    return bool(flags[3]), bool(flags[4])


@pytest.mark.parametrize("model", ["llama-tokenizer/tokenizer.model", "stories260K/meta/tokenizer.model"])
def test_sentencepiece_rebuilt_from_gguf(tmp_path, model):
    from llamacpu.convert.gguf import read_gguf_tokenizer

    original_bytes = asset(model).read_bytes()
    original = SentencePieceTokenizer(original_bytes)
    write_spm_gguf(tmp_path / "v.gguf", original_bytes)
    kind, data, info = read_gguf_tokenizer(tmp_path / "v.gguf")
    assert kind == "sentencepiece"
    assert (info["bos_id"], info["eos_id"], info["add_bos"]) == (1, 2, True)
    rebuilt = load_tokenizer(kind, data, "rebuilt", info)
    assert (rebuilt.n_vocab, rebuilt.bos_id, rebuilt.eos_id) == (original.n_vocab, original.bos_id, original.eos_id)
    assert rebuilt.control_ids == original.control_ids and rebuilt.stop_ids == original.stop_ids
    for i in range(original.n_vocab):
        assert rebuilt.piece(i) == original.piece(i) and rebuilt.token_bytes(i) == original.token_bytes(i)
    texts = [t for t, _ in llama_vectors()] + VARIED
    for text in texts:
        for special in (False, True):
            assert rebuilt.encode(text, special=special) == original.encode(text, special=special), repr(text)
        ids = original.encode(text, add_bos=False)
        assert rebuilt.decode(ids) == original.decode(ids)


def test_stories_gguf_keeps_whitespace_rule(tmp_path):
    """stories260K's tokenizer removes extra whitespace (SentencePiece's default), which the
    GGUF records in tokenizer.ggml.remove_extra_whitespaces: the rebuilt one must too."""
    from llamacpu.convert.gguf import read_gguf_tokenizer

    original_bytes = asset("stories260K/meta/tokenizer.model").read_bytes()
    original = SentencePieceTokenizer(original_bytes)
    assert original.encode("a  b") == original.encode("a b")  # what is being preserved
    write_spm_gguf(tmp_path / "v.gguf", original_bytes)
    kind, data, info = read_gguf_tokenizer(tmp_path / "v.gguf")
    assert load_tokenizer(kind, data, "x", info).encode("a   b ") == original.encode("a   b ")


# ----------------------------------------------------------------------------- SmolLM2 (real)


def smollm2_path():
    env = os.environ.get("LLAMACPU_SMOLLM2_GGUF")
    home = os.environ.get("LLAMACPU_HOME")
    cache = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamacpu"
    for p in ([Path(env)] if env else []) + [cache / "SmolLM2-135M-Instruct.Q4_1.gguf",
                                            cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"]:
        if p.is_file():
            return p
    pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf not found (set LLAMACPU_SMOLLM2_GGUF)")


@pytest.fixture(scope="module")
def smollm2():
    from llamacpu.convert.gguf import read_gguf_tokenizer

    kind, data, info = read_gguf_tokenizer(smollm2_path())
    assert kind == "hf-json"
    return load_tokenizer(kind, data, "smollm2", dict(info, kind=kind, offset=0, size=len(data)))


def test_smollm2_matches_llama_cpp(smollm2):
    fixture = json.loads((DATA / "smollm2-tokens.json").read_text(encoding="utf-8"))
    cases = fixture["cases"]
    assert len(cases) > 100
    for case in cases:
        text = case["text"]
        assert smollm2.encode(text, add_bos=False, special=False) == case["ids"], repr(text)
        assert smollm2.encode(text, add_bos=False, special=True) == case.get("ids_special", case["ids"]), repr(text)


def test_smollm2_special_tokens(smollm2):
    t = smollm2
    assert (t.bos_id, t.eos_id, t.add_bos, t.n_vocab) == (1, 2, False, 49152)
    assert t.encode("Hello", add_bos=True) == t.encode("Hello", add_bos=False)  # the file says no BOS
    assert t.stop_ids == {t.token_id("<|im_end|>"), t.token_id("<|endoftext|>")}
    assert t.control_ids == set(range(17)) and t.token_bytes(2) == b"" and t.piece(2) == "<|im_end|>"
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert t.encode(chat, special=True)[0] == 1 and t.encode(chat, special=True)[-1] == 2
    assert 1 not in t.encode(chat, special=False) and 2 not in t.encode(chat, special=False)
    assert t.strips_leading_space is False and t.token_id("no such piece") is None


def test_smollm2_round_trip(smollm2):
    fixture = json.loads((DATA / "smollm2-tokens.json").read_text(encoding="utf-8"))
    for text in VARIED + [c["text"] for c in fixture["cases"]]:
        ids = smollm2.encode(text, add_bos=False)
        assert b"".join(smollm2.token_bytes(i) for i in ids) == text.encode("utf-8"), repr(text)
        assert smollm2.decode(ids) == text


# ----------------------------------------------------------------------------- byte-level BPE


CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "Once upon a time, there was a little girl named Lily. She loved to play outside.",
          "def f(x):\n    return x + 1\n\n", "1234567890 2024 3.14 and 42", "héllo wörld 你好 😀"] * 20
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def trained_bpe():
    """A small byte-level BPE trained by Hugging Face tokenizers (GPT-2 pre-tokenization), as
    (reference tokenizer, tokens by id, merges "a b")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ref = Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.decoder = decoders.ByteLevel()
    ref.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=CONTROL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    doc = json.loads(ref.to_str())
    vocab = doc["model"]["vocab"]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    merges = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]
    return ref, tokens, merges


def write_bpe_gguf(path, tokens, merges, pre, user_defined=(), **kv):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens) + list(user_defined))
    w.add_token_types([3 if t in CONTROL else 1 for t in tokens] + [4] * len(user_defined))
    w.add_token_merges(merges)
    w.add_bos_token_id(kv.pop("bos", 1))
    w.add_eos_token_id(kv.pop("eos", 2))
    if "add_bos" in kv:
        w.add_add_bos_token(kv.pop("add_bos"))
    if "eot" in kv:
        w.add_uint32("tokenizer.ggml.eot_token_id", kv.pop("eot"))
    if "template" in kv:
        w.add_chat_template(kv.pop("template"))
    assert not kv
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bpe_from_gguf(path):
    from llamacpu.convert.gguf import read_gguf_tokenizer

    kind, data, info = read_gguf_tokenizer(path)
    assert kind == "hf-json"
    return load_tokenizer(kind, data, str(path), info), info


def test_bpe_gpt2_matches_hugging_face(tmp_path, trained_bpe):
    ref, tokens, merges = trained_bpe
    write_bpe_gguf(tmp_path / "v.gguf", tokens, merges, "gpt2", template="{{ messages }}")
    tok, info = bpe_from_gguf(tmp_path / "v.gguf")
    assert info["chat_template"] == "{{ messages }}" and info["add_bos"] is False
    texts = VARIED + CORPUS[:5]
    for text in texts:
        expect = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, special=True) == expect, repr(text)
        assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode("utf-8")


def test_bpe_specials_and_user_defined(tmp_path, trained_bpe):
    _, tokens, merges = trained_bpe
    write_bpe_gguf(tmp_path / "v.gguf", tokens, merges, "smollm", user_defined=["<tool call>"],
                   add_bos=True, bos=1, eos=0, eot=2)
    tok, info = bpe_from_gguf(tmp_path / "v.gguf")
    assert info["eot_ids"] == [2] and set(info["eog_pieces"]) == {"<|endoftext|>", "<|im_end|>"}
    assert tok.stop_ids == {0, 2} and tok.control_ids == {0, 1, 2}
    uid = len(tokens)
    # Control tokens become ids only with special=True; user-defined ones always do (as in
    # llama.cpp and Hugging Face), and their bytes are their text.
    text = "<|im_start|>say<tool call>x"
    assert tok.encode(text, add_bos=False, special=True)[0] == 1
    assert 1 not in tok.encode(text, add_bos=False, special=False)
    assert uid in tok.encode(text, special=False) and tok.token_bytes(uid) == b"<tool call>"
    assert tok.encode("hi", add_bos=True)[0] == 1 and tok.encode("hi", add_bos=False)[0] != 1
    # smollm splits digits one by one.
    digits = tok.encode("1234567", add_bos=False)
    assert len(digits) == 7 and tok.decode(digits) == "1234567"
    assert tok.decode([1, *tok.encode("é😀", add_bos=False), 2]) == "é😀"


def test_bpe_llama3_defaults_to_bos(tmp_path, trained_bpe):
    _, tokens, merges = trained_bpe
    write_bpe_gguf(tmp_path / "v.gguf", tokens, merges, "llama-bpe")
    tok, info = bpe_from_gguf(tmp_path / "v.gguf")
    assert info["add_bos"] is True and tok.encode("hi")[0] == 1
    # LLaMA-3 splits digit runs into groups of three: no token crosses a group's end.
    ids = tok.encode("1234567", add_bos=False)
    ends = np.cumsum([len(tok.token_bytes(i)) for i in ids]).tolist()
    assert {3, 6, 7} <= set(ends) and tok.decode(ids) == "1234567"


def test_bpe_unknown_pre_type_refused(tmp_path, trained_bpe):
    from llamacpu.convert.gguf import read_gguf_tokenizer

    _, tokens, merges = trained_bpe
    path = tmp_path / "v.gguf"
    write_bpe_gguf(path, tokens, merges, "no-such-pre")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'no-such-pre' is not a pre-tokenizer") as e:
        read_gguf_tokenizer(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("pre", ["default", "llama3", "qwen2", "tekken", "gpt-4o", "falcon", "bloom", "viking"])
def test_every_pre_type_builds(tmp_path, trained_bpe, pre):
    # Each pre-tokenizer's regexes must be ones Oniguruma (tokenizers) accepts, and keep text.
    _, tokens, merges = trained_bpe
    write_bpe_gguf(tmp_path / "v.gguf", tokens, merges, pre)
    tok, _ = bpe_from_gguf(tmp_path / "v.gguf")
    for text in VARIED:
        assert b"".join(tok.token_bytes(i) for i in tok.encode(text, add_bos=False)) == text.encode("utf-8")


# ----------------------------------------------------------------------------- HFTokenizer


def spm_style_tokenizer_json() -> bytes:
    """A tiny SentencePiece-style tokenizer.json (Metaspace, byte fallback), as Hugging Face
    writes for LLaMA-2-family models without tokenizer.model."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "h", "i", "▁h", "▁hi"]:
        vocab[piece] = len(vocab)
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in list(vocab.items())[:3]],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                   {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [["▁", "h"], ["▁h", "i"]]},
    }).encode()


def test_hf_sentencepiece_style():
    tok = HFTokenizer(spm_style_tokenizer_json(), "x", {"bos_token": "<s>", "eos_token": "</s>"})
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)  # from the post-processor
    ids = tok.encode("hi\n", add_bos=True)
    assert ids[0] == 1 and tok.piece(ids[1]) == "▁hi" and tok.token_bytes(ids[-1]) == b"\n"
    assert tok.strips_leading_space and tok.decode(ids) == "hi\n"
    assert tok.token_bytes(0) == b"" and tok.stop_ids == {2}


def test_load_tokenizer_dispatch_and_damage():
    assert isinstance(load_tokenizer("hf-json", spm_style_tokenizer_json(), "m", {}), HFTokenizer)
    for kind, data in (("hf-json", b"{not json"), ("hf-json", b'{"model": {"type": "Nope"}}'),
                       ("hf-json", b"\xff\xfe"), ("what", b"")):
        with pytest.raises(ModelFileError) as e:
            load_tokenizer(kind, data, "m.bin", {})
        assert "\n" not in str(e.value) and "m.bin" in str(e.value)


# ----------------------------------------------------------------------------- HF folders


def test_hf_folder_tokenizer_config(tmp_path):
    from llamacpu.convert import open_checkpoint

    folder = tmp_path / "hf"
    shutil.copytree(asset("stories260K/hf"), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>"},
        "chat_template": [{"name": "default", "template": "{{ bos_token }}default"},
                          {"name": "tool_use", "template": "tools"}]}))
    with open_checkpoint(folder) as ck:
        assert ck.chat_template == "{{ bos_token }}default"
        assert ck.tokenizer_info == {"add_bos": False, "bos_token": "<s>", "bos_id": 1,
                                     "eos_token": "</s>", "eos_id": 2}
    (folder / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    with open_checkpoint(folder) as ck:
        assert ck.chat_template == "{{ messages }}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(CheckpointError, match="chat_template must be a string"):
        open_checkpoint(folder)


def test_hf_folder_without_tokenizer_config():
    from llamacpu.convert import open_checkpoint

    with open_checkpoint(asset("stories260K/hf")) as ck:
        assert ck.chat_template is None
        assert ck.tokenizer_info == {"bos_id": 1, "eos_id": 2}


def test_hf_folder_tokenizer_json_ids(tmp_path):
    from llamacpu.convert import open_checkpoint

    folder = tmp_path / "hf"
    shutil.copytree(asset("stories260K/hf"), folder)
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_bytes(spm_style_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    with open_checkpoint(folder) as ck:
        assert ck.tokenizer_kind == "hf-json"
        info = ck.tokenizer_info
        assert (info["bos_id"], info["eos_id"]) == (1, 2) and "add_bos" not in info
        tok = load_tokenizer(ck.tokenizer_kind, ck.tokenizer_data, "m", info)
    assert tok.encode("hi")[0] == 1  # the post-processor adds BOS, so add_bos defaults to true
