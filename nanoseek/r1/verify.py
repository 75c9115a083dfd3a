"""Safe answer checking: parse model output, never execute it.

A policy under RL pressure will find any way to make a checker say "correct" or to stall it, so
everything here treats the model's text as hostile:

* expressions are parsed with `ast.parse(mode="eval")` and walked against a whitelist of node types
  (numbers, + - * /, unary minus, parentheses; `**` only if asked for, with a bounded exponent),
  after a character whitelist and a length limit; values are exact `Fraction`s with bounded size, so
  "9**9**9" or a 10,000-digit literal cannot eat the CPU or memory;
* every verifier call goes through `run_with_timeout`, and `VerifierStats` counts the calls that
  raised or timed out, so a broken verifier costs a zero reward and a log line, not a training run.
"""

from __future__ import annotations

import ast
import logging
import re
import signal
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from nanoseek.errors import warn

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ expressions


@dataclass(frozen=True)
class ExprLimits:
    """Bounds that keep parsing and evaluation of untrusted text cheap.

    `max_value` bounds |numerator| and denominator of every intermediate result, which is what
    keeps a product of many large literals (or a power) from growing without bound."""

    max_chars: int = 200
    max_nodes: int = 64
    max_literal: int = 10**6
    max_value: int = 10**18
    allow_pow: bool = False
    max_exponent: int = 8


DEFAULT_LIMITS = ExprLimits()

# Characters an expression may contain; everything else (letters, '.', '_', quotes, ...) is
# rejected before Python's parser sees it. This rules out names, calls, attribute access, floats,
# complex literals, hex/underscore literals and string tricks in one step.
_EXPR_CHARS = re.compile(r"[0-9+\-*/() \t]*")
# Typographic operators small models (and people) write; mapped to ASCII before parsing.
_OPERATOR_ALIASES = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-"}

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


class _Invalid(Exception):
    """Internal: the expression is outside the whitelist or the limits."""


@dataclass(frozen=True)
class ParsedExpr:
    """A validated expression: its exact value and the integer literals it uses, in order."""

    value: Fraction
    numbers: tuple[int, ...]


def normalize_expression(text: str) -> str:
    """Map typographic operators to ASCII and strip surrounding whitespace."""
    for alias, op in _OPERATOR_ALIASES.items():
        text = text.replace(alias, op)
    return text.strip()


def parse_expression(text: str, limits: ExprLimits = DEFAULT_LIMITS) -> ParsedExpr | None:
    """Parse and exactly evaluate an arithmetic expression; None if it is invalid in any way.

    Never raises and never executes anything: the input is only tokenized and walked."""
    if not isinstance(text, str):
        return None
    text = normalize_expression(text)
    if not text or len(text) > limits.max_chars or not _EXPR_CHARS.fullmatch(text):
        return None
    if "**" in text and not limits.allow_pow:
        return None
    try:
        tree = ast.parse(text, mode="eval")
        _check_shape(tree, limits)
        numbers: list[int] = []
        value = _eval(tree.body, limits, numbers)
    except (_Invalid, SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError,
            OverflowError, TypeError):
        return None
    return ParsedExpr(value=value, numbers=tuple(numbers))


def evaluate_expression(text: str, limits: ExprLimits = DEFAULT_LIMITS) -> Fraction | None:
    """Exact value of an arithmetic expression, or None if invalid (see `parse_expression`)."""
    parsed = parse_expression(text, limits)
    return None if parsed is None else parsed.value


def _check_shape(tree: ast.AST, limits: ExprLimits) -> None:
    """Reject trees that are too big or contain any node type outside the whitelist.

    Done before evaluation with the iterative `ast.walk`, so evaluation's recursion depth is bounded
    by `max_nodes`."""
    allowed_ops = _BINOPS + ((ast.Pow,) if limits.allow_pow else ())
    n = 0
    for node in ast.walk(tree):
        n += 1
        if n > limits.max_nodes:
            raise _Invalid("too many nodes")
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub) + allowed_ops):
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:  # not bool, float, str
            continue
        raise _Invalid(f"node {type(node).__name__} not allowed")


