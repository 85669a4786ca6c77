"""The `llamacpu` command: a thin layer over the API.

Every error is one line on stderr and a non-zero exit status; a traceback means a bug
(set LLAMACPU_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import LlamaCPUError, UsageError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPT = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def _sampling_args(p):
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help="tokens to generate (-1: until the model stops; default 256 for generate, "
                        "unlimited per answer for chat)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.1, help="repeat penalty, 1 = off (default 1.1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    _runtime_args(p)


def _runtime_args(p):
    p.add_argument("-t", "--threads", type=_positive_int, default=None,
                   help="threads (default: physical cores)")
    p.add_argument("-c", "--ctx", type=_positive_int, default=None,
                   help="context length in tokens (default: the model's, at most 8192)")
    p.add_argument("--isa", default=None, help="force an instruction-set path (scalar, avx2, avx512, neon)")
    p.add_argument("-v", "--verbose", action="store_true", help="print load and speed figures on stderr")


def build_parser():
    p = _Parser(prog="llamacpu", description="Run LLaMA-family models on a CPU.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("convert", help="convert a checkpoint into a llamacpu model file")
    c.add_argument("source", help="checkpoint folder (Meta or Hugging Face layout) or GGUF file")
    c.add_argument("out", help="output model file")
    c.add_argument("--dtype", default=None,
                   help="weight type: q4_0, q4_1, q8_0, q4_k_m (llama.cpp's Q4_K_M mix of q4_k and q6_k), "
                        "q4_k, q6_k, f16, f32 (default: q4_0 for a checkpoint; for a GGUF file its own types, "
                        "carried over without re-quantizing)")
    c.add_argument("--template", default=None, help="chat template to record: llama-2, chatml, plain")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--no-verify", action="store_true",
                   help="skip the quality probe (KL divergence and top-1 agreement against the float weights)")

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("model")
    g.add_argument("prompt")
    _sampling_args(g)

    ch = sub.add_parser("chat", help="chat interactively, streaming the answers")
    ch.add_argument("model", nargs="?", default=None,
                    help="model file or known model name (default: smollm2, fetched and converted once)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--template", default=None, help="chat template: llama-2, chatml, plain (default: the model's)")
    _sampling_args(ch)

    b = sub.add_parser("bench", help="measure prompt and generation speed, load time and memory")
    b.add_argument("model")
    b.add_argument("-t", "--threads", type=_positive_int, default=None, help="threads (default: physical cores)")
    b.add_argument("--prompt", type=_positive_int, default=512, help="prompt tokens (default 512)")
    b.add_argument("--gen", type=_positive_int, default=128, help="generated tokens (default 128)")
    b.add_argument("--reps", type=_positive_int, default=3, help="repetitions, the median is reported (default 3)")
    b.add_argument("--batch", type=_positive_int, default=64, help="prompt tokens per forward pass (default 64)")
    b.add_argument("--isa", default=None, help="force an instruction-set path")
    b.add_argument("--no-cold", action="store_true", help="skip evicting the file before the first load")
    b.add_argument("--json", action="store_true", help="also print one JSON object as the last line")

    pp = sub.add_parser("perplexity", help="perplexity on a text file, computed as llama.cpp does")
    pp.add_argument("model")
    pp.add_argument("text", help="UTF-8 text file (e.g. wikitext-2's wiki.test.raw)")
    pp.add_argument("-c", "--ctx", type=_positive_int, default=512, help="tokens per chunk (default 512)")
    pp.add_argument("--chunks", type=_positive_int, default=None, help="score at most this many chunks (default all)")
    pp.add_argument("-t", "--threads", type=_positive_int, default=None, help="threads (default: physical cores)")
    pp.add_argument("--isa", default=None, help="force an instruction-set path")
    pp.add_argument("--json", action="store_true", help="also print one JSON object as the last line")

    pl = sub.add_parser("pull", help="fetch and convert a known model into the cache")
    pl.add_argument("name", nargs="?", default=None, help="model name (default: smollm2)")

    sub.add_parser("list", help="list the models in the cache")

    i = sub.add_parser("info", help="show a model's hyperparameters, tensors and the kernels in use")
    i.add_argument("model")
    _runtime_args(i)
    return p


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _load(args, **kw):
    from .llama import Llama
    from .registry import resolve

    args.model = resolve(args.model, _log)
    return Llama(args.model, n_ctx=args.ctx, n_threads=args.threads, seed=getattr(args, "seed", None),
                 isa=args.isa, **kw)


def _params(args):
    from .sampling import SamplingParams

    return SamplingParams.checked(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.seed)


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_convert(args):
    from .convert import open_source, convert_checkpoint

    t0 = time.monotonic()
    with open_source(args.source) as ck:
        info = convert_checkpoint(ck, args.out, args.dtype, progress=False if args.no_progress else None,
                                  chat_template=args.template, verify=not args.no_verify)
    mb = info["bytes"] / 2**20
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["types"].items()))
    print(f"wrote {args.out}: {mb:.1f} MiB, {info['params'] / 1e6:.1f}M parameters ({types}) "
          f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    probe = info.get("quality")
    for line in probe.lines() if probe else ():
        print(f"llamacpu: {line}" if line.startswith("warning") else line, file=sys.stderr)
    return 0


def cmd_generate(args):
    params = _params(args)
    n = 256 if args.n_predict is None else args.n_predict
    with _load(args, verbose=args.verbose) as llm:
        t0 = time.perf_counter()
        n_tok = 0
        for chunk in llm.create_completion(args.prompt, max_tokens=n if n > 0 else None,
                                           temperature=params.temperature, top_k=params.top_k,
                                           top_p=params.top_p, min_p=params.min_p,
                                           repeat_penalty=params.repeat_penalty, seed=params.seed, stream=True):
            _write(chunk["choices"][0]["text"])
            if "usage" in chunk:
                n_tok = chunk["usage"]["completion_tokens"]
        _write("\n")
        for msg in llm.notices:
            print(f"llamacpu: {msg}", file=sys.stderr)
        if args.verbose:
            dt = time.perf_counter() - t0
            print(f"llamacpu: {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


def _read_message(interactive: bool):
    """One user message; None at end of input. A line ending in a backslash continues."""
    lines = []
    while True:
        if interactive:
            line = input("> " if not lines else ". ")
        else:
            line = sys.stdin.readline()
            if not line:
                return None if not lines else "\n".join(lines)
            line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def cmd_chat(args):
    params = _params(args)
    interactive = sys.stdin.isatty()
    try:
        sys.stdin.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    with _load(args, verbose=args.verbose) as llm:
        session = llm.chat_session(args.system, args.template)
        if interactive:
            print(f"llamacpu chat: {os.path.basename(args.model)} ({session.fmt.name} template, {llm.isa}, "
                  f"{llm.n_threads} threads). Ctrl-C stops an answer; Ctrl-D or /bye quits; /clear starts over.",
                  file=sys.stderr)
        max_tokens = None if args.n_predict is None or args.n_predict <= 0 else args.n_predict
        while True:
            try:
                msg = _read_message(interactive)
            except EOFError:
                msg = None
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return EXIT_INTERRUPT
            if msg is None:
                if interactive:
                    print(file=sys.stderr)
                return 0
            if not msg.strip():
                continue
            if msg.strip() in ("/bye", "/exit", "/quit"):
                return 0
            if msg.strip() == "/clear":
                session = llm.chat_session(args.system, args.template)
                continue
            stream = session.send(msg, params, max_tokens)
            try:
                for piece in stream:
                    _write(piece)
            except KeyboardInterrupt:
                stream.close()
                _write("\n")
                print("[answer stopped]", file=sys.stderr)
                continue
            _write("\n")
            for note in llm.notices:
                print(f"llamacpu: {note}", file=sys.stderr)
            llm.notices.clear()


def cmd_info(args):
    from . import _core
    from .fileformat import MappedModelFile, tensor_bytes
    from .sysinfo import default_threads

    from .registry import resolve

    args.model = resolve(args.model, _log)
    mf = MappedModelFile(args.model)
    try:
        meta = mf.meta
        cfg = meta.config
        types = {}
        params = 0
        for t in meta.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            params += n
            # A fused tensor stored as row segments counts under each segment's type.
            stored = ([(dt, tensor_bytes(dt, (rows, t.shape[1]))) for rows, dt, _ in t.segments] if t.segments
                      else [(t.dtype, t.size)])
            for dtype, size in stored:
                types.setdefault(dtype, [0, 0])
                types[dtype][0] += 1
                types[dtype][1] += size
        out = sys.stdout
        print(f"file:          {args.model} ({mf.size / 2**20:.1f} MiB)", file=out)
        print(f"quantization:  {meta.extra.get('quantization', '?')}, "
              f"{8 * sum(v[1] for v in types.values()) / params:.2f} bits per weight", file=out)
        source = meta.extra.get("source")
        print(f"source:        {source.get('layout', '?') if isinstance(source, dict) else '?'}", file=out)
        print(f"parameters:    {params / 1e6:.1f}M", file=out)
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "norm_eps",
                    "rope_theta", "max_seq_len", "tied_output"):
            print(f"{key + ':':<15}{getattr(cfg, key)}", file=out)
        if cfg.rope_scaling:
            print(f"rope_scaling:  {cfg.rope_scaling}", file=out)
        print(f"tokenizer:     {meta.tokenizer['kind']}", file=out)
        print(f"chat template: {meta.chat_template if meta.chat_template and len(meta.chat_template) < 40 else 'model (jinja)'}",
              file=out)
        print("tensors:       " + ", ".join(f"{n} {t} ({b / 2**20:.1f} MiB)" for t, (n, b) in sorted(types.items())),
              file=out)
        feats = _core.cpu_features()
        flags = [k for k, v in feats.items() if v is True]
        from .sysinfo import requested_isa

        backend = _core.Backend(1, requested_isa(args.isa))
        n_threads = args.threads or default_threads()
        print(f"cpu:           {feats.get('brand') or 'unknown'} ({', '.join(flags) or 'no SIMD extensions'})",
              file=out)
        print(f"isa:           {backend.name} (available: {', '.join(_core.usable_isas())})", file=out)
        print(f"prefetch:      {'on' if _core.software_prefetch() else 'off'} (software prefetch in the single-token "
              f"kernels, chosen for this CPU; LLAMACPU_PREFETCH=0 or 1 overrides)", file=out)
        print(f"threads:       {n_threads} (default = physical cores: {default_threads()})", file=out)
        ctx = args.ctx or min(cfg.max_seq_len, 8192)
        kv_el = 4 if all(t.dtype == "f32" for t in meta.tensors.values()) else 2
        kv = 2 * cfg.n_layers * cfg.kv_dim * ctx * kv_el
        print(f"kv cache:      {kv / 2**20:.1f} MiB at n_ctx {ctx} ({'f32' if kv_el == 4 else 'f16'})", file=out)
    finally:
        mf.close()
    return 0


def cmd_pull(args):
    from .registry import DEFAULT_MODEL, pull

    path = pull(args.name or DEFAULT_MODEL, _log)
    print(path)
    return 0


def cmd_list(args):
    from .registry import KNOWN, cache_dir, list_models

    models = list_models()
    if not models:
        print(f"no models in {cache_dir() / 'models'}; known: {', '.join(sorted(KNOWN))} (llamacpu pull NAME)",
              file=sys.stderr)
        return 0
    for name, path, size in models:
        print(f"{name:<20} {size / 2**20:8.1f} MiB  {path}")
    return 0


def cmd_bench(args):
    from .bench import print_report, run_bench

    r = run_bench(args.model, args.threads, args.prompt, args.gen, args.reps, args.isa, cold=not args.no_cold,
                  log=lambda s: print(s, file=sys.stderr), n_batch=args.batch)
    print_report(r, args.json)
    return 0


def cmd_perplexity(args):
    import json

    from .llama import Llama
    from .perplexity import ProgressLine, describe, perplexity, read_text
    from .registry import resolve

    text = read_text(args.text)
    with Llama(resolve(args.model, _log), n_ctx=args.ctx, n_threads=args.threads, isa=args.isa) as llm:
        r = perplexity(llm, text, args.ctx, args.chunks, on_chunk=ProgressLine())
        print(describe(r))
        if args.json:
            print(json.dumps(dict(r.to_dict(), model=llm.model_path, isa=llm.isa, threads=llm.n_threads)))
    return 0


COMMANDS = {"perplexity": cmd_perplexity, "bench": cmd_bench, "pull": cmd_pull, "list": cmd_list, "convert": cmd_convert, "generate": cmd_generate, "chat": cmd_chat, "info": cmd_info}


def main(argv=None) -> int:
    debug = os.environ.get("LLAMACPU_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except LlamaCPUError as e:
        print(f"llamacpu: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # stdout closed early (a pipe into `head`): stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except MemoryError:
        print("llamacpu: error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, unless debugging
        if debug:
            raise
        print(f"llamacpu: internal error: {type(e).__name__}: {e} (set LLAMACPU_DEBUG=1 for details)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
