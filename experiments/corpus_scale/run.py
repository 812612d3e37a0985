"""Corpora of 10 MB to 1 GB: preparing them (gptlab-prepare) against the bare libraries doing
the same encoding, then training on each, side by side in one run.

The corpora are Tiny Shakespeare repeated to each size (written once to --work). For each
size and tokenizer (characters; a byte-level BPE of 4,096 tokens):

- gptlab: `gptlab-prepare` into a fresh cache, under /usr/bin/time -v (wall time, peak
  resident memory);
- bare: the library alone, in its own process, doing the same work with no gptlab code:
  characters by a numpy lookup table (a pass for the vocabulary, a pass to encode), the BPE
  by Hugging Face `tokenizers` (trained on the same first 20 M characters, `encode_batch`
  over the text in pieces on every core), tokens written as uint16; order alternating.

Then, on each prepared corpus, a 200-step run of the CPU recipe's model (4x4x128, block 64)
through `gptlab-train`, against Tiny Shakespeare itself: the data set-up a second run pays
before its first step (a fresh process timing `CorpusDataModule.setup()`), the median step
time, and the run's peak resident memory. Last, a fresh cache shared by a 4-job parallel
sweep and by 2 data-parallel ranks: how many processes tokenized the corpus.

    python experiments/corpus_scale/run.py                      # 10 MB, 100 MB, 1 GB
    python experiments/corpus_scale/run.py --sizes 10 100 --steps 100

Writes results.md and results.json beside this file; the corpora and caches stay in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKENIZERS = {"char": ["data.tokenizer=char"],
              "bpe 4096": ["data.tokenizer=bpe", "data.vocab_size=4096"]}
SAMPLE_CHARS = 20_000_000  # data.tokenizer_sample_chars's default: the bare BPE trains on as many
PIECE = 1 << 16  # characters of text per piece given to encode_batch


def corpus_of(size_mb: int, source: Path, work: Path) -> Path:
    """Tiny Shakespeare repeated to `size_mb` MB (whole copies, the last one cut)."""
    path = work / f"tinyshakespeare-{size_mb}MB.txt"
    target = size_mb * 1_000_000
    if not path.is_file() or path.stat().st_size != target:
        text = source.read_bytes()
        with open(path, "wb") as f:
            written = 0
            while written < target:
                part = text[:target - written]
                f.write(part)
                written += len(part)
    return path


def own_memory_mb(pid: int) -> float:
    """The anonymous (the process's own, not the page cache's) resident memory of a process
    and its children."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
        except (OSError, StopIteration):
            pass
    return total / 1000


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak resident memory of a command (/usr/bin/time -v: all its resident
    pages, the page cache's it maps included), and its peak own memory (sampled every 0.1 s
    from /proc: anonymous pages only)."""
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdin=stdin, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import threading

    peak_own = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_own
        while not done.wait(0.1):
            peak_own = max(peak_own, own_memory_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    return {"seconds": wall, "peak_mb": rss_kb / 1000, "own_peak_mb": peak_own,
            "stdout": stdout, "stderr": stderr}


# ---- the bare libraries -------------------------------------------------------------------

def bare_char(path: Path, out: Path) -> None:
    import numpy as np

    def pieces():
        with open(path, encoding="utf-8") as f:
            while piece := f.read(1 << 24):
                yield np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)

    seen = np.zeros(0x110000, dtype=bool)
    for codes in pieces():
        seen[codes] = True
    lut = np.zeros(0x110000, dtype=np.uint16)
    lut[np.flatnonzero(seen)] = np.arange(int(seen.sum()))
    with open(out, "wb") as f:
        for codes in pieces():
            lut[codes].tofile(f)


def bare_bpe(path: Path, out: Path) -> None:
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(path, encoding="utf-8") as f:
        sample = f.read(SAMPLE_CHARS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sample], trainers.BpeTrainer(
        vocab_size=4096, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    del sample
    with open(path, encoding="utf-8") as f, open(out, "wb") as w:
        while block := f.read(1 << 23):
            texts = [block[i:i + PIECE] for i in range(0, len(block), PIECE)]
            for e in tok.encode_batch(texts):
                np.array(e.ids, dtype=np.uint16).tofile(w)


def setup_seconds(path: Path, tokenizer: str, cache: Path) -> None:
    """Print how long a run's data set-up takes (imports done)."""
    from gptlab.data.datamodule import CorpusDataModule

    kw = {"tokenizer": "bpe", "vocab_size": 4096} if tokenizer.startswith("bpe") else {}
    t0 = time.perf_counter()
    CorpusDataModule(path=str(path), cache_dir=str(cache), block_size=64, batch_size=12,
                   **kw).setup()
    print(f"setup {time.perf_counter() - t0:.3f}")


