"""Tasks, prompt templates, jsonl loading, user verifiers (nanoseek.r1.tasks) and metrics."""

from __future__ import annotations

import json
import math
import re
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from nanoseek.errors import UserError
from nanoseek.r1 import (
    EvalResult,
    Problem,
    Sample,
    chat_prompt,
    compact_prompt,
    evaluate_expression,
    format_prompt,
    get_task,
    load_jsonl_problems,
    load_verifier,
    maj_at_k,
    majority_vote,
    pass_at_k,
    prompt_opens_think,
    r1_zero_prompt,
)

# ============================================================ generated tasks


def _countdown_key(p: Problem):
    return tuple(sorted(p.meta["numbers"])), p.meta["target"]


@pytest.mark.parametrize("name,difficulty", [("arithmetic", 1), ("arithmetic", 3),
                                             ("countdown", 2), ("countdown", 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_splits_are_disjoint_and_unique(name, difficulty, seed):
    n_train = 150 if (name, difficulty) == ("arithmetic", 1) else 400
    task = get_task(name, seed=seed, n_train=n_train, n_test=60, difficulty=difficulty)
    assert len(task.train) == n_train and len(task.test) == 60
    key = _countdown_key if name == "countdown" else (lambda p: p.prompt_text)
    train, test = [key(p) for p in task.train], [key(p) for p in task.test]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert not {p.prompt_text for p in task.train} & {p.prompt_text for p in task.test}


def test_generation_is_deterministic_and_test_split_stable():
    a = get_task("countdown", seed=3, n_train=50, n_test=20)
    b = get_task("countdown", seed=3, n_train=50, n_test=20)
    assert a.train == b.train and a.test == b.test
    assert get_task("countdown", seed=3, n_train=200, n_test=20).test == a.test
    assert get_task("countdown", seed=4, n_train=50, n_test=20).test != a.test


def test_every_generated_problem_is_solvable_by_its_reference():
    for name, d in (("arithmetic", 2), ("arithmetic", 5), ("countdown", 3), ("countdown", 5)):
        task = get_task(name, n_train=100, n_test=20, difficulty=d)
        for p in task.train + task.test:
            assert task.verify(p.answer, p), p
    assert task.stats.errors == task.stats.timeouts == 0


def test_arithmetic_rendering_keeps_needed_parentheses():
    task = get_task("arithmetic", n_train=300, n_test=10, difficulty=4)
    for p in task.train:
        assert evaluate_expression(p.meta["compact"]) == int(p.answer)
    assert any("(" in p.meta["compact"] for p in task.train)


def test_difficulty_controls_size():
    easy = get_task("countdown", n_train=5, n_test=5, difficulty=2)
    hard = get_task("countdown", n_train=5, n_test=5, difficulty=5)
    assert all(len(p.meta["numbers"]) == 2 for p in easy.test)
    assert all(len(p.meta["numbers"]) == 5 for p in hard.test)
    assert all(1 <= p.meta["target"] <= 100 for p in hard.test)
    big = get_task("arithmetic", n_train=5, n_test=5, difficulty=7)
    assert max(int(n) for p in big.test for n in _numbers(p.meta["compact"])) > 99


def _numbers(text):
    return re.findall(r"\d+", text)


def test_get_task_errors():
    with pytest.raises(UserError, match="distinct"):
        get_task("arithmetic", n_train=1000, n_test=100, difficulty=1)  # only 243 exist
    with pytest.raises(UserError, match="unknown task"):
        get_task("sudoku")
    with pytest.raises(UserError, match="no option"):
        get_task("countdown", max_value=3)
    with pytest.raises(UserError, match="path"):
        get_task("jsonl")
    with pytest.raises(UserError):
        get_task("countdown", difficulty=1)
    with pytest.raises(UserError, match="timeout"):
        get_task("countdown", n_train=1, n_test=1, timeout_s=0)


def test_task_options_pass_through():
    task = get_task("countdown", n_train=20, n_test=5, max_number=9, max_target=20)
    assert all(max(p.meta["numbers"]) <= 9 and p.meta["target"] <= 20 for p in task.train)


# ============================================================ prompt templates


P = Problem("What is 3 + 4 * 2 - 5?", "6", {"compact": "3+4*2-5"})


def test_r1_zero_template():
    text = r1_zero_prompt(P)
    assert text.startswith("A conversation between User and Assistant.")
    assert "<think> </think> and <answer> </answer> tags" in text
    assert text.endswith("User: What is 3 + 4 * 2 - 5? Assistant: <think>")
    assert r1_zero_prompt(Problem("Add 1 and 2", "3")).endswith("User: Add 1 and 2. Assistant: <think>")
    assert prompt_opens_think(text)


def test_compact_template_is_short():
    assert compact_prompt(P) == "Q: 3+4*2-5\n<think>"
    assert compact_prompt(Problem("2+2", "4")) == "Q: 2+2\n<think>"
    assert prompt_opens_think(format_prompt(P, "compact"))


def test_chat_template_uses_the_tokenizer_callable():
    seen = {}

    def apply(messages, add_generation_prompt=True):
        seen["messages"], seen["gen"] = messages, add_generation_prompt
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"

    text = chat_prompt(P, apply)
    assert text.endswith("<|assistant|><think>") and seen["gen"] is True
    assert seen["messages"][0]["role"] == "user" and P.prompt_text in seen["messages"][0]["content"]
    assert prompt_opens_think(text)
    assert chat_prompt(P, lambda m, add_generation_prompt: "A:<think>\n").count("<think>") == 1
    assert format_prompt(P, "chat", apply) == text
    with pytest.raises(UserError, match="chat template"):
        format_prompt(P, "chat")
    with pytest.raises(UserError, match="unknown prompt template"):
        format_prompt(P, "fancy")


# ============================================================ jsonl tasks


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_task_loads_splits_and_verifies(tmp_path):
    rows = [json.dumps({"prompt": f"What is {i} / 2?", "answer": f"\\frac{{{i}}}{{2}}",
                        "source": "t"}) for i in range(1, 21)]
    path = _write(tmp_path / "half.jsonl", rows[:10] + [""] + rows[10:] + [rows[0]])  # dup + blank
    task = get_task(str(path), seed=1, n_test=5)
    assert task.name == "jsonl" and len(task.test) == 5 and len(task.train) == 15
    assert not {p.prompt_text for p in task.train} & {p.prompt_text for p in task.test}
    p = task.test[0]
    assert p.meta["source"] == "t" and isinstance(p.meta["line"], int)
    i = int(p.prompt_text.split()[2])
    assert task.verify(str(i / 2), p) and not task.verify(str(i / 2 + 1), p)
    capped = get_task("jsonl", path=path, n_train=3, n_test=5)
    assert len(capped.train) == 3


def test_jsonl_test_path_removes_test_prompts_from_train(tmp_path):
    train = _write(tmp_path / "a.jsonl", [json.dumps({"prompt": f"q{i}", "answer": i})
                                          for i in range(6)])
    test = _write(tmp_path / "b.jsonl", [json.dumps({"prompt": "q1", "answer": 1})])
    task = get_task("jsonl", path=train, test_path=test)
    assert [p.prompt_text for p in task.test] == ["q1"]
    assert "q1" not in {p.prompt_text for p in task.train} and len(task.train) == 5
    assert task.verify("1", task.test[0]) and not task.verify("2", task.test[0])


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": 2'], r"bad\.jsonl:2: invalid JSON"),
    (['{"prompt": "a"}'], r"bad\.jsonl:1: missing field 'answer'"),
    (['{"question": "a", "solution": 1}'], r"missing field 'prompt' and 'answer'.*'question'"),
    (['[1, 2]'], r":1: expected a JSON object"),
    (['{"prompt": "", "answer": 1}'], r"'prompt' must be a non-empty string"),
    (['{"prompt": "a", "answer": null}'], r"'answer' must be"),
    (['', '  '], r"no problems"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, match):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError, match=match):
        load_jsonl_problems(path)


def test_jsonl_missing_or_too_small_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        get_task(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        get_task(str(tmp_path / "empty.jsonl"))
    one = _write(tmp_path / "one.jsonl", ['{"prompt": "a", "answer": 1}'])
    task = get_task(str(one))
    assert len(task.train) == 1 and task.test == []


# ============================================================ user verifiers


def test_user_verifier_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "nanoseek_test_checks.py").write_text(
        "def exact(answer, problem):\n    return answer == problem.answer\n"
        "def half(answer, problem):\n    return 0.5\n"
        "def boom(answer, problem):\n    raise RuntimeError('bug')\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)  # found through the current-directory fallback
    task = get_task("countdown", n_train=2, n_test=2, verifier="nanoseek_test_checks:exact")
    p = task.test[0]
    assert task.verify(p.answer, p) and not task.verify("1 + 1", p)
    task.verifier = load_verifier("nanoseek_test_checks:half")
    assert task.score("x", p) == 0.5
    task.verifier = load_verifier("nanoseek_test_checks:boom")
    assert task.score("x", p) == 0.0 and task.stats.errors == 1
    for spec, match in (("nanoseek_test_checks", "must look like"),
                        ("nanoseek_no_such_module_xyz:f", "cannot import"),
                        ("nanoseek_test_checks:missing", "no attribute"),
                        ("nanoseek_test_checks:NOT_CALLABLE", "not callable")):
        with pytest.raises(UserError, match=match):
            load_verifier(spec)
    sys.modules.pop("nanoseek_test_checks", None)


def test_callable_verifier_and_threaded_scoring():
    task = get_task("arithmetic", n_train=5, n_test=5, verifier=lambda a, p: a == p.answer)
    out = []
    threads = [threading.Thread(target=lambda p=p: out.append(task.score(p.answer, p)))
               for p in task.test]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [1.0] * 5 and task.stats.calls == 5


def test_answer_key_normalizes_for_voting():
    arith = get_task("arithmetic", n_train=1, n_test=1)
    assert arith.answer_key("6.0") == arith.answer_key(" 6 ") == arith.answer_key("12/2")
    count = get_task("countdown", n_train=1, n_test=1)
    assert count.answer_key("(1 + 2) * 3") == count.answer_key("(1+2)*3")
    assert count.answer_key(None) is None


# ============================================================ metrics


def _pass_at_k_reference(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n),
                                                      st.integers(1, n))))
