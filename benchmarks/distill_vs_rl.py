"""Distillation vs RL for a small student (DeepSeek-R1 §4: distilling beat RL on the small base).

Uses the R1-Zero experiment (benchmarks/r1_zero.py; run first if OUT/../r1_zero is missing) for
the data, the tokenizer and the teacher (the base model after GRPO). Then:

1. Student base: a smaller model (the `tiny` preset) pretrained on the same corpus, same steps.
2. Distillation: rejection sampling from the teacher on the *train* split (`sample_traces`, k
   samples per problem, verified ones kept; `nanoseek sample`) and SFT of the student base on those
   traces (`run_distill`; `nanoseek distill`). Its CPU time (sampling + SFT) is measured.
3. RL: GRPO on the same student base with the same settings as the teacher's run, stopped after the
   same CPU time as step 2 (`time_limit_cpu`).
4. Held-out test accuracy (200 problems, greedy; pass@1 / maj@4 at T = 1) of the student base, the
   distilled student and the RL student (and the teacher for reference).

    python benchmarks/distill_vs_rl.py            # ~15-20 min on one CPU thread after r1_zero
    python benchmarks/distill_vs_rl.py --quick    # smoke test

Writes OUT/results.json and OUT/results.md; the commands of each stage are printed and saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_r1_zero():
    spec = importlib.util.spec_from_file_location("r1_zero", HERE / "r1_zero.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STUDENT = {"model": "tiny", "overrides": {"vocab_size": 512}}
QUICK_STUDENT = {"model": "tiny", "overrides": {"vocab_size": 320, "hidden_size": 32}}


def pretrain_student(out: Path, p: dict, data: Path, student: dict, seed: int) -> Path:
    z = load_r1_zero()
    q = dict(p, model=student["model"], overrides=student["overrides"])
    return z.pretrain(out / "student", q, data, seed)


def distill(out: Path, p: dict, z, task, teacher: Path, student_base: Path, k: int,
            epochs: int, seed: int) -> tuple[Path, dict]:
    """Rejection-sample the teacher on the train split, then SFT the student base on the traces."""
    from nanoseek.hf import load_model_and_tokenizer
    from nanoseek.r1.configs import DistillConfig
    from nanoseek.r1.distill import run_distill
    from nanoseek.r1.sample import sample_traces, write_jsonl

    t0 = time.process_time()
    model, tok = load_model_and_tokenizer(teacher)
    rows, stats = sample_traces(model, tok, task, k=k, template="compact",
                                max_new_tokens=p["max_new_tokens"], temperature=1.0,
                                split="train", seed=seed, model_name=str(teacher))
    traces = write_jsonl(rows, out / "traces.jsonl")
    sample_cpu = time.process_time() - t0
    if not rows:  # only with --quick's untrained teacher
        print("no verified teacher traces: distillation skipped", flush=True)
        return None, {**stats, "sample_cpu_s": sample_cpu, "sft_cpu_s": 0.0, "sft_steps": 0,
                      "commands": []}
    cfg = DistillConfig(model=str(student_base), data=str(traces), out_dir=str(out / "distill"),
                        seq_len=p["seq_len"], batch_size=p["batch_size"], epochs=epochs, lr=1e-3,
                        warmup_steps=10, eval_every=0, save_every=10**9, tensorboard=False,
                        seed=seed)
    t1 = time.process_time()
    trainer = run_distill(cfg)
    sft_cpu = time.process_time() - t1
    info = {**stats, "sample_cpu_s": sample_cpu, "sft_cpu_s": sft_cpu, "sft_steps": trainer.step,
            "commands": [f"nanoseek sample --model {teacher} --task arithmetic --task-option "
                         f"n_operands=2 --task-option max_value=99 --task-option ops=+ "
                         f"--n-train {task_size(task)} -k {k} --max-new-tokens "
                         f"{p['max_new_tokens']} --out {traces}",
                         f"nanoseek distill --teacher-traces {traces} --student {student_base} "
                         f"seq_len={p['seq_len']} batch_size={p['batch_size']} epochs={epochs} "
                         f"lr=0.001 warmup_steps=10 out_dir={out / 'distill'}"]}
    return out / "distill" / "model", info


def task_size(task) -> int:
    return len(task.train)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiments/distill_vs_rl")
    ap.add_argument("--r1-zero", help="the r1_zero.py output directory (default: OUT/../r1_zero)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-k", type=int, default=4, help="teacher samples per training problem")
    ap.add_argument("--epochs", type=int, default=10, help="SFT epochs over the traces")
    ap.add_argument("--rl-multiplier", type=float, default=5.0,
                    help="also run GRPO with this many times the distillation budget (0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
    z = load_r1_zero()
    p = dict(z.QUICK if args.quick else z.FULL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zero_dir = Path(args.r1_zero) if args.r1_zero else out.parent / "r1_zero"
    if not (zero_dir / "grpo" / "model" / "config.json").exists():
        print(f"running the R1-Zero experiment first ({zero_dir})", flush=True)
        z.main((["--quick"] if args.quick else []) + ["--out", str(zero_dir), "--plot-dir",
                                                       str(zero_dir), "--threads", str(args.threads)])
    from nanoseek.r1.grpo import run_grpo
    from nanoseek.r1.rollout import build_task

    task = build_task(z.TASK["task"], seed=z.TASK["task_seed"], n_train=z.TASK["n_train"],
                      n_test=p["n_test"], options=z.TASK["task_options"])
    teacher = zero_dir / "grpo" / "model"
    student = QUICK_STUDENT if args.quick else STUDENT
    base = pretrain_student(out, p, zero_dir / "data", student, args.seed)
    results = {"teacher": z.evaluate(teacher, task, p), "student_base": z.evaluate(base, task, p)}
    print(f"student base: greedy {results['student_base']['greedy_accuracy']:.3f}", flush=True)

    distilled, info = distill(out, p, z, task, teacher, base, args.k, args.epochs, args.seed)
    results["distilled"] = z.evaluate(distilled, task, p) if distilled else None
    budget_min = (info["sample_cpu_s"] + info["sft_cpu_s"]) / 60
    if distilled:
        print(f"distilled: greedy {results['distilled']['greedy_accuracy']:.3f} "
              f"({budget_min:.1f} CPU min)", flush=True)

    rl_runs = {}
    for name, factor in (("rl", 1.0), ("rl_long", args.rl_multiplier)):
        if not factor:
            continue
        cfg = z.grpo_config(out, p, base, args.seed, out_dir=str(out / f"grpo_x{factor:g}"),
                            time_limit_min=budget_min * factor, time_limit_cpu=True)
        t0 = time.process_time()
        trainer = run_grpo(cfg)
        rl_cpu = time.process_time() - t0
        results[name] = z.evaluate(Path(cfg.out_dir) / "model", task, p)
        rl_runs[name] = {"cpu_s": rl_cpu, "steps": trainer.step, "factor": factor,
                         "command": z.cli_command(cfg)}
        print(f"RL x{factor:g}: greedy {results[name]['greedy_accuracy']:.3f} "
              f"({rl_cpu / 60:.1f} CPU min, {trainer.step} steps)", flush=True)

    summary = {"results": results, "distill": info, "rl": rl_runs, "student": student,
               "threads": args.threads,
               "parameters": {"teacher": parameters(teacher), "student": parameters(base)}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


def parameters(model_dir: Path) -> int:
    from nanoseek.hf import from_pretrained

    return from_pretrained(model_dir).num_parameters()


def markdown(s: dict) -> str:
    r = s["results"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| model | greedy acc. | greedy answer, any format | pass@1 (T=1, 4 samples) | "
             "maj@4 | format | length |", "|---|---|---|---|---|---|---|"]
    rl = s["rl"]
    names = [(f"teacher (GRPO; {s['parameters']['teacher'] / 1e6:.2f}M params)", "teacher"),
             (f"student base ({s['parameters']['student'] / 1e6:.2f}M params)", "student_base"),
             ("student + distillation", "distilled")]
    names += [(f"student + GRPO, {v['factor']:g}x the distillation budget", k)
              for k, v in rl.items()]
    for name, key in names:
        x = r.get(key)
        if x is None:
            lines.append(f"| {name} | - | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {pct(x['greedy_accuracy'])} | "
                     f"{pct(x.get('greedy_answer_accuracy'))} | {pct(x['pass_at_1'])} | "
                     f"{pct(x['maj_at_k'])} | {pct(x['format_rate'])} | "
                     f"{x['mean_response_length']:.1f} |")
    d = s["distill"]
    lines += ["", f"Distillation: {d['kept']} verified traces from {d['samples']} teacher samples "
              f"({100 * d['accept_rate']:.1f}% correct), {d['sft_steps']} SFT steps; "
              f"{(d['sample_cpu_s'] + d['sft_cpu_s']) / 60:.2f} CPU min "
              f"(sampling {d['sample_cpu_s'] / 60:.2f}). "]
    lines[-1] += " ".join(f"GRPO x{v['factor']:g}: {v['steps']} steps in {v['cpu_s'] / 60:.2f} "
                          f"CPU min." for v in rl.values())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
