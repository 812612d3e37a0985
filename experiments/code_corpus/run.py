"""A real multi-document corpus every installation has: the Python sources of the project's
own environment (`.venv/lib/python*/site-packages/**/*.py`), with characters and with a
byte-level BPE of 4,096 tokens, 3 seeds each at equal training time.

The study is the tokenizer study's (experiments/tokenizers/run.py: a timing run of each
tokenizer fixes its steps so that each trains as long as the char run; val/bpc over the
same validation characters; mean +- std over seeds, Welch's t-test against char) on this
corpus. Before it, `gptlab-prepare` tokenizes the corpus once for each tokenizer (timed),
and corpus.json records what was read (files, bytes, the content digest, documents skipped
as not UTF-8) with the installed packages (packages.txt), so the study can be repeated.

    python experiments/code_corpus/run.py                    # prepare, time, 2 x 3 runs
    python experiments/code_corpus/run.py --base-steps 1000  # each run half as long
    python experiments/code_corpus/run.py --report-only

Writes corpus.json, packages.txt, results.md, results.json, val_bpc.png and samples.md
beside this file.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKENIZERS = {"char": [], "bpe4096": ["data.tokenizer=bpe", "data.vocab_size=4096"]}


def tokenizer_study():  # noqa: ANN201 - the module experiments/tokenizers/run.py
    spec = importlib.util.spec_from_file_location(
        "tokenizer_study", HERE.parent / "tokenizers" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def corpus_keys() -> list[str]:
    site = Path(sysconfig.get_paths()["purelib"])
    # a source file that is not UTF-8 (a test fixture of some package) is left out, counted
    return [f"data.path='{site}/**/*.py'", "data.on_bad_document=skip"]


def prepare(keys: list[str]) -> dict:
    """Tokenize the corpus once per tokenizer; what each prepare read and made."""
    out = {}
    for name, overrides in TOKENIZERS.items():
        t0 = time.perf_counter()
        res = subprocess.run([str(BIN / "gptlab-prepare"), *keys, *overrides],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr.strip().splitlines()[-1])
        folder = Path(res.stdout.split(" MB in ")[-1].split()[0])
        meta = json.loads((folder / "meta.json").read_text())
        out[name] = {"seconds": round(time.perf_counter() - t0, 1), "folder": folder.name,
                     "digest": meta["digest"], "vocab_size": _vocab(meta),
                     **{k: meta[k] for k in ("documents", "characters", "tokens")},
                     "skipped": meta["skipped"]}
        print(f"prepared {name}: {out[name]['seconds']} s, {out[name]['tokens']}", flush=True)
    return out


def _vocab(meta: dict) -> int:
    from gptlab.data import tokenizer

    return tokenizer.from_spec(meta["tokenizer"]["kind"], meta["tokenizer"]["spec"]).vocab_size


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    keys = corpus_keys()
    if "--report-only" not in argv and "-h" not in argv and "--help" not in argv:
        files = sorted(Path(sysconfig.get_paths()["purelib"]).glob("**/*.py"))
        prepared = prepare(keys)
        packages = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                                  text=True, check=True).stdout
        (HERE / "packages.txt").write_text(packages)
        (HERE / "corpus.json").write_text(json.dumps({
            "keys": keys, "files": len(files),
            "bytes": sum(f.stat().st_size for f in files), "python": sys.version.split()[0],
            "prepared": prepared}, indent=1) + "\n")
    study = tokenizer_study()
    study.main(argv, study.Study(
        experiment="code_corpus", tokenizers=TOKENIZERS, data=keys, out=HERE,
        command="python experiments/code_corpus/run.py"))


if __name__ == "__main__":
    main()
