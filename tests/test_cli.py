"""The `llamacpu` command, run as `python -m llamacpu.cli` in a child process on stories260K:
convert, generate, info and chat, and how it fails (one line on stderr, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import asset
from reference import STORIES_GREEDY_TEXT

import llamacpu
from llamacpu import _core

DTYPES = ("f32", "f16", "q8_0", "q4_0")


def cli_env() -> dict:
    """The test process's environment, with the llamacpu it imported first on the path, so the
    child runs the same code in a dev tree and in an installed package."""
    env = dict(os.environ)
    env.pop("LLAMACPU_DEBUG", None)  # tracebacks would break the one-line error checks
    here = os.path.dirname(os.path.dirname(os.path.abspath(llamacpu.__file__)))  # symlinks kept
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_cli(*args, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamacpu.cli", *map(str, args)], input=stdin,
                          capture_output=True, timeout=timeout, env=cli_env())


def out_text(proc) -> str:
    return proc.stdout.decode("utf-8")


def assert_one_line_error(proc):
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("llamacpu: "), err
    assert proc.stdout == b""


def assert_quiet_success(proc):
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception" not in err


@pytest.fixture(scope="module")
def model(stories_models):
    return stories_models["f32"]


# ---- convert ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_meta_gives_the_same_file_as_the_api(tmp_path, stories_models, dtype):
    out = tmp_path / "m.bin"
    proc = run_cli("convert", asset("stories260K/meta"), out, "--dtype", dtype, "--no-progress")
    assert_quiet_success(proc)
    assert proc.stdout == b""
    assert proc.stderr.decode().startswith(f"wrote {out}: ")
    assert out.read_bytes() == stories_models[dtype].read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["m.bin"]  # no temporary file left behind


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_hf_gives_a_working_model(tmp_path, stories_models, dtype):
    out = tmp_path / "h.bin"
    assert_quiet_success(run_cli("convert", asset("stories260K/hf"), out, "--dtype", dtype, "--no-progress"))
    assert sorted(os.listdir(tmp_path)) == ["h.bin"]
    toks = [1, 403, 407, 261, 378, 29]
    with llamacpu.Llama(out, n_threads=1) as hf, llamacpu.Llama(stories_models[dtype], n_threads=1) as meta:
        assert hf.metadata["source"]["layout"].startswith("hf")
        assert np.array_equal(hf.logits(toks), meta.logits(toks))


def test_convert_default_dtype_is_q4_0(tmp_path, stories_models):
    out = tmp_path / "d.bin"
    assert_quiet_success(run_cli("convert", asset("stories260K/meta"), out, "--no-progress"))
    assert out.read_bytes() == stories_models["q4_0"].read_bytes()


@pytest.fixture
def precious(tmp_path):
    """An existing output file that a failed conversion must leave alone."""
    p = tmp_path / "out.bin"
    p.write_bytes(b"keep me")
    return p


def assert_failed_convert_left_no_trace(proc, folder: Path, before: list, precious: Path):
    assert_one_line_error(proc)
    assert sorted(os.listdir(folder)) == before  # no new file, no temporary file
    assert precious.read_bytes() == b"keep me"


def test_convert_bad_dtype_writes_nothing(tmp_path, precious):
    before = sorted(os.listdir(tmp_path))
    proc = run_cli("convert", asset("stories260K/meta"), precious, "--dtype", "q3_x", "--no-progress")
    assert_failed_convert_left_no_trace(proc, tmp_path, before, precious)
    assert proc.returncode == 2  # a usage error
    proc = run_cli("convert", asset("stories260K/meta"), tmp_path / "new.bin", "--dtype", "int8")
    assert_failed_convert_left_no_trace(proc, tmp_path, before, precious)


def test_convert_missing_source_writes_nothing(tmp_path, precious):
    before = sorted(os.listdir(tmp_path))
    for out in (precious, tmp_path / "new.bin"):
        proc = run_cli("convert", tmp_path / "no-such-checkpoint", out, "--dtype", "f32", "--no-progress")
        assert_failed_convert_left_no_trace(proc, tmp_path, before, precious)


def test_convert_failing_midway_removes_its_temporary_file(tmp_path, precious):
    """A checkpoint whose last layer holds a NaN fails while the output is being written."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "damaged"
    shutil.copytree(asset("stories260K/hf"), src)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.4.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(weights, str(src / "model.safetensors"))
    before = sorted(os.listdir(tmp_path))
    proc = run_cli("convert", src, precious, "--dtype", "q8_0", "--no-progress")
    assert_failed_convert_left_no_trace(proc, tmp_path, before, precious)
    assert "NaN" in proc.stderr.decode()


def test_convert_into_missing_folder_fails(tmp_path):
    proc = run_cli("convert", asset("stories260K/meta"), tmp_path / "nowhere" / "m.bin", "--dtype", "f32")
    assert_one_line_error(proc)
    assert not (tmp_path / "nowhere").exists()


# ---- generate ---------------------------------------------------------------------------

