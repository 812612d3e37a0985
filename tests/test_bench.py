"""The benchmark script runs end to end (a few steps) and writes its table as valid JSON."""

import importlib.util
import json
import sys

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
    for stat in ("median", "mean"):
        for key in ("plain_ms", "gptlab_ms", "gptlab_no_mlflow_ms"):
            assert row[stat][key] > 0
    for window in ("half", "slide"):
        assert written["generation"][window]["kv_cache_tok_s"] > 0
        assert written["generation"][window]["no_cache_tok_s"] > 0
