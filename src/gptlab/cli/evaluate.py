"""gptlab-eval: bits per character of a run's model over any UTF-8 text.

    gptlab-eval run_id=<id> text=held_out.txt
    gptlab-eval checkpoint=path/to/step_002000.ckpt text=held_out.txt stride=16

The text is read in windows of the model's block size (gptlab/data/windows.py): every token but
the first is scored once, with at least block_size - stride tokens of context. The result is
printed and, for a run, recorded on it as `eval/<name>/bpc` at the checkpoint's step, so runs
compare on the user's own held-out text. torch and MLflow are imported when scoring starts.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab import CONF_DIR
from gptlab.errors import GptlabError, after_hydra, exit_on_error
from gptlab.files import read_text
from gptlab.overrides import free_text

# keys taken exactly as typed, outside Hydra's grammar (gptlab/overrides.py)
FREE_TEXT = ("text", "name")


@dataclass
class Score:
    bpc: float
    chars: int  # the characters scored (the first token's aside)
    tokens: int  # the tokens scored


def read_scored_text(path: str) -> str:
    """The text to score: a UTF-8 file, or standard input for `-`."""
    text = read_text(path)
    if not text:
        raise GptlabError(f"{'standard input' if path == '-' else path} is empty: "
                          "nothing to score")
    return text


def metric_name(path: str, name: str | None) -> str:
    """`eval/<name>/bpc`, the name made of what MLflow allows in a metric's name."""
    stem = name or ("stdin" if path == "-" else Path(path).stem)
    return f"eval/{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}/bpc"


def bits_per_char(model, tok, text: str, stride: int, batch_size: int, device: str,
                  progress: bool = True) -> Score:
    """The model's bits per character over `text`."""
    import torch
    from tqdm import tqdm

    from gptlab.data.windows import score_windows, summed_cross_entropy

    block_size = model.block_size
    ids = tok.encode(text)  # a char vocabulary names the characters it lacks
    if len(ids) < block_size + 1:
        raise GptlabError(f"the text is {len(ids)} tokens long, shorter than one window of "
                          f"the model's block size + 1 ({block_size + 1})")
    x, y = score_windows(ids, block_size, stride)
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in tqdm(range(0, len(x), batch_size), desc="scoring", unit="batch",
                      disable=not progress, file=sys.stderr):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            s, n = summed_cross_entropy(model(xb), yb)
            total, count = total + s.item(), count + int(n.item())
    chars = len(text) - len(tok.decode(ids[:1]))  # the first token is context only
    return Score(total / chars / math.log(2), chars, count)


def check_eval_config(cfg: DictConfig) -> None:
    from gptlab.cli.sample import check_device
    from gptlab.run import checks

    if cfg.stride is not None:
        checks.integer(cfg, "stride")
    checks.integer(cfg, "batch_size")
    check_device(str(cfg.device))


def evaluate(cfg: DictConfig) -> Score:
    from gptlab.cli.sample import open_checkpoint
    from gptlab.data import tokenizer as tokenizers
    from gptlab.models import checkpoints

    check_eval_config(cfg)
    text = read_scored_text(str(cfg.text))
    name = metric_name(str(cfg.text), cfg.name)
    ckpt, run, client = open_checkpoint(cfg, "gptlab-eval")
    info = ckpt["gptlab"]
    tok = tokenizers.from_checkpoint(info)
    model = checkpoints.model_from_checkpoint(ckpt).to(cfg.device)
    stride = cfg.stride or max(1, model.block_size // 2)
    if stride > model.block_size:
        raise GptlabError(f"stride={stride} is more than the model's block size "
                          f"({model.block_size})")
    score = bits_per_char(model, tok, text, stride, cfg.batch_size, str(cfg.device))
    print(f"{name} = {score.bpc:.4f} bits per character ({score.chars:,} characters, "
          f"{score.tokens:,} tokens, stride {stride})")
    if run is not None:
        client.log_metric(run.info.run_id, name, score.bpc, step=int(info["step"]))
        print(f"recorded on run {run.info.run_id} as {name}", file=sys.stderr)
    return score


@hydra.main(config_path=f"{CONF_DIR}/eval", config_name="eval", version_base="1.3")
@after_hydra
def _task(cfg: DictConfig) -> None:
    evaluate(cfg)


@exit_on_error
def main() -> None:
    sys.argv[1:] = free_text(sys.argv[1:], FREE_TEXT)
    _task()
    _task.reraise()


if __name__ == "__main__":
    main()
