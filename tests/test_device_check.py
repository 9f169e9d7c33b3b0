"""The prepared device check (benchmarks/device_check.py) runs end to end at tiny sizes on the CPU,
so it is ready whenever a GPU or TPU is: every part runs, its correctness checks pass, and its
JSON and table are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import device_check  # noqa: E402


def test_the_device_check_runs_at_tiny_sizes(tmp_path):
    assert device_check.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "device_check_cpu_tiny.json").read_text())
    assert res["errors"] == {} and res["kernel"]["ok"] is True
    assert res["correctness"]["greedy_equal"] == 8 and res["correctness"]["engine_exact"] is True
    assert set(res["models"]) == {"tiny random", "tiny random SwiftKV"}
    for figures in res["models"].values():
        assert figures["prefill_tok_s"] > 0 and all(d["tok_s"] > 0 for d in figures["decode"].values())
    assert res["engine"]["L2"] > 0 and res["engine"]["off"] > 0
    assert all(res["prefill"][k] > 0 for k in ("prefill_s", "matmuls_s", "attention_s"))
    table = (tmp_path / "device_check_cpu_tiny.txt").read_text()
    assert "greedy equal to float32 on the CPU: 8 of 8" in table

    # Runs made in parts (two calls on a device machine) render as one table.
    first, second = dict(res), dict(res)
    first.pop("engine"), second.pop("correctness")
    first["sections"], second["sections"] = ["kernel", "correctness"], ["engine"]
    for name, part in (("a", first), ("b", second)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    merged = tmp_path / "merged"
    assert device_check.main(["--render", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                              "--out", str(merged)]) == 0
    assert (merged / "device_check_cpu.txt").read_text().count("PASS") == table.count("PASS")
