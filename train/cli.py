"""The `headwise` command line: one sub-command per job."""
import argparse
import datetime
import os
import pathlib
import sys
import time

from .explain_commands import add_predict
from .translate_command import add_translate, cross_attention_command
from .faults import RunFault


def _params(args) -> None:
    from headwise.model import ModelConfig
    from headwise.model.count import params_table
    cfg = ModelConfig.preset(args.preset)
    if args.plot:
        from headwise.explain.pictures import save_params_plot
        _writable_dir(pathlib.Path(args.plot).absolute().parent, "--plot's folder")
        print(f"wrote {save_params_plot(cfg, args.preset, args.plot)}")
    print(params_table(cfg, args.preset))


def _writable_dir(path: pathlib.Path, flag: str) -> pathlib.Path:
    """Make the folder and write a file there, so a bad path fails before anything compiles."""
    import tempfile
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ValueError(f"{flag} {path} is not a folder we can write to "
                         f"({error.strerror or error}); pick another") from error
    return path


def _token_pieces(tokenizer, ids: list[int]) -> list:
    """Each token's own text; a byte tokenizer's raw byte, since one byte of a UTF-8
    character decodes to nothing readable."""
    from .data import ByteTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def _check_index(value: int | None, count: int, flag: str, what: str) -> None:
    if value is not None and not 0 <= value < count:
        raise ValueError(f"{flag} {value} is out of range: this model has {count} {what} "
                         f"(0..{count - 1})")


def _crop_to_context(ids: list[int], context: int) -> list[int]:
    if len(ids) > context:
        print(f"headwise attention: warning: the prompt is {len(ids)} tokens, longer than the "
              f"context of {context}; dropped its first {len(ids) - context} tokens",
              file=sys.stderr)
    return ids[-context:]


def _attention(args) -> None:
    """Every head's pattern over the prompt: PNGs and attention.html in --out, and/or text."""
    import jax
    import numpy as np
    from headwise.explain import run_with_cache
    from headwise.explain.ascii import token_label
    from .checkpoint import load_model, load_tokenizer
    if not args.out and not args.ascii:
        raise ValueError("give --out DIR for the pictures, or --ascii to print the maps here")
    out = _writable_dir(pathlib.Path(args.out), "--out") if args.out else None
    if args.input is not None:  # an encoder-decoder: its cross-attention over the source
        return cross_attention_command(args, out)
    if not args.prompt:
        raise ValueError("the prompt is empty: give at least one character to look at")
    params, cfg = load_model(args.run_dir)
    tokenizer = load_tokenizer(args.run_dir)
    _check_index(args.layer, cfg.n_layers, "--layer", "layers")
    _check_index(args.head, cfg.n_heads, "--head", "heads")
    ids = _crop_to_context(tokenizer.encode(args.prompt), cfg.context_length)
    if not ids:
        raise ValueError("the prompt encodes to no tokens: give at least one character")
    _, cache = jax.jit(run_with_cache, static_argnums=1)(params, cfg, np.asarray([ids]))
    labels = [token_label(piece) for piece in _token_pieces(tokenizer, ids)]
    _show_attention(np.asarray(cache["patterns"][0]), labels, out, args)


def _show_attention(patterns_LNTT, labels: list[str], out: pathlib.Path | None, args) -> None:
    """The PNGs and the page into `out` (if given), the heat maps on stdout (if --ascii)."""
    from headwise.explain.ascii import ascii_heatmap
    from headwise.explain.page import attention_html
    from headwise.explain.pictures import save_attention_pngs
    if out is not None:
        for path in save_attention_pngs(patterns_LNTT, labels, out, args.layer, args.head):
            print(f"wrote {path}")
        print(f"wrote {attention_html(patterns_LNTT, labels, out / 'attention.html')}")
    if args.ascii:
        L, N = patterns_LNTT.shape[:2]
        for l in range(L) if args.layer is None else [args.layer]:
            for n in range(N) if args.head is None else [args.head]:
                print(ascii_heatmap(patterns_LNTT[l, n], labels, f"layer {l}, head {n}") + "\n")


def _default_run_dir(config: str | None) -> pathlib.Path:
    name = pathlib.Path(config).stem if config else "default"
    return pathlib.Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _mesh_overrides(text: str | None) -> list[str]:
    """--mesh data=2,fsdp=2,tensor=2 -> mesh.* overrides; axes not named are 1."""
    from headwise.parallel import AXES
    if not text:
        return []
    given = dict(part.split("=", 1) if "=" in part else (part, "")
                 for part in text.replace(" ", "").split(","))
    unknown = set(given) - {*AXES, "strategy"}
    if unknown or any(not v for v in given.values()):
        example = ",".join(f"{a}=2" for a in AXES)
        raise ValueError(f"--mesh expects axis=size pairs over {', '.join(AXES)} (and "
                         f"optionally strategy=NAME), e.g. {example}; got {text!r}")
    axes = {**dict.fromkeys(AXES, "1"), **given}
    return [f"mesh.{k}={v if k != 'strategy' else repr(v)}" for k, v in axes.items()]