def _eval(node: ast.AST, limits: ExprLimits, numbers: list[int]) -> Fraction:
    """Evaluate a whitelisted tree with exact rationals, bounding every intermediate value."""
    if isinstance(node, ast.Constant):
        if abs(node.value) > limits.max_literal:
            raise _Invalid("literal too large")
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):  # only USub passes _check_shape
        return -_eval(node.operand, limits, numbers)
    if not isinstance(node, ast.BinOp):
        raise _Invalid("unexpected node")
    left = _eval(node.left, limits, numbers)
    right = _eval(node.right, limits, numbers)
    return _bounded(_apply(node.op, left, right, limits), limits)


def _apply(op: ast.operator, a: Fraction, b: Fraction, limits: ExprLimits) -> Fraction:
    if isinstance(op, ast.Add):
        return a + b
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Mult):
        return a * b
    if isinstance(op, ast.Div):
        if b == 0:
            raise _Invalid("division by zero")
        return a / b
    if isinstance(op, ast.Pow) and limits.allow_pow:
        if b.denominator != 1 or not 0 <= b.numerator <= limits.max_exponent:
            raise _Invalid("exponent out of range")
        if a == 0 and b == 0:
            raise _Invalid("0 ** 0")
        return a ** int(b)
    raise _Invalid("operator not allowed")


def _bounded(x: Fraction, limits: ExprLimits) -> Fraction:
    if abs(x.numerator) > limits.max_value or x.denominator > limits.max_value:
        raise _Invalid("value too large")
    return x


# ------------------------------------------------------------------ plain numbers

_INT = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUMBER_RE = re.compile(rf"({_INT})(?:\.(\d+))?|([+-]?\d+)\s*/\s*(\d+)")


def parse_number(text: str, max_chars: int = 64) -> Fraction | None:
    """A single number written plainly: "7", "-3", "+7", "1,234", "3.50", "7/2"; else None.

    Deliberately NOT an expression evaluator: for an arithmetic question, answering with the question
    itself ("3 + 4 * 2") must not count as the answer. A trailing period ("7.") is tolerated."""
    if not isinstance(text, str):
        return None
    text = text.strip().rstrip(".").strip()
    if not text or len(text) > max_chars:
        return None
    m = _NUMBER_RE.fullmatch(text)
    if m is None:
        return None
    if m.group(3) is not None:
        den = int(m.group(4))
        return None if den == 0 else Fraction(int(m.group(3)), den)
    whole = m.group(1).replace(",", "")
    return Fraction(whole + ("." + m.group(2) if m.group(2) else ""))


# ------------------------------------------------------------------ countdown

_TRAILING_EQUALS = re.compile(r"^(.*?)=\s*([+-]?\d+)\s*$", re.S)


def check_countdown(expression: str, numbers: list[int] | tuple[int, ...], target: int,
                    exact: bool = True, limits: ExprLimits = DEFAULT_LIMITS) -> bool:
    """True iff `expression` evaluates exactly to `target` using the given numbers.

    `exact=True` (TinyZero's rule) requires each given number used exactly once; `exact=False`
    allows leaving numbers out, never reusing one. One trailing "= <target>" is accepted because
    models often restate the target; "= <anything else>" is wrong."""
    if not isinstance(expression, str) or len(expression) > limits.max_chars + 16:
        return False
    m = _TRAILING_EQUALS.match(expression)
    if m is not None:
        if int(m.group(2)) != target:
            return False
        expression = m.group(1)
    parsed = parse_expression(expression, limits)
    if parsed is None or parsed.value != target:
        return False
    used = sorted(abs(n) for n in parsed.numbers)
    given = sorted(numbers)
    if exact:
        return used == given
    remaining = list(given)
    for n in used:
        if n not in remaining:
            return False
        remaining.remove(n)
    return True


# ------------------------------------------------------------------ timeouts


