"""Chat templates without a real chat model: the built-in formats render exactly the text
each model family was trained on, a model's own Jinja template renders in a sandbox that
refuses anything but building strings, the CLI's --template picks the format, and a plain
transcript's stop string ends the answer before a made-up next turn.

Where a model is needed (tokens, the CLI) it is stories260K, which knows none of these
formats: the tests look at what is rendered and how it is cut, not at answer quality."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import llamacpu
from llamacpu.chat import BUILTIN, chat_format
from llamacpu.jinja_template import TemplateError
from llamacpu.sampling import SamplingParams

from conftest import asset

SYSTEM = {"role": "system", "content": "Be brief."}
USER1 = {"role": "user", "content": "Hi there"}
ANSWER1 = {"role": "assistant", "content": "Hello! A cat sat."}
USER2 = {"role": "user", "content": "And then?"}

CONVERSATIONS = {
    "1-turn": [USER1],
    "1-turn+system": [SYSTEM, USER1],
    "2-turn": [USER1, ANSWER1, USER2],
    "2-turn+system": [SYSTEM, USER1, ANSWER1, USER2],
}

# Written by hand from each format's definition, with bos "<s>" and eos "</s>":
#  - llama-2: Meta's chat_completion (llama/generation.py): every user turn is
#    "<s>[INST] {user} [/INST]", an answer follows as " {answer} </s>", and the system prompt
#    goes inside the first user turn as "<<SYS>>\n{system}\n<</SYS>>\n\n".
#  - chatml: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the assistant header.
#  - plain: a transcript a base model continues: "User: ...", "Assistant: ...".
EXPECTED = {
    ("llama-2", "1-turn"): "<s>[INST] Hi there [/INST]",
    ("llama-2", "1-turn+system"): "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]",
    ("llama-2", "2-turn"): "<s>[INST] Hi there [/INST] Hello! A cat sat. </s><s>[INST] And then? [/INST]",
    ("llama-2", "2-turn+system"): ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! A cat sat. </s>"
                                   "<s>[INST] And then? [/INST]"),
    ("chatml", "1-turn"): "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", "1-turn+system"): ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                                  "<|im_start|>assistant\n"),
    ("chatml", "2-turn"): ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! A cat sat.<|im_end|>\n"
                           "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"),
    ("chatml", "2-turn+system"): ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                                  "<|im_start|>assistant\nHello! A cat sat.<|im_end|>\n"
                                  "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"),
    ("plain", "1-turn"): "<s>User: Hi there\nAssistant:",
    ("plain", "1-turn+system"): "<s>Be brief.\n\nUser: Hi there\nAssistant:",
    ("plain", "2-turn"): "<s>User: Hi there\nAssistant: Hello! A cat sat.\nUser: And then?\nAssistant:",
    ("plain", "2-turn+system"): ("<s>Be brief.\n\nUser: Hi there\nAssistant: Hello! A cat sat.\nUser: And then?\n"
                                 "Assistant:"),
}


def render(fmt, messages, add_generation_prompt=True):
    return fmt.render(messages, add_generation_prompt, "<s>", "</s>")


# ---- built-in formats ---------------------------------------------------------------------

@pytest.mark.parametrize("name,conversation", sorted(EXPECTED))
def test_builtin_template_renders_exactly(name, conversation):
    assert render(chat_format(name), CONVERSATIONS[conversation]) == EXPECTED[(name, conversation)]


def test_builtin_templates_are_the_documented_three():
    assert set(BUILTIN) == {"llama-2", "chatml", "plain"}
    assert {name for name, _ in EXPECTED} == set(BUILTIN)


def test_chatml_without_generation_prompt_ends_with_the_last_message():
    text = render(chat_format("chatml"), [USER1, ANSWER1], add_generation_prompt=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! A cat sat.<|im_end|>\n"


def test_stop_markers_of_each_format():
    # What ends an answer: chatml's end-of-turn token, the plain transcript's next "User:".
    assert chat_format("chatml").stop_pieces == ["<|im_end|>"]
    assert chat_format("plain").stop_strings == ["\nUser:"]
    assert chat_format("llama-2").stop_strings == [] and chat_format("llama-2").stop_pieces == []


def test_unknown_template_name_lists_the_choices():
    with pytest.raises(llamacpu.UsageError) as e:
        chat_format("vicuna")
    assert "vicuna" in str(e.value) and all(name in str(e.value) for name in BUILTIN)


def meta_llama2_tokens(sp, dialog) -> list:
    """Meta's reference: llama/generation.py Llama.chat_completion's tokenization, verbatim
    apart from names (each pair encoded with BOS and EOS, the last user turn with BOS)."""
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        first = b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": first}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id()] + sp.encode(f"{b_inst} {prompt['content'].strip()} {e_inst} "
                                            f"{answer['content'].strip()} ") + [sp.eos_id()]
    return tokens + [sp.bos_id()] + sp.encode(f"{b_inst} {dialog[-1]['content'].strip()} {e_inst}")


@pytest.fixture(scope="module")
def stories(stories_models):
    return stories_models["f32"]


# Whitespace around the messages: Meta strips each user turn (with the system block in
# front of the first) and each answer, and keeps the rest.
PADDED = [{"role": "system", "content": "  Be brief. \n"}, {"role": "user", "content": "  Hi there \n"},
          {"role": "assistant", "content": "\n Hello!  "}, {"role": "user", "content": " And then?\n"}]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS) + ["padded"])
def test_llama2_prompt_tokens_equal_metas(stories, conversation):
    # The rendered text goes through the tokenizer with its special pieces ("<s>", "</s>")
    # turned into their ids: the token ids must be exactly those Meta's code builds.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(asset("stories260K/meta/tokenizer.model")))
    dialog = PADDED if conversation == "padded" else CONVERSATIONS[conversation]
    with llamacpu.Llama(stories, chat_format="llama-2", n_threads=1) as llm:
        out = llm.create_chat_completion(dialog, max_tokens=1, temperature=0)
        assert out["usage"]["prompt_tokens"] == len(meta_llama2_tokens(sp, dialog))
        assert llm._render_chat(dialog) == meta_llama2_tokens(sp, dialog)


# ---- a model's own (Jinja) template ---------------------------------------------------------

# SmolLM2-135M-Instruct's template, as its GGUF file holds it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_model_template_renders_like_its_definition():
    fmt = chat_format(SMOLLM2_TEMPLATE)
    assert fmt.name == "model"
    assert render(fmt, [USER1]) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    assert render(fmt, [SYSTEM, USER1], add_generation_prompt=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"


def test_template_sees_bos_eos_and_trims_blocks_like_transformers():
    # transformers renders with trim_blocks and lstrip_blocks: the newline after a block tag
    # and the indentation before one are dropped.
    source = ("{{ bos_token }}\n{% for m in messages %}\n    {% if m['role'] == 'user' %}\nU: {{ m['content'] }}\n"
              "    {% else %}\nA: {{ m['content'] }}{{ eos_token }}\n    {% endif %}\n{% endfor %}")
    assert render(chat_format(source), [USER1, ANSWER1]) == "<s>\nU: Hi there\nA: Hello! A cat sat.</s>\n"


# Templates from a downloaded file that try to reach Python: each must stop with a
# TemplateError before anything runs. {marker} is a file the payload would create.
ESCAPES = {
    "mro subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals via cycler": "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "globals via lipsum": "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "self globals": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {marker}') }}",
    "subclasses in a loop": "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "attr filter": "{{ (messages | attr('__class__')).__base__.__subclasses__() }}",
    "mutate the messages": "{% set _ = messages.append({'role': 'system', 'content': 'pwned'}) %}x",
    "format string": "{{ '{0.__class__.__mro__}'.format(messages) }}",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_sandbox_refuses_escapes_in_one_line(name, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    calls = []
    for mod, fn in ((os, "system"), (os, "popen"), (subprocess, "Popen")):
        monkeypatch.setattr(mod, fn, lambda *a, _fn=fn, **k: calls.append(_fn))
    messages = [dict(USER1)]
    with pytest.raises(TemplateError) as e:
        render(chat_format(ESCAPES[name].replace("{marker}", str(marker))), messages)
    assert isinstance(e.value, llamacpu.UsageError)
    assert "\n" not in str(e.value) and str(e.value).startswith("chat template")
    assert calls == [] and not marker.exists()
    assert messages == [USER1]


def test_raise_exception_in_template_is_a_clean_error():
    source = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    fmt = chat_format(source)
    assert render(fmt, [USER1]) == "Hi there"
    with pytest.raises(TemplateError) as e:
        render(fmt, [SYSTEM, USER1])
    assert str(e.value) == "chat template: System role not supported"


@pytest.mark.parametrize("source", ["{% for m in messages %}{{ m }}", "{{ messages[0]['content' }}",
                                    "{% if %}x{% endif %}\nsecond line\n"])
def test_invalid_jinja_is_one_line(source):
    with pytest.raises(TemplateError) as e:
        render(chat_format(source), [USER1])
    assert "\n" not in str(e.value) and "not valid Jinja" in str(e.value)


# ---- the CLI's --template ---------------------------------------------------------------------

def run_chat(model, *args, stdin: bytes) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LLAMACPU_DEBUG", None)
    here = os.path.dirname(os.path.dirname(os.path.abspath(llamacpu.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "llamacpu.cli", "chat", str(model), *args], input=stdin,
                          capture_output=True, timeout=60, env=env)


GREEDY_CLI = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)  # the CLI's defaults


def api_answer(model, template, message: str, n: int) -> str:
    with llamacpu.Llama(model, n_threads=1) as llm:
        session = llm.chat_session(None, template)
        params = SamplingParams.checked(GREEDY_CLI["temperature"], GREEDY_CLI["top_k"], GREEDY_CLI["top_p"],
                                        GREEDY_CLI["min_p"], GREEDY_CLI["repeat_penalty"], None)
        return "".join(session.send(message, params, n))


def test_cli_template_option_chooses_the_format(stories):
    answers = {}
    for name in BUILTIN:
        proc = run_chat(stories, "--template", name, "--temp", "0", "-n", "16", "-t", "1", stdin=b"Hi there\n")
        assert proc.returncode == 0, proc.stderr.decode()
        answers[name] = proc.stdout.decode()
        assert answers[name] == api_answer(stories, name, "Hi there", 16) + "\n", name
    # The formats lead the model to different text, so the comparison above can tell them apart.
    assert len(set(answers.values())) == len(BUILTIN)
    # Without the option: the template the converter recorded for this base model, plain.
    proc = run_chat(stories, "--temp", "0", "-n", "16", "-t", "1", stdin=b"Hi there\n")
    assert proc.stdout.decode() == answers["plain"]


@pytest.mark.parametrize("template,args", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", []),
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role here') }}{% endif %}x",
     ["--system", "Be brief."]),
])
def test_cli_template_error_is_one_line(stories, template, args):
    proc = run_chat(stories, "--template", template, *args, "-n", "4", stdin=b"Hi there\n")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    assert len(err.splitlines()) == 1 and err.startswith("llamacpu: error: chat template"), err
    assert "Traceback" not in err


# ---- stop strings -------------------------------------------------------------------------

SCRIPT = "Once upon a time, a cat sat.\nUser: Tell me more!\nAssistant: No."


def scripted(llm, text: str):
    """Makes llm 'generate' exactly text (a base model making up the user's next turn), so the
    stop handling is tested on a known stream; everything after sampling is the real code."""
    tokens = llm.tokenize(text, add_bos=False)

    def continue_(params, max_tokens, stop_ids, n_keep):
        yield from tokens[:max_tokens]

    def tokens_(prompt, params, max_tokens, stop_ids, n_keep=1):
        llm._load_prompt(llm._fit_prompt(prompt, n_keep))
        yield from continue_(params, max_tokens, stop_ids, n_keep)

    llm._continue = continue_
    llm._tokens = tokens_


@pytest.mark.parametrize("stream", [False, True])
def test_plain_stop_string_ends_made_up_user_turn(stories, stream):
    with llamacpu.Llama(stories, chat_format="plain", n_threads=1) as llm:
        scripted(llm, SCRIPT)
        out = llm.create_chat_completion([USER1], max_tokens=64, stream=stream)
        if stream:
            chunks = list(out)
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
        assert text.strip() == "Once upon a time, a cat sat." and reason == "stop"


def test_plain_stop_string_in_a_chat_session(stories):
    with llamacpu.Llama(stories, n_threads=1) as llm:
        session = llm.chat_session(None, "plain")
        scripted(llm, SCRIPT)
        params = SamplingParams.checked(0.0, 40, 0.95, 0.05, 1.1, None)
        answer = "".join(session.send("Hi there", params, 64))
        assert answer == " Once upon a time, a cat sat."  # the space: SentencePiece's word marker
        assert session.last_finish == "stop"
        assert session.messages[-1] == {"role": "assistant", "content": "Once upon a time, a cat sat."}


def test_text_that_only_starts_like_the_stop_string_is_kept(stories):
    with llamacpu.Llama(stories, chat_format="plain", n_threads=1) as llm:
        scripted(llm, "A cat sat.\nUsers like cats.\nUse")
        out = llm.create_chat_completion([USER1], max_tokens=64)
        assert out["choices"][0]["message"]["content"] == "A cat sat.\nUsers like cats.\nUse"
        assert out["choices"][0]["finish_reason"] == "length"