def _run_config(args, run_dir: pathlib.Path | None = None):
    """--config (else the run dir's own config.toml, so a run resumes as it was started),
    then --set and --mesh."""
    from .config import load_config
    config = args.config
    if config is None and run_dir is not None and (run_dir / "config.toml").is_file():
        config = str(run_dir / "config.toml")
    return load_config(config, [p for group in args.set for p in group]
                       + _mesh_overrides(args.mesh))


def _shardings(args) -> None:
    from headwise.parallel.table import shardings_table
    from .layout import resolve_run
    cfg = _run_config(args)
    layout = resolve_run(cfg)
    print(shardings_table(cfg.model, layout.mesh, layout.rules, layout.strategy))


def _use_compile_cache(enabled: bool) -> None:
    """JAX's persistent compilation cache, before anything compiles (see compile_cache)."""
    from . import compile_cache
    folder = compile_cache.cache_folder(enabled)
    if folder is None:
        return
    if why_not := compile_cache.unsafe_here():
        print(why_not)
        return
    compile_cache.enable(_writable_dir(folder, f"the compilation cache ({compile_cache.ENV})"))


def _plan(args) -> None:
    from .plan import plan_text
    if args.preset:  # the preset first, so --set model.* still overrides its fields
        args.set.insert(0, [f"model.preset={args.preset!r}"])
    print(plan_text(_run_config(args), args))


def _sweep(args) -> None:
    from .sweep import fit_power_law, parse_widths, sweep
    widths = parse_widths(args.widths)
    cfg = _run_config(args)
    rows = sweep(cfg, widths, args.steps or cfg.train.steps, _writable_dir(pathlib.Path(args.out),
                                                                          "--out"))
    for r in rows:
        print(f"width {r['width']:>5}  params {r['params']:>12,}  flops {r['flops']:.3g}  "
              f"eval loss {r['eval_loss']:.4f}  ({r['seconds'] / 60:.1f} min)")
    _, alpha = fit_power_law([r["params"] for r in rows], [r["eval_loss"] for r in rows])
    print(f"loss ~ params^-{alpha:.3f}; wrote {args.out}/sweep.jsonl and {args.out}/sweep.png")


def _train(args) -> None:
    import jax
    from .loop import sample_text, train
    from .profile import PROGRAM, newest_trace, parse_steps, time_by_op
    if not args.run_dir and jax.process_count() > 1:
        raise ValueError("a multi-process run needs --run-dir: every process must write the "
                         "same checkpoints, on a file system they all see")
    profile = parse_steps(args.profile) if args.profile else None
    run_dir = pathlib.Path(args.run_dir) if args.run_dir else _default_run_dir(args.config)
    cfg = _run_config(args, run_dir)
    _use_compile_cache(not args.no_compile_cache)
    print(f"run dir: {run_dir}  (run again with --run-dir {run_dir} to resume)")
    started = time.perf_counter()
    result = train(cfg, run_dir, profile=profile)
    if profile:
        print(f"profile of steps {profile[0]}..{profile[1] - 1}: {run_dir / 'profile'} (open its "
              f"perfetto_trace.json.gz in ui.perfetto.dev, or the folder in TensorBoard)")
        if trace := newest_trace(run_dir / "profile"):
            program = run_dir / "profile" / PROGRAM
            print(time_by_op(trace, hlo_text=program.read_text() if program.exists() else None))
    minutes = (time.perf_counter() - started) / 60
    if jax.process_index():
        return
    if cfg.train.sample_tokens and result["data"].tokenizer is not None and jax.process_count() == 1:
        prompt = result["data"].tokenizer.decode([int(result["data"].val[0])])
        text = sample_text(result["params"], cfg, result["data"], prompt, cfg.train.sample_tokens,
                           temperature=0.8, top_k=40)
        print(f"\n--- sample ---\n{text}\n--------------")
    if cfg.data.task and jax.process_count() == 1:
        _show_translations(result["params"], cfg.model)
    if "initial_eval_loss" in result:
        print(f"validation loss before training: {result['initial_eval_loss']:.4f} nats/token")
    print(f"validation loss {result['eval_loss']:.4f} nats/token after {result['step']} steps; "
          f"unigram baseline {result['unigram_loss']:.4f}; {minutes:.1f} min; run dir {run_dir}")


