"""Loss against compute: every run records its compute; `gptlab-compare --scaling` fits a
saturating power law per group and the compute multiplier of each group against a baseline,
recovering a known law and a known multiplier from synthetic runs; bad input is one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, one_line_error, store_uri
from gptlab.cli import compare as compare_cli
from gptlab.models import build_model
from gptlab.models.compute import flops_per_token, non_embedding_parameters
from gptlab.tracking import scaling

BASE = scaling.Law(E=1.5, A=3000.0, alpha=0.3)
COMPUTE = [1e12 * 4 ** i for i in range(4)]  # 4 sizes over 64x


def synthetic(shift: float, seeds: int, noise: float, rng) -> list[tuple[float, float]]:
    """Runs whose loss follows BASE at `shift` times their compute: an idea worth `shift`."""
    return [(c, BASE.loss(shift * c) * math.exp(rng.normal(0, noise)))
            for c in COMPUTE for _ in range(seeds)]


def test_the_fit_recovers_a_known_law_and_multiplier():
    rng = np.random.default_rng(0)
    fits = scaling.fit_groups({"base": synthetic(1, 3, 0.001, rng),
                               "idea": synthetic(2, 3, 0.001, rng)}, draws=30)
    base, idea = fits
    assert base.law.alpha == pytest.approx(0.3, abs=0.03)
    assert base.law.E == pytest.approx(1.5, abs=0.02)
    for c, m, low, high in scaling.multipliers(base, idea):
        assert m == pytest.approx(2.0, rel=0.1), c
        assert low <= m <= high
    # the multiplier of the baseline against itself is 1 at any compute
    assert scaling.multiplier(base.law, base.law, 3e13) == pytest.approx(1.0)
    assert scaling.Law(1.5, 1.0, 0.5).compute_for(1.4) == math.inf


def test_a_run_records_its_compute(tiny_run):
    tmp, run_id = tiny_run
    run = MlflowClient(store_uri(tmp)).get_run(run_id)
    p = run.data.params
    kwargs = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": int(p["vocab_size"]),
              "block_size": 16}
    model = build_model("gptlab.models.gpt.GPT", kwargs)
    assert int(p["n_params_non_embedding"]) == non_embedding_parameters(model)
    # everything but the token table (the head is tied to it) and the position table
    assert non_embedding_parameters(model) == int(p["n_params"]) - (kwargs["vocab_size"] + 16) * 16
    per_token = flops_per_token(model, kwargs)
    assert int(p["flops_per_token"]) == per_token == \
        6 * non_embedding_parameters(model) + 12 * 1 * 16 * 16
    assert run.data.metrics["flops"] == run.data.metrics["tokens"] * per_token


def log_runs(uri: str, points: dict[str, list[tuple[float, float]]]) -> None:
    """Finished runs as gptlab records them, with compute and a val/loss curve, the children
    of one sweep."""
    client = MlflowClient(uri)
    exp = client.create_experiment("sizes")
    parent = client.create_run(exp, run_name="sizes", tags={"gptlab.sweep": "true"})
    for pos_emb, pts in points.items():
        for i, (flops, loss) in enumerate(pts):
            run = client.create_run(exp, run_name=f"{pos_emb}-{i}", tags={
                "mlflow.parentRunId": parent.info.run_id})
            rid = run.info.run_id
            size = COMPUTE.index(min(COMPUTE, key=lambda c, f=flops: abs(c - f)))
            for key, value in {"model.pos_emb": pos_emb, "model.n_embd": 32 * (size + 1),
                               "seed": i}.items():
                client.log_param(rid, key, value)
            client.log_metric(rid, "flops", flops, step=100)
            client.log_metric(rid, "val/loss", loss + 0.1, step=50)
            client.log_metric(rid, "val/loss", loss, step=100)
            client.set_terminated(rid)
    client.set_terminated(parent.info.run_id)


def test_compare_prints_fits_and_multipliers(monkeypatch, capsys, tmp_path):
    rng = np.random.default_rng(1)
    log_runs(store_uri(tmp_path), {"learned": synthetic(1, 3, 0.002, rng),
                                   "rope": synthetic(1.5, 3, 0.002, rng)})
    code, out, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main, [
        "--experiment", "sizes", "--sweep", "latest", "--scaling", "--by", "model.pos_emb",
        "--baseline", "model.pos_emb=learned", "--bootstrap", "20",
        "--plot", str(tmp_path / "scaling.png")])
    assert code == 0, err
    assert "pos_emb=rope" in out and "alpha" in out
    table = out.split("compute multipliers against pos_emb=learned")[1]
    rope = next(line for line in table.splitlines() if line.startswith("pos_emb=rope"))
    multipliers = [float(cell.split()[0]) for cell in rope.split("  ")
                   if cell.strip()[:1].isdigit()]
    assert len(multipliers) == 4
    assert all(1.3 < m < 1.7 for m in multipliers), table
    assert (tmp_path / "scaling.png").stat().st_size > 0
    # kept on the sweep's parent run, as its group table is
    client = MlflowClient(store_uri(tmp_path))
    exp = client.get_experiment_by_name("sizes").experiment_id
    parent, = client.search_runs([exp], "tags.gptlab.sweep = 'true'")
    kept = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert kept == {"scaling.txt", "scaling.png"}
    kept_text = client.download_artifacts(parent.info.run_id, "scaling.txt", str(tmp_path))
    assert "compute multipliers against pos_emb=learned" in open(kept_text).read()


def test_scaling_input_it_cannot_fit_is_one_line(monkeypatch, capsys, tmp_path):
    rng = np.random.default_rng(2)
    two_sizes = [(c, loss) for c, loss in synthetic(1, 3, 0.002, rng) if c < 1e13]
    log_runs(store_uri(tmp_path), {"learned": two_sizes,
                                   "rope": synthetic(1.5, 1, 0.002, rng)})
    cases = [
        (["--by", "model.pos_emb", "--bootstrap", "0"],
         ["pos_emb=learned", "2 compute sizes", "at least 3"]),
        (["--by", "model.pos_emb", "--baseline", "pos_emb=alibi"], ["--baseline"]),
        (["--by", "model.pos_emb_", "--bootstrap", "0"], ["no run has model.pos_emb_"]),
    ]
    for args, words in cases:
        code, _, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main,
                           ["--experiment", "sizes", "--scaling", *args])
        one_line_error(code, err, *words)
    # one seed per size: intervals cannot be drawn, fits alone can
    client = MlflowClient(store_uri(tmp_path))
    exp = client.get_experiment_by_name("sizes").experiment_id
    for run in client.search_runs([exp], "params.`model.pos_emb` = 'learned'"):
        client.delete_run(run.info.run_id)
    code, _, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main,
                       ["--experiment", "sizes", "--scaling", "--by", "model.pos_emb"])
    one_line_error(code, err, "one seed at each size", "--bootstrap 0")
    code, out, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main,
                         ["--experiment", "sizes", "--scaling", "--by", "model.pos_emb",
                          "--bootstrap", "0"])
    assert code == 0 and "pos_emb=rope" in out, err
    # runs that did not finish are left out, and said so
    failed = client.create_run(exp, run_name="failed").info.run_id
    client.log_param(failed, "model.pos_emb", "rope")
    client.log_metric(failed, "val/loss", 0.5)  # far below the law: it would move the fit
    client.set_terminated(failed, "FAILED")
    code, again, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main,
                           ["--experiment", "sizes", "--scaling", "--by", "model.pos_emb",
                            "--bootstrap", "0"])
    assert code == 0 and again == out and "left out 1 runs that did not finish (1 FAILED)" \
        in err, err
    # nothing finished: nothing to fit
    only_failed = client.create_experiment("only_failed")
    client.set_terminated(client.create_run(only_failed).info.run_id, "FAILED")
    code, _, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main,
                       ["--experiment", "only_failed", "--scaling", "--bootstrap", "0"])
    one_line_error(code, err, "no finished runs to fit")
    # a finished run without compute recorded
    old = client.create_run(exp, run_name="old").info.run_id
    client.log_metric(old, "val/loss", 2.0)
    client.set_terminated(old)
    code, _, err = cli(monkeypatch, capsys, tmp_path, tmp_path, compare_cli.main,
                       ["--experiment", "sizes", "--scaling", "--by", "model.pos_emb",
                        "--bootstrap", "0"])
    one_line_error(code, err, "no compute recorded", "old")