# ---- the measurements ---------------------------------------------------------------------

def prepare_both(path: Path, size: int, name: str, work: Path, bare_first: bool) -> dict:
    cache = work / f"cache-{size}MB-{name.replace(' ', '')}"
    shutil.rmtree(cache, ignore_errors=True)
    gptlab_cmd = [str(BIN / "gptlab-prepare"), f"data.path={path}",
                  f"data.cache_dir={cache}", *TOKENIZERS[name]]
    bare_out = work / "bare.bin"
    bare_cmd = [sys.executable, __file__, "--bare", name.split()[0], str(path), str(bare_out)]
    runs = {}
    for who in (["bare", "gptlab"] if bare_first else ["gptlab", "bare"]):
        runs[who] = timed(bare_cmd if who == "bare" else gptlab_cmd)
    bare_out.unlink(missing_ok=True)
    # the work itself, past each interpreter's imports: gptlab's own record of its prepare,
    # the bare script's own clock
    (meta,) = [json.loads(p.read_text()) for p in (cache / "corpora").glob("*/meta.json")]
    work_s = {"gptlab": meta["seconds"], "bare": float(runs["bare"]["stdout"].split()[-1])}
    out = {who: {"seconds": r["seconds"], "peak_mb": r["peak_mb"], "work_s": work_s[who],
                 "mb_per_s": size / work_s[who]} for who, r in runs.items()}
    out["ratio"] = out["gptlab"]["mb_per_s"] / out["bare"]["mb_per_s"]
    out["cache"] = str(cache)
    return out


def train_on(path: Path, name: str, cache: Path, steps: int) -> dict:
    from gptlab.tracking import store

    setup = subprocess.run([sys.executable, __file__, "--setup", name, str(path), str(cache)],
                           capture_output=True, text=True, check=True).stdout
    cmd = [str(BIN / "gptlab-train"), "experiment=shakespeare_char_cpu", f"data.path={path}",
           f"data.cache_dir={cache}", *TOKENIZERS[name], f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false",
           "callbacks.final_sample_tokens=0", "logger.experiment_name=corpus_scale"]
    r = timed(cmd)
    run_id = r["stdout"].split("MLflow run id: ")[1].split()[0]
    client = store.connect()
    tps = [m.value for m in client.get_metric_history(run_id, "tokens_per_sec")][1:]
    return {"setup_s": float(setup.split()[-1]), "peak_mb": r["peak_mb"],
            "own_peak_mb": r["own_peak_mb"],
            "ms_per_step": 1000 * 12 * 64 / statistics.median(tps), "run_id": run_id}


def gather_us(cache: Path, tokenizer: str, batches: int = 2000) -> dict:
    """Microseconds per batch (12 blocks of 65 tokens) gathered from the memory-mapped
    tokens against the same tokens in memory, as a tensor, by the same `get_batch`."""
    import numpy as np
    import torch

    from gptlab.data import prepared
    from gptlab.data.datamodule import get_batch

    (folder,) = [f for f in prepared.folders(cache) if json.loads(
        (f / "meta.json").read_text())["tokenizer"]["kind"] == tokenizer.split()[0]]
    mapped = prepared.open_folder(folder).train
    in_memory = torch.from_numpy(np.concatenate([np.asarray(s) for s in mapped.shards])
                                 .astype(np.int32))
    out = {}
    for name, data in (("memory-mapped", mapped), ("in memory", in_memory)):
        g = torch.Generator().manual_seed(0)
        get_batch(data, 64, 12, g)  # first touch
        t0 = time.perf_counter()
        for _ in range(batches):
            get_batch(data, 64, 12, g)
        out[name] = 1e6 * (time.perf_counter() - t0) / batches
    return out


