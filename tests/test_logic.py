"""Pure logic, in process and fast: schedules, the resume policy, sweep names, compare's
columns, checkpoint reading, one-line error messages, config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from gptlab import CONF_DIR
from gptlab.cli import compare
from gptlab.errors import GptlabError, StopRequested, describe, exit_code, hydra_message
from gptlab.models import checkpoints
from gptlab.run import checks
from gptlab.run.resume import RESUME_SAFE, may_change_on_resume, resume_overrides
from gptlab.run.schedule import LRSchedule, Steps
from gptlab.sweeps import multirun
from gptlab.tracking import comparison
from gptlab.tracking.recorder import RunLogger


def train_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# --- schedules --------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays_to_min_lr():
    s = LRSchedule("cosine", lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert s(0) == pytest.approx(1 / 11)
    assert s(9) == pytest.approx(10 / 11)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx((1e-4 + 0.5 * 9e-4) / 1e-3)  # half way down the cosine
    assert s(110) == s(5000) == pytest.approx(0.1)  # then it stays at min_lr
    assert all(s(t) >= s(t + 1) for t in range(10, 200))
    assert LRSchedule("constant", 1e-3, 1e-4, 10, 110)(0) == 1.0


def test_unknown_lr_schedule_is_refused():
    with pytest.raises(GptlabError, match="optim.schedule"):
        LRSchedule("linear", 1e-3, 1e-4, 10, 100)


def test_step_schedule_is_a_function_of_the_global_step():
    steps = Steps(max_steps=25, val_every=10, log_every=3, checkpoint_every=4)
    assert steps.validation_steps() == [10, 20, 25]  # and always the last step
    assert [s for s in range(1, 26) if steps.checkpoints(s)] == [4, 8, 10, 12, 16, 20, 24, 25]
    assert [s for s in range(0, 26) if steps.logs(s)] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert not Steps(20, 10).checkpoints(5)


# --- the resume policy ------------------------------------------------------------------------

def test_resume_applies_safe_overrides_and_names_the_refused_ones():
    logged = train_cfg("trainer.max_steps=100")
    cfg = train_cfg("trainer.max_steps=300", "model.n_layer=2", "optim.lr=3e-3",
                    "checkpoint.every_n_steps=7", "logger.experiment_name=x")
    overrides = ["resume=abc", "trainer.max_steps=300", "model.n_layer=2", "optim.lr=3e-3",
                 "checkpoint.every_n_steps=7", "logger.experiment_name=x"]
    changed, refused = resume_overrides(overrides, cfg, logged)
    assert changed == ["trainer.max_steps=300", "checkpoint.every_n_steps=7",
                       "logger.experiment_name=x"]
    assert refused == ["model.n_layer", "optim.lr"]
    assert logged.trainer.max_steps == 300 and logged.checkpoint.every_n_steps == 7
    assert logged.model.n_layer == 4  # refused: untouched


def test_resume_ignores_overrides_that_change_nothing():
    logged = train_cfg()
    changed, refused = resume_overrides(["model.n_layer=4", "seed=1337"], train_cfg(), logged)
    assert changed == [] and refused == []


def test_resume_safe_keys_never_include_what_is_trained():
    # data.cache_dir says where downloads and trained tokenizers are kept, not what trains
    # (a resumed run takes its tokenizer from its checkpoint); data.pin_memory how batches
    # reach the device
    assert not any(k.startswith(("model.", "data.", "optim.", "seed")) for k in RESUME_SAFE
                   if k not in ("data.cache_dir", "data.pin_memory"))
    assert not may_change_on_resume("data.path")
    assert may_change_on_resume("trainer.max_steps") and may_change_on_resume("logger.x")


# --- sweeps -----------------------------------------------------------------------------------

def test_sweep_child_names_come_from_the_varied_values():
    overrides = ["model=gpt", "optim.lr=0.003", "trainer.max_steps=20", "+callbacks.x.y=1"]
    assert multirun.child_name(["model", "optim.lr"], overrides) == "gpt lr=0.003"
    assert multirun.child_name(["data.block_size"], overrides) is None


def test_sweep_varied_keys_from_overrides_and_search_space():
    cfg = OmegaConf.create({"hydra": {
        "overrides": {"task": ["optim.lr=1e-3,3e-3", "model.n_layer=2", "seed=range(0,3)"]},
        "sweeper": {"params": {"model.dropout": "interval(0, 0.3)", "optim.lr": "x"}}}})
    assert multirun.varied_keys(cfg) == ["optim.lr", "seed", "model.dropout"]


# --- compare ----------------------------------------------------------------------------------

class _Run:
    def __init__(self, params):
        self.data = type("D", (), {"params": params})()


def test_compare_shows_only_params_that_differ_and_what_was_trained():
    runs = [_Run({"optim.lr": "0.001", "model.n_layer": "4", "logger.run_name": "a",
                  "data.path": "/x"}),
            _Run({"optim.lr": "0.003", "model.n_layer": "4", "logger.run_name": "b",
                  "data.path": "/y"})]
    assert comparison.differing_params(runs) == ["optim.lr"]


def test_plot_path_is_checked_before_anything_is_printed(tmp_path):
    with pytest.raises(GptlabError, match="does not exist"):
        compare.check_plot_path(str(tmp_path / "nope" / "c.png"))
    with pytest.raises(GptlabError, match="must end in"):
        compare.check_plot_path(str(tmp_path / "c.txt"))
    compare.check_plot_path(str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()  # the check leaves nothing behind


# --- the logger's resume de-duplication -------------------------------------------------------

class _FakeRecorder:
    client, run_id = None, "r"

    def __init__(self):
        self.batches = []

    def metrics(self, metrics):
        if metrics:
            self.batches.append(metrics)


def test_logger_skips_steps_already_recorded():
    rec = _FakeRecorder()
    logger = RunLogger(rec, flush_secs=1e9, recorded={"train/loss": 12, "val/loss": 10})
    for step in (11, 12, 13):
        logger.log_metrics({"train/loss": float(step), "lr": 0.1}, step=step)
    logger.log_metrics({"val/loss": 2.0, "epoch": 0}, step=10)
    logger.flush()
    points = [(m.key, m.step) for batch in rec.batches for m in batch]
    assert points == [("lr", 11), ("lr", 12), ("train/loss", 13), ("lr", 13)]


# --- checkpoints ------------------------------------------------------------------------------

class Opaque:
    """An object a checkpoint could smuggle in: loading it would run this module's code."""


