"""What the R1 commands share: finding the tokenizer, building a task, rendering and encoding
prompts, generating completions with per-token log-probabilities, and scoring them. Models and
their tokenizers are loaded by `nanoseek.hf.load_model_and_tokenizer`.

Generation goes through `generate_completions`, a thin adapter over the inference engine
(`nanoseek.inference.generate`: latent KV cache, per-row seeded sampling, per-token log-probs and
finish reasons) that adds what the R1 loops need: chunking into batches with a progress bar, seeds
that do not depend on the chunking, eval mode for the call, and a context-length check.

Log-probabilities follow `nanoseek.inference.sampling`: `log_softmax(logits / temperature)` of the
chosen token under the *unfiltered* distribution, the same quantity `grpo_loss.sequence_logprobs`
recomputes for GRPO's ratio.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from nanoseek.data.tokenizer import THINK
from nanoseek.errors import UserError
from nanoseek.r1.consistency import engine_routes, recording_routes
from nanoseek.inference import SamplingParams, generate
from nanoseek.r1.eval_metrics import Sample
from nanoseek.r1.rewards import RewardConfig, compute_rewards, parse_completion
from nanoseek.r1.tasks import (
    Problem,
    Task,
    chat_messages,
    format_prompt,
    get_task,
    prompt_opens_think,
)
from nanoseek.r1.verify import VerifierTimeout, run_with_timeout, to_score


# ================================================================== tokenizer


def tokenizer_dir_for(cfg) -> Path:
    """The tokenizer directory of a recipe config: its `tokenizer` setting (SFT, distill), else the
    starting model's directory. One clear error naming where it looked."""
    tried = [c for c in (getattr(cfg, "tokenizer", ""), cfg.init_from, cfg.model) if c]
    for candidate in tried:
        if (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    where = ", ".join(dict.fromkeys(map(str, tried))) or "no directory given"
    alternative = " or tokenizer=DIR" if hasattr(cfg, "tokenizer") else ""
    raise UserError(f"no tokenizer.json in {where}: give a model directory that holds one"
                    f"{alternative}")


# ================================================================== tasks and prompts


def build_task(name: str, seed: int = 0, n_train: int = 1000, n_test: int = 200,
               difficulty: int = 0, options: dict | None = None, verifier: str = "",
               timeout_s: float = 1.0) -> Task:
    """`get_task` with the command-line conventions (difficulty 0 and verifier "" mean defaults),
    its verifier checked up front (`check_verifier`)."""
    task = get_task(name, seed=seed, n_train=n_train, n_test=n_test,
                    difficulty=difficulty or None, verifier=verifier or None,
                    timeout_s=timeout_s, **(options or {}))
    check_verifier(task)
    return task


def check_verifier(task: Task, n: int = 3) -> None:
    """Run the verifier on the reference answers of a few problems before any generation.

    During training a verifier failure only costs a zero reward (a policy must not be able to stop
    a run by provoking one), so a verifier that is broken outright would silently train on
    nothing. This turns that case into one clear error up front."""
    for problem in (task.train or task.test)[:n]:
        try:
            to_score(run_with_timeout(task.verifier, problem.answer, problem,
                                       timeout_s=task.timeout_s))
        except VerifierTimeout:
            raise UserError(f"the {task.name} verifier timed out (> {task.timeout_s}s) on the "
                            f"reference answer {problem.answer!r}") from None
        except Exception as e:  # noqa: BLE001 - reported to the user, not swallowed
            raise UserError(f"the {task.name} verifier fails on the reference answer "
                            f"{problem.answer!r}: {type(e).__name__}: {e}") from None


def render_prompt(problem: Problem, template: str, tokenizer) -> str:
    """The prompt as text: what the sample tables, traces and the format reward see."""
    return format_prompt(problem, template, tokenizer.apply_chat_template)


def encode_prompt(problem: Problem, template: str, tokenizer) -> list[int]:
    """The prompt's token ids, the same tokens as `render_prompt`'s text. Problems come from task
    files, so their text is encoded as text: a `<|system|>` typed in a question stays characters
    and cannot forge a turn. Turn boundaries of the chat template are built structurally
    (`encode_chat`), the opened `<think>` is a reasoning tag (one token either way)."""
    if template == "chat":
        ids = tokenizer.encode_chat(chat_messages(problem), add_generation_prompt=True)
        return ids + tokenizer.encode(THINK)  # chat_prompt opens <think> after the assistant tag
    return tokenizer.encode(render_prompt(problem, template, tokenizer))


# ================================================================== generation


@dataclass
class SampledTokens:
    """What the policy sampled for one prompt: token ids (eos included when it stopped on one),
    their log-probabilities, and why it ended: "stop" (eos / stop token) or "length" (truncated).
    The R1 loops' copy of the engine's result, with lists they can keep and index."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    # the experts each MoE layer chose for the prompt and every token but the last, [layers, n, K]
    # (`record_routes=True`; see nanoseek.r1.consistency)
    routes: torch.Tensor | None = field(default=None, repr=False)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@torch.no_grad()
def generate_completions(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         eos_id: int, temperature: float = 1.0, top_p: float = 1.0,
                         seed: int | None = None, batch_size: int = 64,
                         progress: str | None = None, record_routes: bool = False) -> list[SampledTokens]:
    """Sample one completion per prompt (repeat a prompt G times for a group). Row i uses seed
    `seed + i`, so a run is reproducible whatever the batching. The model is put in eval mode for
    the call (no expert-load accounting) and restored afterwards. `progress` names a progress bar
    (None: no bar). `record_routes` keeps each completion's MoE routing (`SampledTokens.routes`)."""
    if not prompts:
        return []
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's context of {limit} tokens")
    if any(len(p) == 0 for p in prompts):
        raise UserError("cannot generate from an empty prompt")
    was_training = model.training
    model.eval()
    out: list[SampledTokens] = []
    bar = progress_bar(len(prompts), progress, unit="seq")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, seed=None if seed is None else seed + start)
            with recording_routes(model) if record_routes else nullcontext([]) as calls:
                results = generate(model, chunk, params, eos_token_id=eos_id)
            routes = (engine_routes(calls, [len(p) for p in chunk], [len(r.token_ids) for r in results])
                      if calls else [None] * len(results))
            out += [SampledTokens(list(r.token_ids), list(r.logprobs), r.finish_reason, routes=rt)
                    for r, rt in zip(results, routes)]
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out


