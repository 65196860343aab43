"""The numbers-to-words task and its run: words, batches, held-out set, a real run on one device
and on a dp x fsdp x tp mesh, exact resume, `headwise translate` and the cross-attention pictures."""
import dataclasses
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from headwise.model import ModelConfig, forward_encoder_decoder, init_params
from headwise.train import checkpoint, numbers
from headwise.train.cli import main
from headwise.train.config import load_config
from headwise.train.loop import train

# Written out by hand from the rules (US English, no "and", hyphenated tens and units).
WORDS = {
    0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 21: "twenty-one", 99: "ninety-nine",
    100: "one hundred", 101: "one hundred one", 110: "one hundred ten",
    999: "nine hundred ninety-nine", 1000: "one thousand", 1001: "one thousand one",
    4021: "four thousand twenty-one", 12345: "twelve thousand three hundred forty-five",
    20000: "twenty thousand", 100000: "one hundred thousand",
    110000: "one hundred ten thousand", 300015: "three hundred thousand fifteen",
    999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
}


def test_number_words_are_the_rules():
    assert {n: numbers.number_words(n) for n in WORDS} == WORDS
    with pytest.raises(ValueError, match="outside"):
        numbers.number_words(1_000_000)


def test_tokens_round_trip_and_fit_the_lengths():
    longest = 0
    for n in range(0, 1_000_000, 997):
        words = numbers.number_words(n)
        ids = numbers.word_tokens(words)
        assert numbers.words_text(ids + [numbers.EOS, 5]) == words
        longest = max(longest, len(ids))
    assert longest + 1 <= numbers.TARGET_LENGTH
    assert len(numbers.word_tokens(numbers.number_words(777_777))) + 1 == numbers.TARGET_LENGTH


def test_batches_are_a_pure_function_of_seed_and_step():
    a = numbers.get_pairs(seed=3, step=5, batch_size=16)
    b = numbers.get_pairs(seed=3, step=5, batch_size=16)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = numbers.get_pairs(seed=3, step=6, batch_size=16)
    assert not np.array_equal(a["source"], c["source"])
    halves = [numbers.get_pairs(seed=3, step=5, batch_size=16, process_index=i, process_count=2)
              for i in range(2)]
    jax.tree.map(lambda whole, *parts: np.testing.assert_array_equal(whole, np.concatenate(parts)),
                 a, *halves)
    # Each row says its number: the digits give the source, and the words the targets.
    for source, mask, inputs, targets, real in zip(a["source"], a["source_mask"], a["inputs"],
                                                   a["targets"], a["target_mask"]):
        n = int("".join(numbers.VOCAB[i] for i in source[mask]))
        assert numbers.words_text(targets) == numbers.number_words(n)
        words = list(targets[real])
        assert words[-1] == numbers.EOS and not source[~mask].any() and not targets[~real].any()
        assert list(inputs[real]) == [numbers.BOS, *words[:-1]]


def test_held_out_numbers_never_train():
    held = numbers.is_held_out(np.arange(1_000_000))
    assert not held[:1000].any() and 0.015 < held.mean() < 0.025
    seen = np.concatenate([numbers.draw_numbers(np.random.default_rng([0, s, 0]), 512, False)
                           for s in range(100)])
    assert not numbers.is_held_out(seen).any()
    assert {len(str(n)) for n in seen} == {1, 2, 3, 4, 5, 6}  # short numbers as often as long
    evaluation = numbers.evaluation_numbers()
    assert len(set(evaluation.tolist())) == 500 and numbers.is_held_out(evaluation).all()
    np.testing.assert_array_equal(evaluation, numbers.evaluation_numbers())


# --- Real runs: tiny, a few steps ----------------------------------------------------------

RUN = ["data.task=\"numbers_to_words\"", "model.preset=\"tiny\"", "model.vocab_size=48",
       "model.context_length=12", "model.source_length=8", "model.n_encoder_layers=1",
       "model.n_heads=4", "model.d_model=32", "model.attention=\"fused\"",
       "train.batch_size=8", "train.steps=6", "train.log_every=1", "train.eval_every=100",
       "train.eval_steps=1", "train.checkpoint_every=100", "optim.warmup_steps=0"]


def _rows(run_dir, key):
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Six steps on one device: the reference the sharded and resumed runs are held to."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(load_config(None, RUN), run_dir, progress=False, devices=jax.devices()[:1])
    return run_dir, result


def test_run_logs_eval_accuracy_beside_eval_loss(straight):
    run_dir, result = straight
    accuracy = _rows(run_dir, "eval_accuracy")
    assert list(accuracy) == list(_rows(run_dir, "eval_loss")) == [0, 6]
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert result["eval_accuracy"] == accuracy[6]
    # An untrained model's loss is about ln(48), and the task's unigram baseline below it.
    assert abs(_rows(run_dir, "eval_loss")[0] - np.log(48)) < 0.5
    assert 2.0 < result["unigram_loss"] < np.log(44)


