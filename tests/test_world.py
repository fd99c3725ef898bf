"""The demo's guess world: the task format, the teacher's training examples (a wrong guess carries no loss) and
the diagnostic that tells a student that reads its steps from one that copies its guess."""

from __future__ import annotations

import random

import pytest

from pipeline.config import DemoConfig
from pipeline.demo.diagnose import guess_stats, rollout_guess_stats
from pipeline.demo.experiment import ground_truth_examples
from pipeline.tasks import arithmetic


def test_guess_format_puts_the_guess_before_the_steps():
    steps = arithmetic.solution(123, 459, 3)
    assert arithmetic.solution(123, 459, 3, format="guess") == "582|" + steps
    assert arithmetic.solution(123, 459, 3, format="guess", guess=592) == "592|" + steps
    assert arithmetic.solution(123, 459, 3, "B", "guess") == "582|0+9+3=12;1+5+2=8;0+4+1=5|582"
    # the checker grades the final answer, never the guess
    assert arithmetic.is_correct("592|" + steps, "582")
    assert not arithmetic.is_correct("582|3+9+0=12,2+5+1=8,1+4+0=5|592", "582")
    assert not arithmetic.is_correct("582|3+9+0=12", "582")


@pytest.mark.parametrize("a,b", [(123, 459), (905, 98), (999, 999), (500, 500), (1, 2)])
def test_steps_answer_reads_what_the_steps_imply(a, b):
    digits = max(len(str(a)), len(str(b)))
    guess, steps, final = arithmetic.parse(arithmetic.solution(a, b, digits, format="guess", guess=7))
    assert (guess, final) == ("7", str(a + b))
    assert arithmetic.steps_answer(steps) == str(a + b)
    assert arithmetic.steps_answer(arithmetic.solution(a, b, digits, "B").rsplit("|", 1)[0]) == str(a + b)


def test_steps_answer_follows_wrong_steps_and_refuses_broken_ones():
    assert arithmetic.steps_answer("3+9+0=12,2+5+1=9,1+4+0=5") == "592"
    assert arithmetic.steps_answer("3+9+0=12,2+5+1=8,9+4+0=13") == "1382"
    assert arithmetic.steps_answer("3+9+0=12,2+5+1") is None
    assert arithmetic.steps_answer("") is None
    # a response without a guess: the whole text before the final answer is the steps
    assert arithmetic.parse("3+9+0=12,2+5+1=8,1+4+0=5|582") == (None, "3+9+0=12,2+5+1=8,1+4+0=5", "582")


def test_wrong_guess_is_wrong_and_near():
    rng = random.Random(0)
    for answer in (582, 1000, 1998, 7, 100):
        for _ in range(50):
            guess = arithmetic.wrong_guess(answer, rng)
            assert guess != answer and guess >= 0
            # one digit changed, or +-1..3 at one place: never further than 9 at the leading place
            assert abs(guess - answer) <= 9 * 10 ** (len(str(answer)) - 1)


def test_teacher_examples_mask_the_wrong_guess(tiny_models):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(tiny_models["teacher"])
    demo = DemoConfig(digits=3, format="guess", wrong_guesses=0.5)
    seen = {"wrong": 0, "right": 0}
    examples = ground_truth_examples(tok, demo, "A", set(), seed=3)
    for ids, loss_from in (next(examples) for _ in range(64)):
        text = tok.decode(ids, skip_special_tokens=True)
        prompt, response = text.split("=", 1)
        a, b = (int(x) for x in prompt.split("+"))
        guess, steps, final = arithmetic.parse(response)
        assert final == str(a + b) and arithmetic.steps_answer(steps) == str(a + b)  # steps and answer always right
        prompt_len = 1 + len(prompt) + 1  # bos + "a+b="
        if guess == str(a + b):
            seen["right"] += 1
            assert loss_from == prompt_len  # a right guess is learned
        else:
            seen["wrong"] += 1
            assert loss_from == prompt_len + len(guess) + 1  # no loss on the wrong guess and its "|"
            assert tok.decode(ids[loss_from:], skip_special_tokens=True) == response[len(guess) + 1:]
    assert seen["wrong"] > 16 and seen["right"] > 16
    # the steps world is unchanged: no guess, loss on the whole response
    ids, loss_from = next(ground_truth_examples(tok, DemoConfig(digits=3), "A", set(), seed=3))
    assert tok.decode(ids, skip_special_tokens=True).count("|") == 1 and loss_from == 1 + 8