def progress_bar(total: int, desc: str | None, unit: str = "it"):
    """A tqdm bar, off when `desc` is None or NANOSEEK_NO_PROGRESS=1 (tests, benchmarks)."""
    from tqdm.auto import tqdm

    off = desc is None or os.environ.get("NANOSEEK_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, disable=off, dynamic_ncols=True, leave=False)


def completion_text(tokenizer, completion: SampledTokens) -> str:
    """Decoded completion without its final eos. Control tokens are kept, so a completion that
    wanders into a new chat turn is visibly malformed instead of silently cleaned up."""
    ids = completion.tokens
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


# ================================================================== scoring


@dataclass
class Scored:
    """A completion with its text, reward components and the eval-metric view (`sample`)."""

    prompt: str
    text: str
    completion: SampledTokens
    rewards: dict[str, float]
    sample: Sample
    problem: Problem = field(repr=False, default=None)


def score_completion(task: Task, problem: Problem, prompt: str, text: str,
                     completion: SampledTokens, reward_cfg: RewardConfig | None = None,
                     max_tokens: int | None = None) -> Scored:
    """Rewards (with `prompt_opened_think` taken from the prompt, so the format reward can fire
    after a template that opened `<think>`) and the strict correctness used by the metrics."""
    opened = prompt_opens_think(prompt)
    n = len(completion.tokens)
    rewards = compute_rewards(text, problem, task, n_tokens=n, max_tokens=max_tokens,
                              config=reward_cfg, prompt_opened_think=opened)
    parsed = parse_completion(text, opened)
    correct = parsed.well_formed and task.verify(parsed.answer, problem)
    sample = Sample(answer=parsed.answer, correct=correct, well_formed=parsed.well_formed,
                    n_tokens=n)
    return Scored(prompt, text, completion, rewards, sample, problem)


def rollout(model, tokenizer, task: Task, problems: Sequence[Problem], *, n: int, template: str,
            max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int | None = None,
            reward_cfg: RewardConfig | None = None, batch_size: int = 64,
            progress: str | None = None, record_routes: bool = False) -> list[list[Scored]]:
    """`n` scored completions for each problem (greedy when temperature is 0: then use n = 1)."""
    prompts = [render_prompt(p, template, tokenizer) for p in problems]
    ids = [encode_prompt(p, template, tokenizer) for p in problems]
    flat = [x for x in ids for _ in range(n)]
    completions = generate_completions(model, flat, max_new_tokens=max_new_tokens,
                                       eos_id=tokenizer.eos_id, temperature=temperature,
                                       top_p=top_p, seed=seed, batch_size=batch_size,
                                       progress=progress, record_routes=record_routes)
    out = []
    for i, problem in enumerate(problems):
        group = completions[i * n:(i + 1) * n]
        out.append([score_completion(task, problem, prompts[i], completion_text(tokenizer, c), c,
                                     reward_cfg, max_new_tokens) for c in group])
    return out


class Stopwatch:
    """Wall-clock time of a block: `with Stopwatch() as t: ...`, then `t.seconds`."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
