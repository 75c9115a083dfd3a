"""End-to-end smoke test: `nanoseek demo --quick` runs every stage and writes a report with finite numbers."""

import json
import math
import re

from nanoseek.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = out / "report.html"
    assert report.exists()
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 4  # plots are embedded, not linked
    assert "deepseek-v3" in html and "&lt;think&gt;" in html
    summary = json.loads((out / "summary.json").read_text())
    for key, value in summary.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), key
    assert str(report) in capsys.readouterr().out

    # a second run reuses every finished stage
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"\] cached", printed)) == 5
