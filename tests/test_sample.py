"""gptlab-sample as a user types it: any prompt exactly as the shell hands it (outside Hydra's
override grammar, as gptlab-eval's text and name are; every other key keeps the grammar),
text printed as it is made, Ctrl-C keeping what was printed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import BIN, cli_env, copy_run, one_line_error, wait_until
from gptlab import CONF_DIR
from gptlab.cli import evaluate as eval_cli
from gptlab.cli import sample as sample_cli
from gptlab.overrides import free_text

pytestmark = pytest.mark.usefixtures("one_thread")

HOSTILE = [
    'Hello ☃ world, "quoted" [x]', "", "a=b,c", "it's", "'", "''", "\\", "ends in \\",
    "\\'", "\\\\'", "${oc.env:HOME}", "\\${x}", "\\\\${x}", "${", "$", "{x}", "[1, 2]",
    "key=value", "null", "1", "true", "  spaced  ", "tab\there\nnew line", "x}\\", "é ✓ 日本",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_free_text_composes_back_exactly(text):
    with initialize_config_dir(f"{CONF_DIR}/sample", version_base="1.3"):
        cfg = compose("sample", overrides=free_text(
            [f"prompt={text}", "max_new_tokens=5", "top_k=3"], sample_cli.FREE_TEXT))
    assert cfg.prompt == text
    # every other key keeps Hydra's grammar and types
    assert cfg.max_new_tokens == 5 and cfg.top_k == 3


def sample(monkeypatch, capsys, tiny_run, *args: str) -> tuple[int, str, str]:
    from conftest import cli

    tmp, run_id = tiny_run
    return cli(monkeypatch, capsys, tmp, tmp, sample_cli.main,
               [f"run_id={run_id}", "max_new_tokens=12", "seed=3", *args])


def test_a_prompt_is_sampled_exactly_as_typed(monkeypatch, capsys, tiny_run):
    # a comma (a sweep to Hydra), quotes and `?` (its quoted strings and grammar)
    prompt = "O Romeo, Romeo! wherefore art thou Romeo?' she said"
    code, out, err = sample(monkeypatch, capsys, tiny_run, f"prompt={prompt}")
    assert code == 0, err
    assert out.startswith(prompt) and len(out) == len(prompt) + 12 + 1
    # characters the model never saw reach it as typed, and are named
    code, _, err = sample(monkeypatch, capsys, tiny_run, 'prompt=Hello ☃ world, "quoted" [x]')
    one_line_error(code, err, "not in the vocabulary", "'☃\"[]'")


def test_an_empty_prompt_starts_a_new_text(monkeypatch, capsys, tiny_run):
    code, out, err = sample(monkeypatch, capsys, tiny_run, "prompt=")
    assert code == 0, err
    assert len(out) == 12 + 1  # the text made, and print's newline; nothing of a prompt


def test_a_prompt_from_a_file_or_standard_input(monkeypatch, capsys, tiny_run, tmp_path):
    prompt = "ROMEO:\nNow is the winter,\n'tis said;\n"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    code, typed, err = sample(monkeypatch, capsys, tiny_run, f"prompt={prompt}")
    assert code == 0, err
    assert typed.startswith(prompt)
    code, out, err = sample(monkeypatch, capsys, tiny_run, f"prompt_file={tmp_path}/prompt.txt")
    assert code == 0, err
    assert out == typed  # the same prompt and seed: the same text
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt.encode())))
    code, out, err = sample(monkeypatch, capsys, tiny_run, "prompt_file=-")
    assert code == 0, err
    assert out == typed


def test_bad_prompt_input_is_one_line(monkeypatch, capsys, tiny_run, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Roméo".encode("latin-1"))
    cases = [
        (["prompt=ROMEO:", f"prompt_file={tmp_path}/prompt.txt"], ["prompt=", "prompt_file="]),
        ([f"prompt_file={tmp_path}/missing.txt"], ["not found", "missing.txt"]),
        ([f"prompt_file={tmp_path}/latin1.txt"], ["latin1.txt", "not UTF-8"]),
    ]
    for args, words in cases:
        code, _, err = sample(monkeypatch, capsys, tiny_run, *args)
        one_line_error(code, err, *words)


def test_eval_takes_its_text_and_name_as_typed_and_from_standard_input(
        monkeypatch, capsys, tmp_path, tiny_run, small_corpus):
    from conftest import cli

    tmp, run_id = copy_run(tiny_run, tmp_path)  # gptlab-eval records on the run
    text = small_corpus.read_text(encoding="utf-8")[:400]
    (tmp / "held out, [1].txt").write_text(text, encoding="utf-8")
    code, by_file, err = cli(monkeypatch, capsys, tmp, tmp, eval_cli.main,
                             [f"run_id={run_id}", f"text={tmp}/held out, [1].txt",
                              "name=held, out"])
    assert code == 0, err
    assert by_file.startswith("eval/held__out/bpc = ")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, by_stdin, err = cli(monkeypatch, capsys, tmp, tmp, eval_cli.main,
                              [f"run_id={run_id}", "text=-"])
    assert code == 0, err
    assert by_stdin.replace("eval/stdin/", "eval/held__out/") == by_file


def test_a_long_sample_is_printed_as_it_is_made_and_ctrl_c_keeps_it(tiny_run):
    tmp, run_id = tiny_run
    proc = subprocess.Popen(
        [str(BIN / "gptlab-sample"), f"run_id={run_id}", "prompt=ROMEO:",
         "max_new_tokens=1000000000"], cwd=tmp, env=cli_env(tmp, tmp),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        printed = bytearray()

        def grown() -> bool:
            printed.extend(proc.stdout.read() or b"")
            assert proc.poll() is None, proc.stderr.read().decode()
            return len(printed) > 2000

        wait_until(grown, 120, "the sample to be printed while it is made", poll=0.1)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
        printed.extend(proc.stdout.read() or b"")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read().decode()
    assert code == 130, err
    assert printed.startswith(b"ROMEO:") and printed.endswith(b"\n")
    assert "stopped after" in err and "Traceback" not in err