def before_and_after(paths: dict[int, Path], old_src: Path, work: Path) -> dict:
    """A first run's data set-up (`CorpusDataModule(...).setup()` on a fresh cache) by the code
    in `old_src` (gptlab before prepared corpora) and by this code, in turn, where the old
    code fits in memory: characters up to 100 MB, the BPE at 10 MB (at 100 MB it took over
    10 minutes and 18.3 GB)."""
    out: dict = {}
    for size, path in paths.items():
        for name in TOKENIZERS:
            if size > (100 if name == "char" else 10):
                continue
            for who, pythonpath in (("before", str(old_src)), ("after", "")):
                cache = work / f"cache-setup-{who}"
                shutil.rmtree(cache, ignore_errors=True)
                env = dict(os.environ, PYTHONPATH=pythonpath)
                r = timed([sys.executable, __file__, "--setup", name, str(path), str(cache)],
                          env)
                out.setdefault(f"{size} MB", {}).setdefault(name, {})[who] = {
                    "setup_s": float(r["stdout"].split()[-1]), "peak_mb": r["peak_mb"]}
                print(f"{who}: {size} MB {name} {out[f'{size} MB'][name][who]}", flush=True)
    return out


def prepared_by(stderr: str) -> int:
    return stderr.count("gptlab: preparing ")


