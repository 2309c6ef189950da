"""The benchmark CLI runs end to end and writes its table, JSON and plot."""

import json

import torch

from fastreg.bench.__main__ import main
from fastreg.bench.ops import OPS


def test_bench_cli_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["dropout", "--device", "cpu", "--quick", "--sizes", "4096", "--min-time", "0.01",
                 "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dropout-quick.json", "dropout-quick.md", "dropout-quick.png"]
    report = json.loads((tmp_path / "dropout-quick.json").read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu" and "git_commit" in env
    providers = {r["provider"] for r in report["results"]}
    assert {"torch", "torch.compile"} <= providers
    assert {r["mode"] for r in report["results"]} == {"fwd", "bwd", "fwd+bwd"}
    for row in report["results"]:
        if row["provider"] != "torch.compile":  # may be unavailable on a machine; reported, not fatal
            assert row["error"] is None and row["timing"]["median_ms"] > 0 and row["gbps"] > 0
            assert row["min_bytes"] == OPS["dropout"].bytes_per_element[row["mode"]] * 4096 * 4
    assert report["copy_gbps"][0]["gbps"] > 0
    assert "| dropout | fwd | 4,096 | float32 |" in capsys.readouterr().out