def test_sharded_run_equals_one_device(straight, tmp_path):
    """data=2, fsdp=2, tensor=2 at once: batch rows over data and fsdp, parameters over fsdp,
    whole heads (self and cross) over tensor."""
    run_dir, _ = straight
    cfg = load_config(None, RUN + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    train(cfg, tmp_path / "mesh", progress=False)
    one, eight = _rows(run_dir, "loss"), _rows(tmp_path / "mesh", "loss")
    assert list(one) == list(range(1, 7))
    # Step 1's loss is the init's: float32 sums in another order, ~1e-7 apart. Later steps go
    # through Adam, whose first step (g / |g|) turns rounding in tiny gradients into small
    # moves; after 6 steps the losses stay within 1e-4 (seen: ~1e-6). A wrong mask or a
    # head split across devices moves them by > 1e-2.
    assert abs(one[1] - eight[1]) < 1e-5
    np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=0, atol=1e-4)
    np.testing.assert_allclose(_rows(tmp_path / "mesh", "eval_loss")[6],
                               _rows(run_dir, "eval_loss")[6], rtol=0, atol=1e-4)


def test_resume_is_bitwise(straight, tmp_path):
    run_dir, _ = straight
    cfg = load_config(None, RUN)
    one = jax.devices()[:1]
    train(cfg, tmp_path / "resumed", progress=False, stop_at=3, devices=one)
    assert max(_rows(tmp_path / "resumed", "loss")) == 3
    train(cfg, tmp_path / "resumed", progress=False, devices=one)
    assert _rows(tmp_path / "resumed", "loss") == _rows(run_dir, "loss")  # equal, not close
    p1, _ = checkpoint.load_model(run_dir)
    p2, _ = checkpoint.load_model(tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_translate_cli(straight, tmp_path, capsys):
    run_dir, _ = straight
    values = ["4021", "7", "999999", "120045", "0"]
    (tmp_path / "in.txt").write_text("\n".join(values) + "\n")
    assert main(["translate", "--run-dir", str(run_dir), "--input-file",
                 str(tmp_path / "in.txt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(values)
    for value, line in zip(values, lines):  # in order: each as the number alone gives it
        assert main(["translate", "--run-dir", str(run_dir), "--input", value]) == 0
        assert capsys.readouterr().out.splitlines() == [line]


@pytest.mark.parametrize("text,message", [
    ("12a", "'12a' is not a number"), ("-5", "is not a number"), ("", "is not a number"),
    ("1000000", "out of range"), ("123456789", "longer than the model's source context of 8")])
def test_translate_cli_errors_in_one_line(straight, text, message, capsys):
    assert main(["translate", "--run-dir", str(straight[0]), "--input", text]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_translate_file_error_names_the_line(straight, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("12\nforty\n")
    assert main(["translate", "--run-dir", str(straight[0]), "--input-file",
                 str(tmp_path / "in.txt")]) == 2
    assert "in.txt line 2: 'forty' is not a number" in capsys.readouterr().err


def test_attention_draws_cross_attention(straight, tmp_path, capsys):
    """The page holds the decoder's cross-attention over the digits: the same numbers as the
    forward pass's own patterns (a second code path), rows summing to 1."""
    run_dir, _ = straight
    out = tmp_path / "pictures"
    assert main(["attention", "--run-dir", str(run_dir), "--input", "4021", "--out",
                 str(out)]) == 0
    assert (out / "attention.png").is_file() and (out / "attention.html").is_file()
    page = (out / "attention.html").read_text()
    data = json.loads(re.search(r'id="data">(.*?)</script>', page).group(1))
    assert data["keys"] == ["4", "0", "2", "1"] and data["cross"]
    params, cfg = checkpoint.load_model(run_dir)
    written = [numbers.IDS[w] for w in data["raw"]]  # the tokens the rows are labelled with
    pairs = numbers.encode_pairs([4021])
    _, patterns = forward_encoder_decoder(
        params, pairs["source"], np.asarray([[numbers.BOS, *written[:-1]]]), cfg,
        source_mask_BS=pairs["source_mask"], return_patterns=True)
    want = np.asarray(patterns["cross"][0])[..., :4]
    np.testing.assert_allclose(np.asarray(data["patterns"]) / data["scale"], want, atol=1e-4)
    np.testing.assert_allclose(want.sum(-1), 1.0, atol=1e-5)


def test_translate_and_input_need_an_encoder_decoder(tmp_path, capsys):
    cfg = ModelConfig.preset("tiny")
    state = {"params": init_params(cfg, jax.random.key(0)), "step": np.int32(0),
             "key": jax.random.key(1)}
    with checkpoint.open_manager(tmp_path) as manager:
        checkpoint.save(manager, 0, state, {"model": dataclasses.asdict(cfg)})
    for argv in (["attention", "--input", "12", "--ascii"], ["translate", "--input", "12"]):
        assert main([*argv, "--run-dir", str(tmp_path)]) == 2
        assert "decoder-only" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["sample", "--prompt", "one"], ["predict", "--prompt", "one"],
                                  ["attention", "--prompt", "one", "--ascii"]])
def test_text_commands_on_a_numbers_run_point_to_translate(straight, argv, capsys):
    """A numbers run has no text tokenizer: the commands that read text say what to use."""
    assert main([*argv, "--run-dir", str(straight[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "numbers_to_words run" in err and "headwise translate" in err, err