GREEDY = ("--temp", "0", "--repeat-penalty", "1", "-t", "1")


def test_generate_greedy_from_empty_prompt_prints_known_text(model):
    proc = run_cli("generate", model, "", *GREEDY, "-n", "64")
    assert_quiet_success(proc)
    assert out_text(proc) == STORIES_GREEDY_TEXT + "\n"
    assert proc.stderr == b""


def test_generate_prints_the_continuation_only(model):
    prompt = "Once upon a time"
    proc = run_cli("generate", model, prompt, *GREEDY, "-n", "10")
    assert_quiet_success(proc)
    text = out_text(proc)
    assert text.endswith("\n")
    body = text[:-1]
    assert not body.startswith(prompt) and len(body) > 10
    assert STORIES_GREEDY_TEXT.startswith(prompt + body)


def test_generate_same_seed_same_text(model):
    a = run_cli("generate", model, "One day", "--seed", "5", "-n", "20", "-t", "1")
    b = run_cli("generate", model, "One day", "--seed", "5", "-n", "20", "-t", "1")
    assert_quiet_success(a)
    assert a.stdout == b.stdout and len(a.stdout) > 20


def test_generate_verbose_reports_speed_on_stderr(model):
    proc = run_cli("generate", model, "", *GREEDY, "-n", "8", "-v")
    assert_quiet_success(proc)
    assert STORIES_GREEDY_TEXT.startswith(out_text(proc)[:-1])
    err = proc.stderr.decode()
    assert "loaded" in err and "tokens/s" in err


def test_generate_into_closed_pipe_exits_quietly(model):
    """`llamacpu generate ... | head -c 10`: the reader goes away after ten bytes. The run is
    long enough (8000 tokens) that it is still writing when the pipe closes."""
    p = subprocess.Popen([sys.executable, "-m", "llamacpu.cli", "generate", str(model), "Once", "-n", "8000",
                          "-c", "8192", "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        head = p.stdout.read(10)
        p.stdout.close()
        err = p.stderr.read()
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert len(head) == 10
    assert rc == 0
    assert err == b""


# ---- info ------------------------------------------------------------------------------

def info_fields(proc) -> dict:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out_text(proc).splitlines())}


@pytest.mark.parametrize("isa", _core.usable_isas())
def test_info_names_the_isa_and_threads(model, isa):
    proc = run_cli("info", model, "--isa", isa, "-t", "3")
    assert_quiet_success(proc)
    f = info_fields(proc)
    assert f["isa"].split()[0] == isa
    assert f["threads"].split()[0] == "3"
    assert f["prefetch"].split()[0] == ("on" if _core.software_prefetch() else "off")
    assert f["n_layers"] == "5" and f["vocab_size"] == "512" and f["quantization"].startswith("f32")


def test_info_defaults_to_best_isa_and_physical_cores(model):
    from llamacpu.sysinfo import default_threads, requested_isa

    proc = run_cli("info", model)
    assert_quiet_success(proc)
    f = info_fields(proc)
    assert f["isa"].split()[0] == _core.Backend(1, requested_isa()).name
    assert f["threads"].split()[0] == str(default_threads())


# ---- bench -----------------------------------------------------------------------------

def test_bench_json_reports_speed_memory_and_bandwidth(stories_models):
    model = stories_models["q4_0"]
    proc = run_cli("bench", model, "-t", "2", "--prompt", "16", "--gen", "20", "--reps", "2", "--json", timeout=120)
    assert_quiet_success(proc)
    lines = out_text(proc).strip().splitlines()
    r = json.loads(lines[-1])
    assert r["threads"] == 2 and r["n_prompt"] == 16 and r["n_gen"] == 20
    assert len(r["pp_all"]) == len(r["tg_all"]) == 2 and r["pp_tps"] > 0 and r["tg_tps"] > 0
    assert r["isa"] == _core.Backend(1, "auto").name
    # Weights per token: the whole file but its header and the (tied, so read) tables' padding.
    size = os.path.getsize(model)
    assert 0.9 * size < r["weights_per_token_gb"] * 1e9 <= size
    assert r["tg_gbps"] == pytest.approx(r["tg_tps"] * r["weights_per_token_gb"])
    # One bandwidth reading per repetition, taken between runs of the generation.
    assert len(r["read_gbps_during_tg"]) == 2 and all(g > 0 for g in r["read_gbps_during_tg"])
    assert all(b >= g for b, g in zip(r["read_gbps_best_during_tg"], r["read_gbps_during_tg"]))
    assert r["tg_share_of_read"] == pytest.approx(sum(r["tg_share_all"]) / 2, rel=1e-12)  # median of two
    assert 0 < r["tg_share_of_best_read"] <= r["tg_share_of_read"]
    # The probe's pattern is one of those it tries, picked on this machine.
    from llamacpu.bench import READ_PATTERNS

    assert (r["read_pattern"]["streams"], r["read_pattern"]["prefetch"]) in READ_PATTERNS
    assert r["kernel_prefetch"] is _core.software_prefetch()
    assert r["peak_rss_mib"] > r["file_mib"] and r["load_warm_s"] > 0 and r["python_us_per_token"] > 0
    assert "GB/token" in lines[0] and "of the weights' read bandwidth" in lines[0]