def test_pass_at_k_matches_combinatorial_formula(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_reference(n, c, k), abs=1e-9)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(4, 1, 4) == 1.0
    for bad in ((5, 6, 1), (5, 2, 6), (5, 2, 0)):
        with pytest.raises(UserError):
            pass_at_k(*bad)


def test_majority_vote():
    assert majority_vote(["7", "6", "7", None, None, None]) == "7"
    assert majority_vote(["6", "7"]) == "6"  # tie: first seen
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert majority_vote(["7.0", "6", "7"], key=lambda a: float(a)) == "7.0"


def test_maj_at_k():
    answers, correct = ["5", "7", "7", "5", "5"], [False, True, True, False, False]
    assert maj_at_k(answers, correct) == 0.0
    assert maj_at_k(answers, correct, k=3) == 1.0
    assert maj_at_k([None, None], [False, False]) == 0.0
    with pytest.raises(UserError):
        maj_at_k(answers, correct[:2])
    with pytest.raises(UserError):
        maj_at_k(answers, correct, k=9)


def test_eval_result_summary_and_rendering():
    s = [[Sample("6", True, True, 10), Sample("5", False, True, 20)],
         [Sample(None, False, False, 30), Sample(None, False, False, 40)]]
    greedy = [Sample("6", True, True, 12), Sample("1", False, True, 8)]
    r = EvalResult.from_samples("arithmetic", s, greedy)
    assert (r.n_problems, r.k) == (2, 2)
    assert r.greedy_accuracy == 0.5 and r.pass_at_1 == pytest.approx(0.25)
    assert r.pass_at_k == pytest.approx(0.5) and r.maj_at_k == pytest.approx(0.5)
    assert r.format_rate == pytest.approx(4 / 6)
    assert r.mean_response_length == pytest.approx(120 / 6)
    assert json.loads(r.to_json())["pass_at_1"] == pytest.approx(0.25)
    md = r.to_markdown()
    assert md.startswith("| metric | value |") and "| maj@2 | 50.0% |" in md
    console = Console(record=True, width=80)
    console.print(r.to_rich_table())
    assert "pass@1 (avg of 2)" in console.export_text()
    only_greedy = EvalResult.from_samples("t", [], greedy)
    assert only_greedy.pass_at_1 is None and "| pass@1 (avg of 0) | - |" in only_greedy.to_markdown()
    with pytest.raises(UserError):
        EvalResult.from_samples("t", [[s[0][0]], s[1]])


def test_first_math_verify_call_of_a_fresh_process_grades_correctly(tmp_path):
    """The cold import of math_verify + sympy (~0.3 s idle, > 1 s on a busy machine) happens when the
    task is built, not inside the first graded call's time limit: with a 0.1 s limit a correct answer
    in a new process is graded correct and nothing times out."""
    import subprocess

    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"prompt": "half?", "answer": "0.5"}) + "\n"
                    + json.dumps({"prompt": "two?", "answer": "2"}) + "\n")
    code = (
        "import sys\n"
        "from nanoseek.r1.tasks import get_task\n"
        "assert 'sympy' not in sys.modules\n"
        f"task = get_task({str(data)!r}, n_test=1, timeout_s=0.1)\n"
        "half = next(p for p in task.train + task.test if p.answer == '0.5')\n"
        "print(task.verify('\\\\frac{1}{2}', half), task.verify('1/3', half), task.stats.timeouts)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "0"], out.stdout + out.stderr
