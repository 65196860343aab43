"""`headwise predict`: the next token's likeliest choices, and what each layer would have said."""
import json


def add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="the next token's top-k with probabilities "
                                  "(and, with --lens, each layer's guess)")
    predict.add_argument("--run-dir", required=True)
    predict.add_argument("--prompt", required=True, help="the text whose next token to predict")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON: a list of "
                         '{"token", "id", "probability"} (an object with "next" and "lens" '
                         "with --lens)")
    predict.add_argument("--lens", action="store_true", help="also the logit lens: each layer's "
                         "residual stream read through the final norm and unembedding")
    predict.set_defaults(run=predict_command)


def _choices(logits_V, tokenizer, k: int) -> list[dict]:
    from headwise.explain import top_tokens
    ids, probs = top_tokens(logits_V, k)
    return [{"token": tokenizer.decode([int(i)]), "id": int(i), "probability": float(p)}
            for i, p in zip(ids, probs)]


def _prompt_ids(tokenizer, prompt: str, context: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one character to continue")
    if len(ids) > context:
        raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is "
                         f"{context}: shorten it to its last {context} tokens")
    return ids


def predict_command(args) -> None:
    # Imported here, as in cli.py: `headwise --help` should not wait for jax.
    import jax
    import numpy as np
    from headwise.explain import logit_lens, run_with_cache
    from .checkpoint import load_model, load_tokenizer
    params, cfg = load_model(args.run_dir)
    tokenizer = load_tokenizer(args.run_dir)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    k = min(args.top_k, cfg.vocab_size)
    ids = _prompt_ids(tokenizer, args.prompt, cfg.context_length)
    logits, cache = jax.jit(run_with_cache, static_argnums=1)(params, cfg, np.asarray([ids]))
    choices = _choices(logits[0, -1], tokenizer, k)
    lens = ([_choices(layer_V, tokenizer, k)
             for layer_V in logit_lens(params, cfg, cache["residual"][:, :, -1:])[0, :, -1]]
            if args.lens else None)
    if args.json:
        print(json.dumps(choices if lens is None else {"next": choices, "lens": lens}))
        return
    print(f"next token after {args.prompt!r}:")
    print("\n".join(f"  {c['probability']:7.2%}  {c['token']!r} (id {c['id']})" for c in choices))
    for layer, guesses in enumerate(lens or []):
        name = "embeddings" if layer == 0 else f"after block {layer}"
        print(f"lens {name:>14}: " + "  ".join(f"{c['token']!r} {c['probability']:.0%}"
                                                for c in guesses))
