"""Rewards, safe parsers and verifier guards (nanoseek.r1.rewards / nanoseek.r1.verify).

Each reward-hacking trap has a hand-written example; the parsers are fuzzed with hypothesis."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.errors import UserError
from nanoseek.r1 import (
    ExprLimits,
    Problem,
    RewardConfig,
    Task,
    VerifierStats,
    VerifierTimeout,
    check_countdown,
    compute_rewards,
    evaluate_expression,
    extract_answer,
    format_reward,
    get_task,
    language_consistency,
    language_reward,
    overlong_penalty,
    parse_completion,
    parse_expression,
    parse_number,
    prompt_opens_think,
    r1_zero_prompt,
    run_with_timeout,
)
from nanoseek.r1.tasks import verify_arithmetic, verify_countdown, verify_math

FUZZ = settings(max_examples=300, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

ARITH = Problem("What is 3 + 4 * 2 - 5?", "6", {"compact": "3+4*2-5"})
COUNTDOWN = Problem("numbers [3, 5, 2] -> 16", "(3 + 5) * 2", {"numbers": [3, 5, 2], "target": 16})


def arith_task() -> Task:
    return Task("arithmetic", [ARITH], [], verify_arithmetic)


def countdown_task() -> Task:
    return Task("countdown", [COUNTDOWN], [], verify_countdown)


def done(answer: str, think: str = " 3 + 8 - 5 = 6 ") -> str:
    """A well-formed completion after a prompt that opened <think>."""
    return f"{think}</think> <answer> {answer} </answer>"


# ============================================================ trap (a): template opened <think>


def test_format_fires_when_the_prompt_opened_think():
    prompt = r1_zero_prompt(ARITH)
    assert prompt.endswith("Assistant: <think>") and prompt_opens_think(prompt)
    completion = done("6")
    assert format_reward(completion, prompt_opened_think=prompt_opens_think(prompt)) == 1.0
    assert compute_rewards(completion, ARITH, arith_task(), prompt_opened_think=True)["format"] == 1


def test_format_when_the_completion_opens_think_itself():
    completion = "<think> 8 - 2 </think>\n<answer>6</answer>"
    assert format_reward(completion, prompt_opened_think=False) == 1.0
    # the prompt opened one already: a second <think> is malformed
    assert format_reward(completion, prompt_opened_think=True) == 0.0
    # without an opening tag anywhere it is malformed too
    assert format_reward(done("6"), prompt_opened_think=False) == 0.0


def test_format_autodetect_handles_both_template_styles():
    assert format_reward(done("6")) == 1.0
    assert format_reward("<think> x </think><answer>6</answer>") == 1.0


def test_prompt_opens_think_ignores_tags_in_the_instructions():
    assert not prompt_opens_think("tags <think> </think> and <answer> </answer>. User: q Assistant:")
    assert prompt_opens_think("Q: 1+1\n<think>")
    assert prompt_opens_think("<|assistant|><think>\n")
    assert not prompt_opens_think("no tags at all")


# ============================================================ trap (b): repeated / misplaced tags


@pytest.mark.parametrize("completion,reason", [
    ("x </think> <answer>6</answer><answer>6</answer>", "<answer>"),
    ("x </think></think> <answer>6</answer>", "</think>"),
    ("x </think> <answer>5</answer> <answer>6</answer>", "<answer>"),  # hedging
    ("x <answer>6</answer> </think> <answer>6</answer>", "<answer>"),
    ("x <answer>6</answer> </think>", "order"),  # answer inside the reasoning
    ("x </think> <answer>6", "</answer>"),
    ("x </think> so: <answer>6</answer>", "between"),
    ("x </think> <answer>6</answer> actually 7", "after"),
    ("x </think> <answer>  </answer>", "empty"),
    ("x </think> <answer><answer>6</answer></answer>", "<answer>"),
    ("", "</think>"),
])
def test_malformed_completions_get_no_format_and_no_accuracy(completion, reason):
    parsed = parse_completion(completion, prompt_opened_think=True)
    assert not parsed.well_formed and reason in parsed.reason and parsed.answer is None
    r = compute_rewards(completion, ARITH, arith_task(), prompt_opened_think=True)
    assert r["format"] == r["accuracy"] == r["language"] == r["total"] == 0.0


def test_text_before_think_is_malformed_when_completion_opens_it():
    assert not parse_completion("hi <think>x</think><answer>6</answer>", False).well_formed
    assert parse_completion("\n <think>x</think>\n<answer>6</answer>\n", False).well_formed


def test_extract_answer_takes_the_last_well_formed_answer():
    assert extract_answer("<answer> 5 </answer> then <answer>\n7\n</answer>") == "7"
    assert extract_answer("<answer>1<answer>2</answer>") == "2"
    assert extract_answer("<answer>3</answer> <answer>4") == "3"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>   </answer>") is None


# ============================================================ trap (c): other hacks


def test_arithmetic_answer_must_be_a_number_not_the_question():
    task = arith_task()
    assert compute_rewards(done("6"), ARITH, task)["accuracy"] == 1.0
    for echo in ("3 + 4 * 2 - 5", "3+4*2-5", "12 - 6", "(6)"):
        assert compute_rewards(done(echo), ARITH, task)["accuracy"] == 0.0
    for same in ("6.0", "+6", "6.", "12/2"):
        assert compute_rewards(done(same), ARITH, task)["accuracy"] == 1.0
    assert compute_rewards(done("7"), ARITH, task)["accuracy"] == 0.0


@pytest.mark.parametrize("answer,ok", [
    ("(3 + 5) * 2", True), ("2*(5+3)", True), ("(3 + 5) * 2 = 16", True),
    ("(3 + 5) * 2 = 17", False),  # restating a wrong target
    ("16", False),  # the target itself uses no numbers
    ("(3 + 5) * 2 + 0", False), ("(5 + 5 + 3 + 3) * 2 / 2", False),  # extra / reused numbers
    ("(3 + 5) * 2 * 1", False), ("3 * 5 + 1", False),  # a number not given
    ("(3 + 5) ** 2 / 4", False), ("(3. + 5) * 2", False), ("(3 + 5) * 2.0", False),
    ("(3 + 5) // 1 * 2", False),
    ("__import__('os').system('echo hacked')", False), ("(lambda: 16)()", False),
    ("16 if True else 0", False), ("0x10", False), ("1_6", False),
    ("(3 × 5 + 1) * 2 / 2", False), ("(3 + 5) × 2", True),  # typographic operators are fine
])
def test_countdown_verifier(answer, ok):
    assert verify_countdown(answer, COUNTDOWN) is ok


def test_tinyzero_preset_is_point_one_for_formed_wrong_and_one_for_correct():
    task, cfg = countdown_task(), RewardConfig.preset("tinyzero")

    def total(completion):
        return compute_rewards(completion, COUNTDOWN, task, config=cfg)["total"]

    assert total(done("(3 + 5) * 2")) == pytest.approx(1.0)
    assert total(done("3 + 5 + 2")) == pytest.approx(0.1)
    assert total(done("16")) == pytest.approx(0.1)
    assert total("x </think> (3 + 5) * 2") == 0.0  # correct but no answer tags
    assert total("x </think> <answer>(3 + 5) * 2</answer> <answer>1</answer>") == 0.0


def test_language_reward_not_paid_for_empty_or_malformed_output():
    assert language_reward("", prompt_opened_think=True) == 0.0
    assert language_reward("</think>", prompt_opened_think=True) == 0.0
    assert language_reward(done("6", "3 plus 3"), prompt_opened_think=True) == 1.0


def test_language_consistency_counts_words_by_script():
    assert language_consistency("The answer is 7") == 1.0
    assert language_consistency("3 + 4 = 7") == 1.0  # no words: nothing inconsistent
    assert language_consistency("The 答案 is") == pytest.approx(2 / 4)  # CJK: a word per char
    assert language_consistency("café naïve") == 1.0  # Latin beyond ASCII
    assert language_consistency("привет world", "latin") == pytest.approx(0.5)
    assert language_consistency("привет world", "ru") == pytest.approx(0.5)
    assert language_consistency("答案是七", "zh") == 1.0


def test_overlong_penalty_follows_dapo():
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(101, 100, 20) == -1.0
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0
    with pytest.raises(UserError):
        overlong_penalty(1, 100, 200)


def test_weighted_total_and_config_parsing():
    cfg = RewardConfig.parse("accuracy=1, format=0.25, overlong=1", overlong_buffer=10)
    r = compute_rewards(done("6"), ARITH, arith_task(), n_tokens=95, max_tokens=100, config=cfg)
    assert r["overlong"] == pytest.approx(-0.5)
    assert r["total"] == pytest.approx(1.0 + 0.25 - 0.5)
    assert set(r) == {"accuracy", "format", "language", "overlong", "total"}
    assert RewardConfig.parse("dapo").weights == {"accuracy": 1.0, "overlong": 1.0}
    with pytest.raises(UserError, match="unknown reward"):
        RewardConfig(weights={"acuracy": 1.0})
    with pytest.raises(UserError, match="preset"):
        RewardConfig.preset("nope")
    with pytest.raises(UserError, match="max_tokens"):
        compute_rewards(done("6"), ARITH, arith_task(), config=RewardConfig.preset("dapo"))


# ============================================================ verifiers: guarded, timed, never executed


def test_verifier_exceptions_and_bad_returns_score_zero_and_are_counted():
    def exits(a, p):
        raise SystemExit(1)

    for bad in (lambda a, p: 1 / 0, lambda a, p: "1", lambda a, p: None,
                lambda a, p: float("nan"), lambda a, p: [1], exits):
        task = Task("t", [ARITH], [], bad)
        assert compute_rewards(done("6"), ARITH, task)["accuracy"] == 0.0
        assert task.stats.as_dict() == {"calls": 1, "errors": 1, "timeouts": 0}


def test_first_verifier_failure_is_one_warning_line(capsys):
    def broken(a, p):
        raise ValueError("bad\nverifier")

    task = Task("t", [ARITH], [], broken)
    for _ in range(3):
        assert compute_rewards(done("6"), ARITH, task)["accuracy"] == 0.0
    err = capsys.readouterr().err.splitlines()
    assert err == ["nanoseek: warning: verifier raised (1 so far; reward 0): ValueError: bad verifier"]


def test_float_verifier_is_clamped_and_partial_credit_is_not_correct():
    task = Task("t", [ARITH], [], lambda a, p: 0.5)
    assert task.score("6", ARITH) == 0.5 and not task.verify("6", ARITH)
    assert Task("t", [], [], lambda a, p: 7.0).score("6", ARITH) == 1.0
    assert Task("t", [], [], lambda a, p: np.bool_(True)).score("6", ARITH) == 1.0
    assert Task("t", [], [], lambda a, p: np.float32(0.25)).score("6", ARITH) == 0.25


def _stubborn(answer, problem):
    """Busy-waits and swallows every Exception: only an uninterceptable timeout stops it."""
    while True:
        try:
            time.sleep(0.005)
        except Exception:  # noqa: BLE001
            pass


def test_timeout_on_main_thread_interrupts_even_a_stubborn_verifier():
    task = Task("t", [ARITH], [], _stubborn, timeout_s=0.1)
    start = time.monotonic()
    assert task.score("6", ARITH) == 0.0
    assert time.monotonic() - start < 2.0
    assert task.stats.timeouts == 1


def test_timeout_off_the_main_thread():
    task = Task("t", [ARITH], [], lambda a, p: time.sleep(0.6) or True, timeout_s=0.05)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", task.score("6", ARITH)))
    worker.start()
    worker.join(5)
    assert out["r"] == 0.0 and task.stats.timeouts == 1


def test_run_with_timeout_passes_results_and_exceptions_through():
    assert run_with_timeout(lambda x, y=1: x + y, 2, y=3, timeout_s=1) == 5
    with pytest.raises(KeyError):
        run_with_timeout(lambda: {}["k"], timeout_s=1)
    with pytest.raises(VerifierTimeout):
        run_with_timeout(time.sleep, 1, timeout_s=0.05)
    out = {}

    def in_thread():
        out["v"] = run_with_timeout(lambda: 42, timeout_s=1)
        try:
            run_with_timeout(lambda: {}["k"], timeout_s=1)
        except KeyError:
            out["raised"] = True

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(5)
    assert out == {"v": 42, "raised": True}


def test_math_verify_works_off_the_main_thread():
    problem = Problem("half?", "\\frac{1}{2}")
    assert verify_math("0.5", problem) and not verify_math("0.6", problem)
    # math_verify alone takes the last number it sees: hedges must not pass
    six = Problem("?", "6")
    for hedge in ("7 or 6", "7 $6$", "1, 2, 6", "\\boxed{5} \\boxed{6}"):
        assert not verify_math(hedge, six), hedge
    assert verify_math("$6$", six) and verify_math("\\boxed{6}", six) and verify_math("12/2", six)
    task = Task("jsonl", [problem], [], verify_math, timeout_s=5)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", task.score("1/2", problem)))
    t.start()
    t.join(30)
    assert out["r"] == 1.0 and task.stats.errors == 0


def test_model_output_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    task = get_task("countdown", n_train=1, n_test=1)
    for verify, problem in ((verify_countdown, task.test[0]), (verify_arithmetic, ARITH)):
        assert not verify(payload, problem)
    assert evaluate_expression(payload) is None and parse_number(payload) is None
    assert not marker.exists()


# ============================================================ parsers: examples and fuzzing


@pytest.mark.parametrize("text,value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", Fraction(7, 2)), ("-3 + 5", 2),
    ("2 - -3", 5), ("((((4))))", 4), ("8 / (3 - 3)", None), ("1 // 2", None), ("2 ** 3", None),
    ("1e3", None), ("1.5", None), ("True + 1", None), ("abs(-1)", None), ("[1][0]", None),
    ("1 if 1 else 2", None), ("", None), ("   ", None), ("1 +", None), ("+1", None),
    ("9" * 7, None),  # literal above max_literal
    ("*".join(["999999"] * 4), None),  # intermediate above max_value
    ("(" * 300 + "1" + ")" * 300, None), ("1" + "+1" * 500, None), ("-" * 150 + "1", None),
])
def test_evaluate_expression_examples(text, value):
    assert evaluate_expression(text) == value


def test_bounded_pow_when_enabled():
    limits = ExprLimits(allow_pow=True, max_exponent=4)
    assert evaluate_expression("2 ** 4", limits) == 16
    assert evaluate_expression("2 ** 5", limits) is None
    assert evaluate_expression("9 ** 9 ** 9", limits) is None
    assert evaluate_expression("2 ** (1 / 2)", limits) is None


def test_parse_number_examples():
    assert parse_number(" 42 ") == 42 and parse_number("-3") == -3 and parse_number("1,234") == 1234
    assert parse_number("3.50") == Fraction(7, 2) and parse_number("7/2") == Fraction(7, 2)
    for bad in ("", "1/0", "1,23", "4 + 2", "x", "1e5", "9" * 100, "--1", "0x1f", "½"):
        assert parse_number(bad) is None


_EXPR_ALPHABET = "0123456789+-*/()., _xeE=ja\t\n×÷−"


@FUZZ
@given(st.one_of(st.text(max_size=300), st.text(alphabet=_EXPR_ALPHABET, max_size=300)))
def test_fuzz_parsers_never_raise(text):
    parsed = parse_expression(text)
    assert parsed is None or isinstance(parsed.value, Fraction)
    number = parse_number(text)
    assert number is None or isinstance(number, Fraction)
    assert isinstance(check_countdown(text, [1, 2, 3], 6), bool)
    assert isinstance(verify_arithmetic(text, ARITH), bool)
    c = parse_completion(text)
    assert c.well_formed == (c.answer is not None)
    answer = extract_answer(text)
    assert answer is None or (answer and answer == answer.strip())
    assert 0.0 <= language_consistency(text) <= 1.0


@FUZZ
@given(st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "6", " ", "x",
                                  "\n"]), max_size=30).map("".join),
       st.booleans())
def test_fuzz_tag_soup_earns_accuracy_only_when_well_formed(completion, opened):
    r = compute_rewards(completion, ARITH, arith_task(), prompt_opened_think=opened)
    if r["accuracy"] > 0:
        assert r["format"] == 1.0
        joint = ("<think>" if opened else "") + completion
        assert all(joint.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))


def _tree(leaves=st.integers(0, 30)):
    """Random expression trees as (text, value or None for a division by zero, leaves)."""
    def combine(children):
        op = st.sampled_from("+-*/")
        return st.tuples(children, op, children, st.sampled_from(["", " "])).map(_join)

    leaf = leaves.map(lambda n: (str(n), Fraction(n), (n,)))
    neg = leaf.map(lambda t: (f"-{t[0]}", -t[1], t[2]))
    return st.recursive(st.one_of(leaf, neg), combine, max_leaves=8)


def _join(parts):
    (lt, lv, ln), op, (rt, rv, rn), sp = parts
    if lv is None or rv is None or (op == "/" and rv == 0):
        value = None
    else:
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    return f"({lt}{sp}{op}{sp}{rt})", value, ln + rn


@FUZZ
@given(_tree())
def test_fuzz_random_trees_agree_with_reference_evaluator(tree):
    text, value, leaves = tree
    parsed = parse_expression(text)
    if value is None:
        assert parsed is None
        return
    assert parsed is not None and parsed.value == value and parsed.numbers == leaves
    if value.denominator == 1:  # countdown accepts it with the same numbers in any order
        assert check_countdown(text, list(reversed(leaves)), int(value))
        if len(leaves) > 1:
            assert not check_countdown(text, list(leaves[1:]), int(value))
            assert not check_countdown(text, list(leaves) + [1], int(value))
            assert check_countdown(text, list(leaves) + [1], int(value), exact=False)


def test_adversarial_inputs_are_fast():
    inputs = ["(" * 100_000, "9" * 100_000, "1*" * 50_000 + "1", "<answer>" * 50_000,
              "<think>" * 20_000 + "</think>" * 20_000, "a" * 200_000, "答" * 50_000]
    start = time.monotonic()
    for text in inputs:
        parse_expression(text)
        parse_number(text)
        check_countdown(text, [1, 2], 3)
        parse_completion(text)
        extract_answer(text)
        language_consistency(text)
    assert time.monotonic() - start < 5.0


def test_verifier_stats_are_thread_safe():
    stats = VerifierStats()
    threads = [threading.Thread(target=lambda: [stats.record("error") for _ in range(500)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.calls == stats.errors == 2000