def test_checkpoint_names_sort_by_step():
    names = ["best.ckpt", "step_000100.ckpt", "step_000020.ckpt", "step_1000000.ckpt", "x"]
    assert checkpoints.step_names(names) == ["step_000020.ckpt", "step_000100.ckpt",
                                             "step_1000000.ckpt"]
    assert checkpoints.step_of("step_000020.ckpt") == 20 and checkpoints.step_of("x") is None


@pytest.mark.parametrize("content, words", [
    (b"hello, not a checkpoint", "not a PyTorch checkpoint file"),
    ("truncated", "incomplete or damaged"),
    ({"state_dict": {}}, "not a gptlab checkpoint"),
    ({"gptlab": {"model_class": "x"}, "state_dict": {}}, "not a gptlab checkpoint"),
    ({"gptlab": {"step": 1, "code": Opaque()}, "state_dict": {}}, "Python objects"),
])
def test_unreadable_checkpoints_say_why_and_never_suggest_unsafe_loading(tmp_path, content,
                                                                          words):
    path = tmp_path / "c.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save(content, path)
    with pytest.raises(GptlabError) as e:
        checkpoints.read_checkpoint(path)
    assert words in str(e.value)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


# --- one-line errors --------------------------------------------------------------------------

def test_hydra_reports_become_one_line():
    e = ConfigCompositionException("Could not override 'optim.lrr'.\nTo append to your "
                                   "config use +optim.lrr=1")
    assert hydra_message(e) == ("Could not override 'optim.lrr'. (to append to your config "
                                "use +optim.lrr=1)")
    missing = MissingConfigException(
        "In 'train': Could not find 'model/nope'\n\nAvailable options in 'model':\n"
        "\tbigram\n\tgpt\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf",
        missing_cfg_file="model/nope")
    assert hydra_message(missing) == "Could not find 'model/nope' (choices: bigram, gpt)"


def test_exit_codes_and_descriptions():
    assert exit_code(GptlabError("x")) == 2
    assert exit_code(StopRequested(15)) == 143 and exit_code(KeyboardInterrupt()) == 130
    assert exit_code(RuntimeError("bug")) == 1
    assert exit_code(OSError(28, "No space left on device")) == 2
    assert describe(OSError(28, "No space left on device", "/x/y")) == \
        "No space left on device: /x/y"
    wrapped = RuntimeError("instantiate failed")
    wrapped.__cause__ = GptlabError("the real reason")
    assert describe(wrapped) == "the real reason"