def _show_translations(params, cfg) -> None:
    from .numbers import number_words, translate
    examples = [0, 7, 42, 4021, 90017, 999999]
    print("\n--- translations (model | right answer) ---")
    for n, words in zip(examples, translate(params, cfg, examples)):
        print(f"{n:>7}: {words}" + ("" if words == number_words(n) else f"  | {number_words(n)}"))


def _check_run(args) -> int:
    """One line per checkpoint (and unfinished save), then the one a resume would start from;
    exit 1 if any cannot be read."""
    from .checkpoint import check_run
    results = check_run(args.run_dir)
    for name, problem in results:
        print(f"{name}: {'restores' if problem is None else problem}")
    readable = [int(name) for name, problem in results if problem is None]
    if readable:
        print(f"a resume would start from step {max(readable)}")
    elif results:
        print("no checkpoint restores: a resume would stop without changing anything")
    else:
        print("no checkpoints yet: a resume would start afresh")
    return int(any(problem is not None for _, problem in results))


def _prompt_text(args) -> str:
    if args.prompt_file is None:
        return args.prompt
    path = pathlib.Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path} does not exist")
    return path.read_text()


def _sample(args) -> None:
    from .checkpoint import load_model, load_tokenizer
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    params, cfg = load_model(args.run_dir)
    tokenizer = load_tokenizer(args.run_dir)
    text = _prompt_text(args)
    prompt = tokenizer.encode(text)
    if not prompt:
        raise ValueError("the prompt is empty: give the model at least one character to continue")
    for i in range(args.num_samples):  # one at a time, so each streams; the step compiles once
        if args.num_samples > 1:
            print(f"--- sample {i + 1} of {args.num_samples} ---")
        print(text, end="", flush=True)
        _print_continuation(params, cfg, tokenizer, prompt, args, i)


def _print_continuation(params, cfg, tokenizer, prompt: list[int], args, i: int) -> None:
    """Sample `i` of the prompt, printed as it comes; a character split over tokens waits for
    its last byte."""
    import jax
    from headwise.model.decode import generate_stream_sliding
    new, shown = [], ""
    for token in generate_stream_sliding(
            params, cfg, prompt, args.max_new_tokens,
            key=jax.random.fold_in(jax.random.key(args.seed), i),
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p):
        new.append(token)
        decoded = tokenizer.decode(new)
        if not decoded.endswith("\ufffd"):
            print(decoded[len(shown):], end="", flush=True)
            shown = decoded
    print(tokenizer.decode(new)[len(shown):])


def _import_hf(args) -> None:
    from .hf import import_run
    done = import_run(args.gpt2, args.out)
    cfg = done["model"]
    print(f"imported GPT-2 ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}) "
          f"into {done['run_dir']}" + ("" if done["tokenizer"] else " (no tokenizer in the folder)"))
    print(f"sample:    headwise sample --run-dir {args.out} --prompt 'Hello'\n"
          f"fine-tune: headwise train --run-dir {args.out} [--set train.steps=... optim.lr=...]")


def _export_hf(args) -> None:
    from .hf import export_run
    print(f"wrote GPT-2 (Hugging Face layout) to {export_run(args.run_dir, args.out)}")


def _start(args) -> None:
    """Devices and processes, before anything touches a device."""
    from headwise.parallel.launch import keep_freed_memory, simulate_cpu_devices, start_distributed
    keep_freed_memory()
    if getattr(args, "devices", None) is not None:
        simulate_cpu_devices(args.devices)
    if hasattr(args, "coordinator"):
        start_distributed(args.coordinator, args.num_processes, args.process_id,
                          auto=args.distributed)


def _run_options() -> argparse.ArgumentParser:
    """The options every command that resolves a run takes: config, overrides, mesh, hosts."""
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", help="a TOML file, or the name of one in configs/")
    run.add_argument("--set", nargs="+", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override config values, e.g. --set train.steps=100 optim.lr=1e-3")
    run.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1: the rest)")
    run.add_argument("--devices", type=int, help="simulate N CPU devices (try any mesh on a laptop)")
    hosts = run.add_argument_group("multi-host (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                                   "JAX_PROCESS_ID)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    hosts.add_argument("--num-processes", type=int)
    hosts.add_argument("--process-id", type=int)
    hosts.add_argument("--distributed", action="store_true",
                       help="start JAX's runtime from the cluster (SLURM, Open MPI, TPU pod ...)")
    return run


