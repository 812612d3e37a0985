"""The benchmark script runs end to end (a few steps) and writes its table as valid JSON."""

import importlib.util
import json
import sys

import pytest

from conftest import ROOT


def test_benchmark_smoke(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA", str(small_corpus))
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location(
        "bench", ROOT / "experiments" / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    # Hydra finds the script's trainer factory by its module name
    monkeypatch.setitem(sys.modules, "bench", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.json"
    result = bench.main(["--smoke", "--out", str(out), "--recipes", "bigram"])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    (row,) = written["training"]
    assert row["recipe"] == "bigram"
    # the three paths time the same work: as many steps, the same model on the same batches
    # with the same optimizer, schedule and clipping, so the same loss at the last step
    assert {k: v for k, v in row["steps_run"].items()} == {
        "plain": [row["steps"]], "gptlab": [row["steps"]], "gptlab_no_mlflow": [row["steps"]]}
    (plain,), (gptlab,), (no_mlflow,) = row["last_loss"].values()
    assert gptlab == pytest.approx(plain, abs=1e-5) and no_mlflow == pytest.approx(plain,
                                                                                 abs=1e-5)
    for stat in ("median", "mean"):
        plain_ms, gptlab_ms = row[stat]["plain_ms"], row[stat]["gptlab_ms"]
        ratio = gptlab_ms / plain_ms
        # the times are written to 3 decimals: the ratio of the written times is off by at
        # most that rounding, which a sub-millisecond bigram step makes large
        slack = 100 * ratio * (0.0005 / plain_ms + 0.0005 / gptlab_ms) + 0.1
        assert row[stat]["overhead_pct"] == pytest.approx(100 * (ratio - 1), abs=slack)
    for window in ("half", "slide"):
        g = written["generation"][window]
        kv, plain = g["kv_cache_tok_s"], g["no_cache_tok_s"]
        # speeds are written to 1 decimal, the speedup to 2: allow for both roundings
        slack = kv / plain * (0.05 / kv + 0.05 / plain) + 0.005
        assert g["speedup"] == pytest.approx(kv / plain, abs=slack)
