"""Silent failures of a GRPO run, each with a one-line verdict.

An RL run can "finish fine" while learning nothing: the loss is ~0 by construction (see grpo.py), so a
broken run looks like a healthy one in the loss curve. These checks read the per-step metrics
(`Trainer.history` or metrics.jsonl rows) and say, in one line each, whether the run shows:

* truncation: completions cut at max_new_tokens get a zero or malformed reward, and their tokens
  still drive the update (unless mask_truncated);
* zero-variance groups: a group whose samples all earn the same reward has zero advantage and
  teaches nothing (too easy, too hard, or a reward that cannot tell samples apart);
* a constant reward over many steps: saturated (nothing left to learn) or a broken reward;
* a KL blow-up: the policy left the reference far behind for several steps in a row, or for good
  (usually a too-high learning rate);
* training-inference mismatch: the sampler and the training forward disagree (nanoseek.r1.consistency).

`diagnose(rows)` returns the findings; `print_diagnostics` prints them; `grpo.run_grpo` does both at
the end of a run and writes them to out_dir/diagnostics.json for reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

TRUNCATED_LIMIT = 0.10  # mean share of truncated completions over the run
ZERO_VAR_LIMIT = 0.50  # mean share of groups without any reward variance
CONSTANT_MIN_STEPS = 10  # a reward unchanged for this many steps in a row ...
CONSTANT_MIN_SHARE = 0.20  # ... and for this share of the run is flagged
KL_LIMIT = 0.5  # nats per token: far past R1-style runs (~0.01-0.1 with beta = 0.001) ...
KL_SUSTAINED = 3  # ... for this many steps in a row (one batch with a few far-off tokens is a spike, not a blow-up)
LOGP_GAP_LIMIT = 0.1  # |log p engine - log p train| on one token, worst of the run
ROUTING_MISMATCH_LIMIT = 0.05  # share of (token, MoE layer) routings that differ


@dataclass
class Finding:
    check: str
    ok: bool
    value: float | None
    verdict: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'WARN'} {self.check}: {self.verdict}"


def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if key in r and r[key] is not None]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def check_truncation(rows: list[dict]) -> Finding:
    xs = _series(rows, "truncated")
    if not xs:
        return Finding("truncation", True, None, "not measured")
    share, last = _mean(xs), xs[-1]
    if share > TRUNCATED_LIMIT:
        return Finding("truncation", False, share,
                       f"{share:.0%} of completions hit max_new_tokens (last step {last:.0%}): raise "
                       "max_new_tokens, or set mask_truncated=true; cut answers earn no reward")
    return Finding("truncation", True, share, f"{share:.1%} of completions truncated (last step {last:.0%})")


def check_zero_variance(rows: list[dict]) -> Finding:
    xs = _series(rows, "zero_var_groups")
    if not xs:
        return Finding("zero-variance groups", True, None, "not measured")
    share = _mean(xs)
    if share > ZERO_VAR_LIMIT:
        return Finding("zero-variance groups", False, share,
                       f"{share:.0%} of groups had all-equal rewards (zero advantage, no signal; last step "
                       f"{xs[-1]:.0%}): the task is too easy or too hard for this policy; try "
                       "dynamic_sampling=true or another difficulty")
    return Finding("zero-variance groups", True, share,
                   f"{share:.0%} of groups had all-equal rewards (last step {xs[-1]:.0%})")


def check_constant_reward(rows: list[dict]) -> Finding:
    xs = _series(rows, "reward")
    if len(xs) < 2:
        return Finding("constant reward", True, None, "too few steps to tell")
    longest, run, end = 1, 1, 0
    for i in range(1, len(xs)):
        run = run + 1 if abs(xs[i] - xs[i - 1]) < 1e-9 else 1
        if run > longest:
            longest, end = run, i
    if longest >= CONSTANT_MIN_STEPS and longest >= CONSTANT_MIN_SHARE * len(xs):
        return Finding("constant reward", False, float(longest),
                       f"reward stayed at {xs[end]:.3g} for {longest} steps in a row (of {len(xs)}): "
                       "saturated or broken reward, nothing to learn from those steps")
    return Finding("constant reward", True, float(longest),
                   f"reward moved (longest unchanged stretch {longest} of {len(xs)} steps)")


def check_kl(rows: list[dict], beta: float | None = None) -> Finding:
    xs = _series(rows, "kl")
    if not xs or beta == 0:
        return Finding("KL blow-up", True, None, "not measured (beta = 0: no reference model)")
    top = max(xs)
    steps = [r.get("step", "?") for r in rows if "kl" in r]
    step = steps[xs.index(top)]
    longest, run, end = 0, 0, 0
    for i, x in enumerate(xs):
        run = run + 1 if x > KL_LIMIT else 0
        if run > longest:
            longest, end = run, i
    if longest >= KL_SUSTAINED or _mean(xs[-max(1, len(xs) // 10):]) > KL_LIMIT:
        return Finding("KL blow-up", False, top,
                       f"KL to the reference above {KL_LIMIT} nats/token for {longest} steps in a row (to step "
                       f"{steps[end]}; peak {top:.3g}, last steps {_mean(xs[-max(1, len(xs) // 10):]):.3g}): "
                       "the policy ran away; lower lr or raise beta")
    spikes = sum(x > KL_LIMIT for x in xs)
    note = f"; {spikes} single-step spike(s) above {KL_LIMIT}" if spikes else ""
    return Finding("KL blow-up", True, top,
                   f"KL to the reference peaked at {top:.3g} nats/token (step {step}), mean {_mean(xs):.3g}{note}")


def check_consistency(rows: list[dict]) -> Finding:
    gaps = _series(rows, "logp_gap_max")
    routing = _series(rows, "routing_mismatch")
    if not gaps:
        return Finding("training-inference mismatch", True, None, "not measured")
    gap, mis = max(gaps), (max(routing) if routing else None)
    routed = f", MoE routing differs for up to {mis:.1%} of token-layers" if mis is not None else ""
    if gap > LOGP_GAP_LIMIT or (mis is not None and mis > ROUTING_MISMATCH_LIMIT):
        return Finding("training-inference mismatch", False, gap,
                       f"sampler and training forward disagree: |dlogp| up to {gap:.3g}{routed}; "
                       "ratios are off policy; try replay_routing=true (MoE) or fp32")
    return Finding("training-inference mismatch", True, gap, f"|dlogp| at most {gap:.2g}{routed}")


def diagnose(rows: Iterable[dict], beta: float | None = None) -> list[Finding]:
    rows = list(rows)
    return [check_truncation(rows), check_zero_variance(rows), check_constant_reward(rows),
            check_kl(rows, beta), check_consistency(rows)]


def as_json(findings: list[Finding]) -> list[dict]:
    return [asdict(f) | {"line": f.line()} for f in findings]


def print_diagnostics(findings: list[Finding], title: str = "GRPO diagnostics") -> None:
    bad = sum(not f.ok for f in findings)
    print(f"{title}: {'all clear' if not bad else f'{bad} warning' + ('s' if bad > 1 else '')}")
    for f in findings:
        print(f"  {f.line()}")
