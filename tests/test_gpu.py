"""The GPU path (`trainer=gpu`: bf16 autocast, fused AdamW, pinned batches; `model.compile`).
These run where a CUDA device is present and are skipped elsewhere."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, run_cli, store_uri
from gptlab.models.gpt import GPT
from gptlab.run.lit_module import LitLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("compile_model", ["false", "true"])
def test_gpu_training_records_a_run_that_samples_on_cpu(tmp_path, small_corpus, compile_model):
    res = run_cli("gptlab-train", [*TINY_GPT, "trainer=gpu", f"model.compile={compile_model}",
                                   "logger.experiment_name=gpu"], tmp_path, small_corpus,
                  timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = res.stdout.split("MLflow run id: ")[1].split()[0]
    client = MlflowClient(store_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.precision"] == "bf16-mixed"
    val = [m.value for m in client.get_metric_history(run_id, "val/loss")]
    assert len(val) == 2 and all(math.isfinite(v) for v in val)
    # a checkpoint written on the GPU (compiled or not) loads and samples on the CPU
    res = run_cli("gptlab-sample", [f"run_id={run_id}", "max_new_tokens=20"], tmp_path,
                  small_corpus)
    assert res.returncode == 0, res.stderr[-2000:]


def test_adamw_is_fused_on_gpu():
    lit = LitLM(GPT(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8)).cuda()
    assert lit.configure_optimizers()["optimizer"].defaults["fused"]


@pytest.mark.parametrize("window", ["half", "slide"])
def test_kv_cache_gives_the_same_tokens_on_gpu(window):
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16).cuda().eval()
    prompt = torch.randint(11, (2, 3), device="cuda")
    outs = []
    for kv_cache in (True, False):
        generator = torch.Generator(device="cuda").manual_seed(3)
        outs.append(model.generate(prompt, 40, kv_cache=kv_cache, window=window,
                                   generator=generator))
    assert torch.equal(*outs)
