"""A token dataset from text already on this machine, large enough that a benchmark never
repeats it (``bench --float8-check`` needs steps x tokens per step: 3.3M tokens for 200
steps of the ~0.95B config, where the embedded corpus has 129k).

    python3 -m bench.corpus OUT_DIR [--roots DIR ...] [--max-mb 40] [--vocab-size 32000]

Nothing is downloaded: the text is the source and documentation files (.py, .rst, .md, .txt)
under ``--roots``, by default Python's standard library and the installed torch package, read in
sorted order, one document per file, until ``--max-mb`` of text. They are written as
``OUT_DIR/raw/corpus.jsonl`` and tokenized by ``orchestrator preprocess``'s own code (a
byte-level BPE trained on them) into ``OUT_DIR/data``, the directory ``data.path`` takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

SUFFIXES = (".py", ".rst", ".md", ".txt")


def default_roots() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    try:
        import torch

        roots.append(Path(torch.__file__).parent)
    except ImportError:
        pass
    return roots


def collect(roots: list[Path], max_bytes: int) -> tuple[list[str], list[str]]:
    """(documents, their paths): UTF-8 text files under ``roots``, sorted, up to ``max_bytes``."""
    docs, paths, total = [], [], 0
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.suffix in SUFFIXES and p.is_file()):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # not text, or unreadable: not part of the corpus
            if not text.strip():
                continue
            docs.append(text)
            paths.append(str(path))
            total += len(text.encode())
            if total >= max_bytes:
                return docs, paths
    return docs, paths


def build(out_dir: Path, roots: list[Path], *, max_mb: float, vocab_size: int) -> dict:
    from orchestrator import preprocess

    docs, paths = collect(roots, int(max_mb * 2**20))
    if not docs:
        raise SystemExit(f"no text files ({', '.join(SUFFIXES)}) under {', '.join(map(str, roots))}")
    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with open(raw / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    meta = preprocess.preprocess([raw], out_dir / "data", None, vocab_size)
    return {**meta, "documents": len(docs), "first": paths[0], "last": paths[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="new directory: raw/ (the text) and data/ (the token dataset)")
    p.add_argument("--roots", type=Path, nargs="+", default=None, help="directories to read (default: stdlib, torch)")
    p.add_argument("--max-mb", type=float, default=40.0, help="stop after this much text (default 40 MiB)")
    p.add_argument("--vocab-size", type=int, default=32000, help="the BPE's vocabulary (default 32000)")
    args = p.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        p.error(f"{args.out_dir}: not empty; choose a new directory")
    meta = build(args.out_dir, args.roots or default_roots(), max_mb=args.max_mb, vocab_size=args.vocab_size)
    print(f"{meta['num_tokens']:,} tokens (vocab {meta['vocab_size']}) from {meta['documents']:,} files "
          f"({meta['first']} ... {meta['last']}) in {args.out_dir / 'data'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