class VerifierTimeout(Exception):
    """A verifier call ran past its time limit."""


class _Alarm(BaseException):
    """Raised by the SIGALRM handler. A BaseException so `except Exception` in the verifier
    cannot swallow it and keep running."""


def run_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float = 1.0,
                     **kwargs: Any) -> Any:
    """Call `fn(*args, **kwargs)`; raise `VerifierTimeout` if it takes longer than `timeout_s`.

    On the main thread (with no other interval timer pending) a SIGALRM interval timer interrupts
    the call itself. Anywhere else (a data-loader thread, a worker pool, a timer already in use)
    signals are unavailable, so the call runs in a daemon thread and we stop waiting for it after
    `timeout_s`; that thread cannot be killed, which is why our own parsers are bounded by
    `ExprLimits` and this is only the safety net. Exceptions from `fn` propagate unchanged."""
    if timeout_s is None or timeout_s <= 0:
        return fn(*args, **kwargs)
    if _can_use_alarm():
        return _run_with_alarm(fn, args, kwargs, timeout_s)
    return _run_in_thread(fn, args, kwargs, timeout_s)


def _can_use_alarm() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _run_with_alarm(fn, args, kwargs, timeout_s: float) -> Any:
    def handler(signum, frame):
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Alarm:
        raise VerifierTimeout(f"verifier took longer than {timeout_s:g}s") from None
    finally:
        signal.signal(signal.SIGALRM, old)


def _run_in_thread(fn, args, kwargs, timeout_s: float) -> Any:
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, name="nanoseek-verifier", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise VerifierTimeout(f"verifier took longer than {timeout_s:g}s (thread left running)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------ guarded calls


@dataclass
class VerifierStats:
    """Counts of verifier calls and failures, for the training log. Thread-safe."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def record(self, outcome: str) -> None:
        with self._lock:
            self.calls += 1
            if outcome == "error":
                self.errors += 1
            elif outcome == "timeout":
                self.timeouts += 1

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "errors": self.errors, "timeouts": self.timeouts}


def to_score(result: Any) -> float:
    """bool -> 0/1; a number (also numpy/torch scalars) -> clamped to [0, 1]; anything else (None,
    a string, NaN) is a verifier bug, raised as TypeError."""
    if isinstance(result, bool):
        return 1.0 if result else 0.0
    if result is None or isinstance(result, (str, bytes)):
        raise TypeError(f"verifier returned {result!r}, expected bool or float")
    try:
        x = float(result)
    except (TypeError, ValueError):
        raise TypeError(f"verifier returned {type(result).__name__}, expected bool or float") \
            from None
    if x != x:  # NaN
        raise TypeError("verifier returned NaN")
    return min(1.0, max(0.0, x))


def guarded_score(verifier: Callable[[str, Any], Any], answer: str, problem: Any,
                  timeout_s: float = 1.0, stats: VerifierStats | None = None) -> float:
    """Score in [0, 1] from `verifier(answer, problem)`; 0.0 if it raises, times out or returns
    something that is not a bool/number. Failures are counted in `stats` and logged (the first of
    each kind as a warning line, the rest at DEBUG) so they are visible without flooding the log."""
    stats = stats if stats is not None else VerifierStats()
    try:
        score = to_score(run_with_timeout(verifier, answer, problem, timeout_s=timeout_s))
    except VerifierTimeout as e:
        stats.record("timeout")
        _log_failure(stats.timeouts, "timed out", e)
        return 0.0
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a verifier bug must not stop training
        stats.record("error")
        _log_failure(stats.errors, "raised", e)
        return 0.0
    stats.record("ok")
    return score


def _log_failure(count: int, what: str, error: BaseException) -> None:
    detail = " ".join(str(error).split())  # one line, whatever the verifier raised
    message = f"verifier {what} ({count} so far; reward 0): {type(error).__name__}: {detail}"
    if count == 1:  # the user sees the first of each kind; the rest go to the debug log
        warn(message)
    else:
        logger.debug(message)
