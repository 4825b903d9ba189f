"""Which layers to cut a student from (issue 27; docs/model.md "A student cut from a teacher"): the untrained
student made of chosen layers of all-MiniLM-L6-v2 (JasperModel.from_bert: the teacher's embeddings, those layers,
identity-row heads, so the untrained student returns the first D coordinates of its own pooled state), scored on
STSBenchmark test (cosine Spearman, the demo's evaluation: built-in engine, no instructions, 64 tokens) at 384 and
64 dims. All six layers is the teacher itself (a check: it must reproduce the teacher's score).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_cut_layers.py          # ~40 s on 2 cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
import model as M  # noqa: E402
import teachers  # noqa: E402
from data import default_data_dir  # noqa: E402

CUTS = ([0, 2, 4], [0, 2, 5], [0, 3, 5], [0, 1, 2], [3, 4, 5], [0, 1, 2, 3, 4, 5])


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for layers in CUTS:
        t0 = time.time()
        m = M.JasperModel.from_bert(teachers.minilm_path(), layers=layers, head_dims=(384, 64))
        m.config.max_length = demo.DEMO_EVAL_MAX_LENGTH
        r = demo._demo_eval(m, ["STSBenchmark"], default_data_dir(), [384, 64], "builtin", None)["STSBenchmark"]
        rows.append((layers, r[384], r[64], time.time() - t0))
    print("| layers kept | STSBenchmark test @384 | @64 | s |\n|---|---:|---:|---:|")
    for layers, a, b, s in rows:
        print(f"| {','.join(map(str, layers))} | {a:.4f} | {b:.4f} | {s:.0f} |")


if __name__ == "__main__":
    main()
