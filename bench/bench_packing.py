"""Packed sequences vs padding (issue 18), side by side in one run: padding efficiency of TrainLoader's batches on the
real recipe's length mix, and tokens/s of a training step and of teacher encoding at the demo's shapes.

    .venv/bin/python bench/bench_packing.py [--data-dir ../shared/data] [--steps 6] [--encode-texts 4096]

1. Padding efficiency (real tokens / computed tokens) of TrainLoader batches, padded vs packed, on texts that
   data.py builds with the paper's recipe (80% passages, 20% short, 30% of documents split) from the shared text,
   tokenised by the real Qwen tokenizer, max_length 512, global batch 128, for 1 and 8 ranks; and of the teacher
   cache's length-sorted batches (shards of 16,384 texts) for comparison.
2. Training step (stage 3: every parameter trains, all four heads in the loss) of the demo student (Qwen2, 4 layers,
   hidden 384, 6 query / 2 key-value heads, MiniLM vocabulary) on the demo's texts (cut at 32 tokens, global batch
   64, micro-batch 64): forward, distillation loss, backward, AdamW step; fp32 and bf16 autocast. The two paths
   alternate step by step (ABAB...) over the same global batches, the median step time is reported, so a load
   change on a shared machine hits both alike.
3. Teacher encoding: all-MiniLM-L6-v2 (the demo's teacher) encoding demo texts, as the cache does (length-sorted,
   batch 256) and from a random order (what a loader that does not sort sees), padded vs packed.
Prints markdown tables. CPU unless CUDA is present.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import data as D  # noqa: E402
import losses as L  # noqa: E402
import model as M  # noqa: E402
import teachers as T  # noqa: E402
from bench_data import tokenizer_path  # noqa: E402


def efficiency_table(data_dir: Path, tmp: Path, n_texts: int, steps: int) -> None:
    meta = D.build(tmp / "recipe", n_texts=n_texts, seed=0, progress=False, data_dir=data_dir)
    texts = Path(meta["texts"])
    tok = M.TextTokenizer.from_pretrained(tokenizer_path("qwen"), max_length=512)
    print(f"## 1. padding efficiency, recipe length mix ({meta['n_texts']:,} texts {meta['stats']['texts']}, "
          f"Qwen tokenizer, max_length 512, global batch 128)\n")
    print("| ranks | micro-batch (rows) | padded | packed | computed tokens packed / padded |")
    print("|---:|---:|---:|---:|---:|")
    for world, micro in ((1, 16), (1, 128), (8, 4), (8, 16)):
        res = {}
        for packing in (False, True):
            real = proc = 0
            for r in range(world):
                ld = D.TrainLoader(texts, tok, 128, 512, seed=0, rank=r, world_size=world, micro_batch=micro,
                                   packing=packing)
                for s in range(steps):
                    b = ld.batch_at(0, s)
                    real, proc = real + b.n_tokens, proc + b.n_processed
            res[packing] = (real, proc)
        print(f"| {world} | {micro} | {res[False][0] / res[False][1]:.3f} | {res[True][0] / res[True][1]:.3f} | "
              f"{res[True][1] / res[False][1]:.3f} |")
    lens = np.array([len(x) for x in tok.encode_ids(D.read_texts(texts), max_length=512)])
    for bs in (32, 256):
        eff = []
        for a in range(0, len(lens) - 16384 + 1, 16384) or [0]:
            s = np.sort(lens[a:a + 16384])[::-1]
            eff.append(s.sum() / sum(s[i:i + bs].max() * len(s[i:i + bs]) for i in range(0, len(s), bs)))
        print(f"\nteacher cache (each shard of 16,384 texts sorted by length), batch {bs}: padded efficiency "
              f"{float(np.mean(eff)):.4f}")
    print()


def demo_texts(data_dir: Path, tmp: Path, n_texts: int) -> Path:
    import demo
    meta = D.build(tmp / "demo", n_texts=n_texts, seed=0, progress=False, data_dir=data_dir, **demo.DEMO_DATA)
    return Path(meta["texts"])


def train_step_table(texts: Path, steps: int, dtypes: list[str]) -> None:
    import demo
    tdir = T.minilm_path()
    tok = M.TextTokenizer.from_pretrained(tdir, max_length=32)
    print(f"## 2. training step, demo shapes (student {demo.DEMO_STUDENT}, stage 3, global batch 64, micro-batch 64, "
          f"texts cut at 32 tokens)\n")
    print("| dtype | path | real tokens/step | computed tokens/step | median s/step | real tokens/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    loaders = {p: D.TrainLoader(texts, tok, 64, 32, seed=0, micro_batch=64, packing=p) for p in (False, True)}
    for dt in dtypes:
        student = demo.make_demo_student(tdir, max_length=32)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        heads = list(student.dims)
        ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16")
        times: dict[bool, list[float]] = {False: [], True: []}
        toks: dict[bool, tuple[int, int]] = {}
        for s in range(steps + 1):
            for packing in (False, True):
                b = loaders[packing].batch_at(0, s)
                teacher = torch.nn.functional.normalize(
                    torch.randn(len(b.rows), 384, generator=torch.Generator().manual_seed(int(b.rows.sum()))), dim=-1)
                t0 = time.perf_counter()
                with ac:
                    if packing:
                        outs = [student(packed=p, dims=heads) for p in b.packed]
                    else:
                        outs = [student(ids, mask, dims=heads) for ids, mask in b.chunks]
                    vec = {Dm: torch.cat([o[Dm] for o in outs]).float() for Dm in heads}
                    loss, _ = L.distill_loss(3, vec, teacher, weights=(10.0, 12.5, 1.25))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if s:  # step 0 warms up both paths
                    times[packing].append(time.perf_counter() - t0)
                    r, c = toks.get(packing, (0, 0))
                    toks[packing] = (r + b.n_tokens, c + b.n_processed)
        base = statistics.median(times[False])
        for packing in (False, True):
            med = statistics.median(times[packing])
            real, comp = toks[packing]
            print(f"| {dt} | {'packed' if packing else 'padded'} | {real / steps:,.0f} | {comp / steps:,.0f} | "
                  f"{med:.3f} | {real / steps / med:,.0f} | {base / med:.3f}x |")
    print()


def encode_table(texts: Path, n: int, dtypes: list[str], reps: int) -> None:
    tdir = T.minilm_path()
    all_texts = list(itertools.islice(D.read_texts(texts), n))
    print(f"## 3. teacher encoding, all-MiniLM-L6-v2 on {len(all_texts):,} demo texts cut at 32 tokens, batch 256\n")
    print("| dtype | path | real tokens | median s | real tokens/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for dt in dtypes:
        t = T.BertTeacher(tdir, max_length=32, dtype=torch.bfloat16 if dt == "bf16" else torch.float32)
        n_tok = sum(len(x) for x in t._tokenize(all_texts, None))
        t.encode(all_texts[:512], batch_size=256, packing=True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(reps):
            for packing in (False, True):
                t0 = time.perf_counter()
                t.encode(all_texts, batch_size=256, packing=packing)
                times[packing].append(time.perf_counter() - t0)
        base = statistics.median(times[False])
        for packing in (False, True):
            med = statistics.median(times[packing])
            print(f"| {dt} | {'packed' if packing else 'padded (length-sorted)'} | {n_tok:,} | {med:.2f} | "
                  f"{n_tok / med:,.0f} | {base / med:.3f}x |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(D.default_data_dir()))
    ap.add_argument("--recipe-texts", type=int, default=20000, help="texts built for the efficiency table")
    ap.add_argument("--eff-steps", type=int, default=20, help="global batches per efficiency figure")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per path and dtype")
    ap.add_argument("--encode-texts", type=int, default=4096)
    ap.add_argument("--encode-reps", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--only", choices=["efficiency", "train", "encode"], nargs="+",
                    default=["efficiency", "train", "encode"])
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["JASPER_CACHE_DIR"] = str(tmp / "index")  # TrainLoader index caches: not in ~/.cache
        if "efficiency" in a.only:
            efficiency_table(Path(a.data_dir), tmp, a.recipe_texts, a.eff_steps)
        if "train" in a.only or "encode" in a.only:
            texts = demo_texts(Path(a.data_dir), tmp, max(a.encode_texts, 64 * (a.steps + 1)) + 64)
            if "train" in a.only:
                train_step_table(texts, a.steps, a.dtypes)
            if "encode" in a.only:
                encode_table(texts, a.encode_texts, a.dtypes, a.encode_reps)


if __name__ == "__main__":
    main()