# --- config checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("optim.lr=nan", "optim.lr must be a finite number > 0"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=", "optim.lr"),
    ("optim.min_lr=0.1", "optim.min_lr must be a finite number in [0, 0.001]"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.val_check_interval=0.5", "whole number of steps"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("seed=abc", "seed must be an integer"),
    ("data.block_size=abc", "data.block_size must be a positive integer"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("callbacks.sample.temperature=nan", "temperature"),
    ("logger.outage_timeout=0", "logger.outage_timeout"),
])
def test_config_checks_name_the_key(override, words):
    with pytest.raises(GptlabError) as e:
        checks.check_train_config(train_cfg(override))
    assert words in str(e.value)


def test_the_default_config_passes_its_checks():
    checks.check_train_config(train_cfg())
    checks.check_train_config(train_cfg("experiment=bigram"))


# --- groups and statistics in gptlab-compare ----------------------------------------------------

def stats_row(name: str, lr: str, seed: str, best: float, curve=()) -> dict:
    return {"run": name, "best val/loss": best, "final val/loss": best + 0.1,
            "tokens/s": 1000.0, "ms/step": 10.0, "_params": {"optim.lr": lr, "seed": seed},
            "_curve": list(curve)}


def test_groups_of_repeated_runs_with_interval_and_welch_p():
    rows = [stats_row(f"r{i}", "0.001", str(i), v) for i, v in enumerate((1.0, 2.0, 3.0))]
    rows += [stats_row(f"s{i}", "0.003", str(i), v) for i, v in enumerate((4.0, 5.0, 6.0))]
    table = comparison.groups(rows, ["optim.lr"], baseline="lr=0.001")
    base, other = table
    assert (base["group"], base["runs"], base["best val/loss"], base["best std"]) == \
        ("lr=0.001", 3, 2.0, 1.0)
    # t(0.975, 2) = 4.303: half-width 4.303 * 1 / sqrt(3)
    assert base["95% CI +-"] == pytest.approx(4.3027 / 3 ** 0.5, abs=1e-3)
    # Welch: t = -3 / sqrt(1/3 + 1/3) = -3.674 on 4 degrees of freedom
    assert other["diff"] == 3.0 and other["p (Welch)"] == pytest.approx(0.02131, abs=1e-4)
    assert base["diff"] == 0.0 and base["p (Welch)"] != base["p (Welch)"]  # nan


def test_the_baseline_is_named_with_keys_as_by_takes_them_or_as_the_table_shows_them():
    rows = [stats_row(f"r{i}", lr, str(i), v) for i, (lr, v) in
            enumerate((("0.001", 1.0), ("0.001", 2.0), ("0.003", 4.0), ("0.003", 5.0)))]
    for baseline in ("optim.lr=0.001", "lr=0.001"):
        table = {g["group"]: g for g in comparison.groups(rows, ["optim.lr"], baseline)}
        assert table["lr=0.001"]["diff"] == 0.0 and table["lr=0.003"]["diff"] == 3.0
    rows = [{**r, "_params": {**r["_params"], "model.pos_emb": "rope"}} for r in rows]
    table = comparison.groups(rows, ["optim.lr", "model.pos_emb"],
                              "optim.lr=0.003 model.pos_emb=rope")
    assert {g["group"]: g["diff"] for g in table} == {"lr=0.001 pos_emb=rope": -3.0,
                                                     "lr=0.003 pos_emb=rope": 0.0}
    with pytest.raises(GptlabError, match="names no group"):
        comparison.groups(rows, ["optim.lr"], "optim.lr=0.1")


def test_group_bad_input():
    rows = [stats_row("a", "0.001", "0", 1.0)]
    with pytest.raises(GptlabError, match="names no group.*lr=0.001"):
        comparison.groups(rows, ["optim.lr"], baseline="lr=0.1")

    class R:
        data = type("D", (), {"params": {"optim.lr": "0.001"}})()

    with pytest.raises(GptlabError, match="no run has model.pos_emb"):
        comparison.group_keys([R()], ["model.pos_emb"])


def test_a_groups_mean_curve_keeps_the_steps_every_run_has():
    steps, means, stds = comparison.mean_curve([[(10, 2.0), (20, 1.0)],
                                                [(10, 4.0), (20, 3.0), (30, 0.5)]])
    assert steps == [10, 20] and means == [3.0, 2.0]
    assert stds == pytest.approx([2 ** 0.5, 2 ** 0.5])


def experiment_names() -> list[str]:
    root = Path(CONF_DIR) / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not p.name.startswith("_"))


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_composes_and_passes_the_checks(name):
    # a recipe a user can name must not fail on its own config; GPU recipes are checked
    # with the CPU trainer on a machine without one
    overrides = [f"experiment={name}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        if cfg.trainer.accelerator != "cpu" and not torch.cuda.is_available():
            cfg = compose("train", overrides=[*overrides, "trainer.accelerator=cpu",
                                              "trainer.precision=32-true"])
    checks.check_train_config(cfg)