def test_bench_keeps_the_repetitions_asked_for_on_a_busy_machine(stories_models):
    # max_others below zero: every repetition looks disturbed. Each is retried at most
    # max_retries times in all, and then counts, so the result still holds reps of them.
    from llamacpu.bench import run_bench

    logged = []
    r = run_bench(str(stories_models["q4_0"]), threads=1, n_prompt=8, n_gen=4, reps=3, cold=False,
                  max_others=-1.0, max_retries=2, log=logged.append)
    assert len(r["pp_all"]) == len(r["tg_all"]) == len(r["tg_share_all"]) == 3
    assert len(r["others_cores"]) == 5 and sum("retried" in line for line in logged) == 2


# ---- chat ------------------------------------------------------------------------------

CHAT = ("-n", "12", "--seed", "1", "-t", "1")


def test_chat_two_messages_then_eof(model):
    proc = run_cli("chat", model, *CHAT, "--system", "You tell stories.", stdin=b"Hello\nTell me a story\n")
    assert_quiet_success(proc)
    assert proc.stderr == b""
    text = out_text(proc)
    assert text.endswith("\n") and len(text.strip()) > 10
    assert "User:" not in text and "Hello" not in text  # answers only, no echo of the conversation


def test_chat_answers_depend_on_earlier_turns(model):
    """The same last message after different first messages: the conversation is kept."""
    a = run_cli("chat", model, *CHAT, stdin=b"Where is the cat?\nAnd then?\n")
    b = run_cli("chat", model, *CHAT, stdin=b"Hello\nAnd then?\n")
    assert_quiet_success(a)
    assert_quiet_success(b)
    assert a.stdout != b.stdout


def test_chat_empty_stdin_exits_cleanly(model):
    proc = run_cli("chat", model, *CHAT, stdin=b"")
    assert_quiet_success(proc)
    assert proc.stdout == b"" and proc.stderr == b""


def test_chat_blank_lines_and_bye(model):
    proc = run_cli("chat", model, *CHAT, stdin=b"\n   \n/bye\nHello\n")
    assert_quiet_success(proc)
    assert proc.stdout == b""  # blank lines are skipped and /bye ends before "Hello"


def test_chat_invalid_utf8_does_not_crash(model):
    proc = run_cli("chat", model, *CHAT, stdin=b"\xff\xfe hello \xc3\nsecond \x80 line\n")
    assert_quiet_success(proc)
    assert proc.stderr == b""
    assert len(out_text(proc).strip()) > 0


# ---- errors ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def garbage(tmp_path_factory):
    p = tmp_path_factory.mktemp("garbage") / "garbage.bin"
    p.write_bytes(bytes(range(256)) * 40)
    return p


@pytest.mark.parametrize("command, what", [
    (("generate", "{model}", "hi"), "missing"), (("generate", "{model}", "hi"), "folder"),
    (("generate", "{model}", "hi"), "garbage"), (("generate", "{model}", "hi"), "truncated"),
    (("chat", "{model}"), "missing"), (("chat", "{model}"), "garbage"),
    (("info", "{model}"), "folder"), (("info", "{model}"), "truncated"),
])
def test_bad_model_is_one_line_error(tmp_path, garbage, model, command, what):
    bad = {"missing": tmp_path / "no-such-model.bin", "folder": tmp_path, "garbage": garbage,
           "truncated": tmp_path / "cut.bin"}[what]
    if what == "truncated":
        bad.write_bytes(model.read_bytes()[:300_000])
    proc = run_cli(*(str(bad) if a == "{model}" else a for a in command))
    assert_one_line_error(proc)
    assert proc.returncode == 1
    assert str(bad) in proc.stderr.decode()


@pytest.mark.parametrize("args", [
    ("generate", "{model}", "hi", "--bogus"),
    ("generate", "{model}"),
    ("generate", "{model}", "hi", "-t", "0"),
    ("generate", "{model}", "hi", "--temp", "warm"),
    ("generate", "{model}", "hi", "--temp", "-1"),
    ("generate", "{model}", "hi", "--top-k", "-3"),
    ("generate", "{model}", "hi", "--isa", "no-such-isa"),
    ("chat", "{model}", "--template", "no-such-template"),
    ("info",),
    ("frobnicate",),
    (),
])
def test_usage_errors_are_one_line(model, args):
    proc = run_cli(*(str(model) if a == "{model}" else a for a in args))
    assert_one_line_error(proc)
    assert proc.returncode == 2


def test_help_exits_zero(model):
    proc = run_cli("--help")
    assert_quiet_success(proc)
    assert b"convert" in proc.stdout and b"generate" in proc.stdout and b"chat" in proc.stdout
