"""End-to-end smoke test: `nanoseek demo --quick` runs every stage (base, R1-Zero, the R1 pipeline, the
distilled student) and writes a summary and report with finite numbers, the three models side by side."""

import json
import math
import re

from nanoseek.cli import main

ROWS = ("base", "r1_zero", "r1", "student")
METRICS = ("greedy", "pass1", "length", "format", "readable", "params")


def test_demo_quick_end_to_end(tmp_path, capsys):
    from nanoseek.r1.pipeline import STAGES

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out / "report.html"
    assert report.exists()
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 4  # plots are embedded, not linked
    assert "deepseek-v3" in html and "&lt;think&gt;" in html
    summary = json.loads((out / "summary.json").read_text())
    for key, value in summary.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), key
    assert str(report) in printed

    # R1-Zero, R1 and the distilled student side by side (and the base), each with every metric
    for row in ROWS:
        for metric in METRICS:
            assert f"{row}_{metric}" in summary, (row, metric)
        for rate in ("greedy", "pass1", "format", "readable"):
            assert 0.0 <= summary[f"{row}_{rate}"] <= 1.0
        assert summary[f"{row}_length"] > 0
    assert summary["student_params"] < summary["r1_params"] == summary["r1_zero_params"]
    # the R1 row is the R1 pipeline's final model: the cold start taught it the answer format
    assert summary["r1_format"] > summary["base_format"]
    table = printed[printed.index("side by side"):]
    for label in ("base", "R1-Zero", "R1", "student"):
        assert re.search(rf"│ {re.escape(label)}\s+│", table), label
    assert "R1-Zero, R1 and the distilled student" in html and "Samples of the distilled student" in html
    # the R1 rows come from the R1 pipeline's own stages (nanoseek r1), cached in the demo's folder
    for stage in STAGES:
        assert (out / "r1" / stage / "result.json").exists(), stage
    # every training stage ran the steps it planned; the stage times are recorded with the load
    for prefix in ("pretrain", "grpo", "r1_cold_start", "r1_reasoning_rl", "r1_sft", "r1_final_rl", "r1_distill"):
        assert summary[f"{prefix}_steps"] == summary[f"{prefix}_planned_steps"] > 0, prefix
    assert "WARNING" not in printed
    assert summary["stages_cpu_seconds"] > 0 and "Stage times" in html

    # a second run reuses every finished stage: the demo's 5 and the R1 pipeline's 7; and a stage that ran
    # fewer steps than planned (as if cut short) is named loudly in the summary and the report
    result_file = out / "r1" / "final_rl" / "result.json"
    result = json.loads(result_file.read_text())
    result_file.write_text(json.dumps({**result, "steps": 0}))
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"\] cached", printed)) == 5 + len(STAGES)
    assert "running ..." not in printed
    assert "WARNING: the R1 final_rl stage was cut short: 0 of 1 steps ran" in printed
    assert "the R1 final_rl stage was cut short" in (out / "report.html").read_text()
    assert json.loads((out / "summary.json").read_text())["r1_final_rl_steps"] == 0


def test_cut_short_names_every_stage_that_did_less_than_planned():
    from nanoseek.demo import cut_short

    s = {"grpo_steps": 300, "grpo_planned_steps": 300, "r1_distill_steps": 7, "r1_distill_planned_steps": 90,
         "pretrain_steps": 10, "pretrain_planned_steps": 1000}
    lines = cut_short(s)
    assert [line.split(" stage")[0] for line in lines] == ["the R1 distill", "the pretraining"]
    assert lines[0].startswith("the R1 distill stage was cut short: 7 of 90 steps ran")