def test_guess_stats_tell_copying_from_reading():
    steps = arithmetic.solution(123, 459, 3).rsplit("|", 1)[0]
    responses = ["582|" + steps + "|582",   # right guess, right answer
                 "592|" + steps + "|592",   # wrong guess copied
                 "592|" + steps + "|582",   # wrong guess, steps read
                 "592|3+9+0=12,2+5+1=9,1+4+0=5|592",  # wrong step, final read from it (= the guess)
                 "3+9"]                     # no guess, no answer
    stats = guess_stats(responses, ["582"] * 5)
    assert stats["responses"] == 5 and stats["counts"] == {"guess_wrong": 4, "correct_guess_wrong": 1}
    assert stats["guess_wrong"] == 0.8 and stats["accuracy"] == 0.4
    assert stats["accuracy_guess_wrong"] == 0.25 and stats["accuracy_guess_right"] == 1.0
    assert stats["copies_wrong_guess"] == 0.5  # 2 of the 4 wrong guesses end in the guess
    assert stats["reads_steps"] == 0.5  # "...|582" and the wrong-step one
    assert stats["steps_right"] == 0.6
    empty = guess_stats([], [])
    assert empty["guess_wrong"] is None and empty["accuracy_guess_wrong"] is None


def test_rollout_guess_stats_read_the_stored_rollouts(tmp_path, tiny_models):
    import pyarrow as pa

    from pipeline.models import encode_prompt, load_tokenizer
    from pipeline.prompts import PromptRecord
    from storage.shardset import ShardSet

    tok = load_tokenizer(tiny_models["student"])
    prompts = [PromptRecord("p0", "123+459=", "582"), PromptRecord("p1", "905+98=", "1003")]
    texts = {"p0": ["592|3+9+0=12,2+5+1=8,1+4+0=5|582", "582|3+9+0=12,2+5+1=8,1+4+0=5|582"],
             "p1": ["1013|5+8+0=13,0+9+1=10,9+0+1=10|1013"]}
    rows = []
    for p in prompts:
        prompt_ids = encode_prompt(tok, p.prompt)
        for text in texts[p.id]:
            ids = prompt_ids + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((p.id, ids, len(prompt_ids)))
    shards = ShardSet.create(tmp_path / "rollouts", "samples", {"role": "test"})
    shards.write_shard(0, pa.table({"prompt_id": pa.array([r[0] for r in rows], pa.string()),
                                    "token_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
                                    "prompt_len": pa.array([r[2] for r in rows], pa.int32())}))
    shards.finalize(expected_shards=1)
    stats = rollout_guess_stats(tmp_path / "rollouts", prompts, tok)
    assert stats["responses"] == 3 and stats["counts"] == {"guess_wrong": 2, "correct_guess_wrong": 1}
    assert stats["copies_wrong_guess"] == 0.5 and stats["reads_steps"] == 0.5  # p0 reads its steps, p1 copies


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_guess_world_demo_reports_the_guess_check(tmp_path):
    """A tiny guess-world demo: demo.json and demo.md carry the diagnostic for the SFT rollouts and every row."""
    import json
    from pathlib import Path

    from pipeline.config import load_run_config
    from pipeline.demo.experiment import guess_check_lines, run_demo
    from tests.test_flows import TINY_DEMO

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_run_config(config, [*TINY_DEMO, "demo.workers=1", "demo.max_new_tokens=16",
                                   "teacher_sft_data.sampling.max_new_tokens=16",
                                   "rollouts.sampling.max_new_tokens=16", "eval.max_new_tokens=16"], tmp_path / "demo")
    assert cfg.demo().format == "guess"
    result = run_demo(cfg, show_progress=False, print_table=False)
    check = json.loads((tmp_path / "demo" / "demo.json").read_text())["guess_check"]
    assert check["sft_rollouts"]["responses"] == 16  # 16 OPD prompts x 1 sample
    assert set(check["greedy"]) == set(result["accuracy"]) - {"teacher_B"}
    for row, stats in check["greedy"].items():
        assert stats["responses"] == 16
        assert stats["accuracy"] == pytest.approx(result["accuracy"][row], abs=1e-4)  # the same greedy answers
    lines = guess_check_lines(result)
    assert len(lines) == 1 + len(check["greedy"]) and lines[0].startswith("SFT student's rollouts")
    assert "## Guess, then check" in (tmp_path / "demo" / "demo.md").read_text()