def shared_cache(path: Path, work: Path) -> dict:
    """A fresh cache under a 4-job parallel sweep, then under 2 data-parallel ranks."""
    out = {}
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "trainer.max_steps=20",
            "trainer.val_check_interval=20", "callbacks.final_sample_tokens=0",
            "trainer.enable_progress_bar=false", "logger.experiment_name=corpus_scale_shared",
            f"data.path={path}"]
    for what, args in (("4-job parallel sweep", ["-m", "hydra/launcher=parallel",
                                                 "hydra.launcher.n_jobs=4", "seed=1,2,3,4"]),
                       ("2 data-parallel ranks", ["trainer=ddp"])):
        cache, logs = work / f"cache-shared-{len(out)}", work / f"shared-{len(out)}"
        for folder in (cache, logs):
            shutil.rmtree(folder, ignore_errors=True)
        r = timed([str(BIN / "gptlab-train"), *args, *tiny, f"data.cache_dir={cache}",
                   f"hydra.run.dir={logs}", f"hydra.sweep.dir={logs}"])
        said = "".join(p.read_text(errors="replace") for p in logs.glob("**/*.log"))
        folders = [p for p in (cache / "corpora").iterdir() if (p / "meta.json").is_file()]
        out[what] = {"prepared_folders": len(folders), "tokenized_by": prepared_by(said),
                     "waited": said.count("gptlab: waiting for another process preparing"),
                     "seconds": r["seconds"]}
    return out


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   open("/proc/cpuinfo", encoding="utf-8") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(results: dict, steps: int) -> list[str]:
    lines = ["## Preparing", "",
             "Wall: the whole command, interpreter start-up included; MB/s: the work past "
             "the imports (gptlab's prepare as its meta.json records it; the bare script's "
             "own clock).", "",
             "| corpus | tokenizer | gptlab wall s | gptlab MB/s | gptlab peak MB | bare wall s "
             "| bare MB/s | bare peak MB | gptlab / bare MB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, per in results["prepare"].items():
        for name, r in per.items():
            g, b = r["gptlab"], r["bare"]
            lines.append(f"| {size} MB | {name} | {g['seconds']:.1f} | {g['mb_per_s']:.1f} | "
                         f"{g['peak_mb']:,.0f} | {b['seconds']:.1f} | {b['mb_per_s']:.1f} | "
                         f"{b['peak_mb']:,.0f} | {r['ratio']:.2f}x |")
    lines += ["", f"## Training ({steps} steps, the CPU recipe's model)", "",
              "Peak MB: all resident pages (/usr/bin/time), the page cache's that the memory "
              "map touched included; own MB: anonymous pages only (sampled every 0.1 s).", "",
              "| corpus | tokenizer | data set-up of a later run, s | ms/step (median) | "
              "peak MB | own peak MB | µs/batch memory-mapped | µs/batch in memory |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, per in results["train"].items():
        for name, r in per.items():
            g = r["gather_us"]
            lines.append(f"| {size} | {name} | {r['setup_s']:.3f} | {r['ms_per_step']:.1f} | "
                         f"{r['peak_mb']:,.0f} | {r.get('own_peak_mb', 0):,.0f} | "
                         f"{g['memory-mapped']:.0f} | {g['in memory']:.0f} |")
    if results.get("shared"):
        lines += ["", "## A fresh cache shared by many processes (100 MB or the largest "
                  "size below it)", "",
                  "| processes | prepared folders | processes that tokenized |", "|---|---:|---:|"]
        for what, r in results["shared"].items():
            lines.append(f"| {what} | {r['prepared_folders']} | {r['tokenized_by']} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], metavar="MB")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptlab-corpus-scale"))
    ap.add_argument("--corpus", type=Path, default=os.environ.get("GPTLAB_DATA"),
                    help="Tiny Shakespeare (default: $GPTLAB_DATA)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--before", type=Path, metavar="OLD_SRC",
                    help="only compare a first run's data set-up with the code in OLD_SRC "
                         "(the src/ of a checkout of gptlab before prepared corpora)")
    ap.add_argument("--train-only", action="store_true",
                    help="keep the preparing figures of results.json (and the caches in "
                         "--work); measure the training again")
    ap.add_argument("--bare", nargs=3, metavar=("KIND", "TEXT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--setup", nargs=3, metavar=("KIND", "TEXT", "CACHE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare:
        kind, text, out = args.bare
        t0 = time.perf_counter()
        (bare_char if kind == "char" else bare_bpe)(Path(text), Path(out))
        print(f"seconds {time.perf_counter() - t0:.3f}")
        return
    if args.setup:
        setup_seconds(Path(args.setup[1]), args.setup[0], Path(args.setup[2]))
        return
    if not args.corpus:
        raise SystemExit("set GPTLAB_DATA or --corpus to Tiny Shakespeare's input.txt")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "command": " ".join(["python", *sys.argv]),
                     "prepare": {}, "train": {}}
    paths = {size: corpus_of(size, Path(args.corpus), args.work) for size in args.sizes}
    if args.before:
        before = before_and_after(paths, args.before.resolve(), args.work)
        (HERE / "before.json").write_text(json.dumps(
            {"machine": machine(), "command": " ".join(["python", *sys.argv]),
             "setup": before}, indent=1) + "\n")
        return
    if args.train_only:
        earlier = json.loads((HERE / "results.json").read_text())
        results["prepare"] = {int(k): v for k, v in earlier["prepare"].items()}
        results["command"] = earlier["command"] + " (training: " + results["command"] + ")"
    for i, (size, path) in enumerate(paths.items() if not args.train_only else []):
        results["prepare"][size] = {}
        for j, name in enumerate(TOKENIZERS):
            r = prepare_both(path, size, name, args.work, bare_first=(i + j) % 2 == 1)
            results["prepare"][size][name] = r
            print(f"{size} MB {name}: gptlab {r['gptlab']['seconds']:.1f} s "
                  f"{r['gptlab']['peak_mb']:,.0f} MB, bare {r['bare']['seconds']:.1f} s "
                  f"{r['bare']['peak_mb']:,.0f} MB, ratio {r['ratio']:.2f}", flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_train:
        ts_cache = args.work / "cache-tinyshakespeare"
        for label, path in [("Tiny Shakespeare (1.1 MB)", Path(args.corpus))] + [
                (f"{size} MB", p) for size, p in paths.items()]:
            results["train"][label] = {}
            for name in TOKENIZERS:
                size = next((s for s, p in paths.items() if p == path), None)
                cache = (Path(results["prepare"][size][name]["cache"]) if size else ts_cache)
                r = train_on(path, name, cache, args.steps)
                r["gather_us"] = gather_us(cache, name)
                results["train"][label][name] = r
                print(f"train {label} {name}: set-up {r['setup_s']:.3f} s, "
                      f"{r['ms_per_step']:.1f} ms/step, {r['peak_mb']:,.0f} MB", flush=True)
        shared = max((s for s in paths if s <= 100), default=None)
        if shared is not None:
            results["shared"] = shared_cache(paths[shared], args.work)
            print(json.dumps(results["shared"]), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "results.md").write_text("\n".join(
        [f"`{results['command']}` on {results['machine']}", "", *table(results, args.steps)])
        + "\n")
    print("\n".join(table(results, args.steps)))


if __name__ == "__main__":
    main()
