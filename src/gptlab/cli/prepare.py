"""gptlab-prepare: tokenize a corpus into the shared cache once, before any run trains on it
(a cluster's login node, a batch job ahead of a sweep), with the same `data.*` keys and
`experiment=` files a run takes; trains nothing and records no run.

    gptlab-prepare data.path=corpus/ data.tokenizer=bpe data.vocab_size=4096
    gptlab-prepare experiment=shakespeare_char_cpu --verify
    gptlab-prepare data.hf_dataset=roneneldan/TinyStories data.val_docs=2000
    gptlab-prepare --list                     # what the cache holds

A run with the same keys then finds the prepared files without reading the corpus.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gptlab.console import log
from gptlab.errors import exit_on_error


def _say_progress() -> None:
    """gptlab's log lines (the progress of the prepare, a notice) on stderr, as a run's
    console shows them."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def summary(prep) -> str:
    m = prep.meta
    size = sum((prep.folder / sh["file"]).stat().st_size
               for split in m["shards"].values() for sh in split)
    rows = [("", "train", "val")] + [
        (what, f"{m[what]['train']:,}", f"{m[what]['val']:,}")
        for what in ("documents", "characters", "tokens")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    table = "\n".join(f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}"
                      for r in rows)
    skipped = f", {len(m['skipped'])} bad documents skipped" if m.get("skipped") else ""
    return (f"{m['source']}\n  tokenizer {m['tokenizer']['kind']}, vocabulary of "
            f"{prep.tokenizer.vocab_size:,}, {m['dtype']}; split by {m['split'][0]}{skipped}\n"
            f"{table}\n  digest {m['digest'][:16]}, {size / 1e6:,.1f} MB in {prep.folder}")


def list_cache(cache_dir: Path) -> None:
    import json

    from gptlab.data import prepared

    found = list(prepared.folders(cache_dir))
    if not found:
        print(f"no prepared corpora in {prepared.corpora_dir(cache_dir)}")
    for folder in found:
        m = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        tokens = m["tokens"]["train"] + m["tokens"]["val"]
        print(f"{folder.name}  {m['tokenizer']['kind']:<4}  {tokens:>14,} tokens  "
              f"{m['source']}")


@exit_on_error
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="gptlab-prepare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="OVERRIDES are Hydra overrides of the training config, as gptlab-train takes "
               "them; only data.* (and experiment=, data=) decide the prepared tokens. "
               "The cache is data.cache_dir, default ~/.cache/gptlab (or $XDG_CACHE_HOME).")
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                    help="e.g. data.path=corpus/ data.tokenizer=bpe data.vocab_size=4096")
    ap.add_argument("--verify", action="store_true",
                    help="check every token file's checksum (prepared now or before)")
    ap.add_argument("--list", action="store_true", help="list the prepared corpora in the cache")
    args = ap.parse_args(argv)
    _say_progress()

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gptlab import CONF_DIR
    from gptlab.data import prepared
    from gptlab.data.corpus import default_cache_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(args.overrides))
    cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    if args.list:
        list_cache(cache)
        return
    dm = instantiate(cfg.data)
    prep = dm.prepare()
    if args.verify:
        prep = prepared.verify(prep.folder)
    print(summary(prep) + ("\n  every token file matches its checksum" if args.verify else ""))


if __name__ == "__main__":
    main()