def _add_params(commands, run) -> None:
    from headwise.model import PRESETS
    params = commands.add_parser("params", help="where a model's parameters are")
    params.add_argument("--preset", default="gpt3-175b", choices=list(PRESETS),
                        metavar="NAME", help=f"one of: {', '.join(PRESETS)}")
    params.add_argument("--plot", metavar="FILE", help="also draw the counts as a bar chart (PNG)")
    params.set_defaults(run=_params)


def _add_attention(commands, run) -> None:
    attention = commands.add_parser("attention", help="draw every head's attention pattern "
                                    "over a prompt (PNG per layer, or text with --ascii)")
    attention.add_argument("--run-dir", required=True)
    text = attention.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the text to look at")
    text.add_argument("--input", help="a source for an encoder-decoder run (a number, for "
                      "numbers_to_words): draws the cross-attention of its translation")
    attention.add_argument("--out", metavar="DIR", help="where the pictures go")
    attention.add_argument("--layer", type=int, help="only this layer (from 0)")
    attention.add_argument("--head", type=int, help="only this head (from 0)")
    attention.add_argument("--ascii", action="store_true",
                           help="print the heat maps in the terminal (over SSH, say)")
    attention.set_defaults(run=_attention)


def _add_train(commands, run) -> None:
    train = commands.add_parser("train", parents=[run], help="train a model (default: a small "
                                "byte-level GPT on the Python standard library's sources, on the CPU)")
    train.add_argument("--run-dir", help="where logs and checkpoints go; an existing run resumes")
    train.add_argument("--profile", metavar="START:STOP", help="write a jax.profiler trace of "
                       "steps START..STOP-1 into RUN_DIR/profile (Perfetto, TensorBoard)")
    train.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh "
                       "(default: reuse compiled programs kept in ~/.cache/headwise/jax-compile "
                       "or $HEADWISE_COMPILE_CACHE; 'off' there turns it off too)")
    train.set_defaults(run=_train)


def _add_shardings(commands, run) -> None:
    shardings = commands.add_parser("shardings", parents=[run], help="every parameter's "
                                    "logical axes, mesh sharding and bytes per device")
    shardings.set_defaults(run=_shardings)


def _add_plan(commands, run) -> None:
    from .plan import add_plan_options
    plan = commands.add_parser("plan", parents=[run], help="what one training step costs each "
                               "device of a mesh: memory, FLOPs, collectives, step time, MFU")
    add_plan_options(plan)
    plan.set_defaults(run=_plan)


def _add_sweep(commands, run) -> None:
    sweep = commands.add_parser("sweep", parents=[run], help="train a ladder of widths on the "
                                "same data and tokens; plot loss against size and compute")
    sweep.add_argument("--widths", default="32,64,128,256,384",
                       help="d_model of each rung (multiples of model.d_head)")
    sweep.add_argument("--steps", type=int, help="steps per rung (default: train.steps)")
    sweep.add_argument("--out", required=True, metavar="DIR", help="sweep.jsonl, sweep.png and "
                       "one run folder per width")
    sweep.set_defaults(run=_sweep)


def _add_sample(commands, run) -> None:
    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("--run-dir", required=True)
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", help="a file whose text is the prompt")
    sample.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sample.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(run=_sample)


def _add_hf(commands, run) -> None:
    import_hf = commands.add_parser("import-hf", help="a run directory from a local GPT-2 folder "
                                    "(config.json + model.safetensors)")
    import_hf.add_argument("--gpt2", required=True, metavar="LOCAL_DIR")
    import_hf.add_argument("--out", required=True, metavar="RUN_DIR")
    import_hf.set_defaults(run=_import_hf)
    export_hf = commands.add_parser("export-hf", help="a run's weights as a GPT-2 folder that "
                                    "transformers' GPT2LMHeadModel.from_pretrained reads")
    export_hf.add_argument("--run-dir", required=True)
    export_hf.add_argument("--out", required=True, metavar="LOCAL_DIR")
    export_hf.set_defaults(run=_export_hf)


def _add_check_run(commands, run) -> None:
    check = commands.add_parser("check-run", help="read every checkpoint of a run back and say "
                                "which restore (exit 1 if any cannot be read)")
    check.add_argument("--run-dir", required=True)
    check.set_defaults(run=_check_run)


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per command; `train` and `shardings` share the run options."""
    parser = argparse.ArgumentParser(prog="headwise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = _run_options()
    for add in (_add_params, _add_train, _add_shardings, _add_plan, _add_sweep, _add_sample,
                _add_hf, _add_attention, _add_check_run):
        add(commands, run)
    add_predict(commands)
    add_translate(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _start(args)
        code = args.run(args) or 0
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
    except (ValueError, FileNotFoundError) as error:
        print(f"headwise {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunFault as error:  # the run started, then had to stop: say why, in one line
        print(f"headwise {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `headwise params | head` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
