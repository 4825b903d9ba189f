"""Evaluation wall time per task: all-MiniLM-L6-v2 through eval.py vs mteb + sentence-transformers directly.

Both sides run the same mteb task objects on the same local data (../shared/data injected with
eval.inject_local_data, since this machine is offline), on the same machine, one after the other, each with a
fresh model and nothing cached between tasks. Prints a markdown table (task, main score of each side, seconds of
each side, ratio).

    .venv/bin/python bench/bench_eval.py [--tasks STSBenchmark,SciFact,...] [--data-dir ../shared/data]
        [--threads N] [--repeat 1]
"""
import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import eval as ev  # noqa: E402
import eval_mteb as EM  # noqa: E402

ALL = "STSBenchmark,STS12,STS13,BIOSSES,SciFact,Banking77Classification"


def run_ours(task: str, data_dir: Path, batch_size: int) -> tuple[float, float]:
    import teachers
    t0 = time.perf_counter()
    enc = ev.load_encoder(teachers.minilm_path())
    r = ev.evaluate(enc, [task], data_dir=data_dir, batch_size=batch_size, show_progress=False)
    return r["results"][task]["native"]["main_score"], time.perf_counter() - t0


def run_reference(task: str, data_dir: Path, batch_size: int) -> tuple[float, float]:
    import teachers
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from sentence_transformers import SentenceTransformer
    t0 = time.perf_counter()
    model = SentenceTransformerEncoderWrapper(SentenceTransformer(str(teachers.minilm_path()), device="cpu"))
    t = EM.get_mteb_task(task)
    split = EM.default_split(t)
    EM.inject_local_data(t, data_dir, split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = t.evaluate(model, split, encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})
    return float(res["default"]["main_score"]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=ALL)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    rows = []
    for task in args.tasks.split(","):
        s_ref, t_ref = run_reference(task, data_dir, args.batch_size)
        print(f"{task}: mteb+ST {s_ref:.5f} in {t_ref:.1f}s", file=sys.stderr, flush=True)
        s_ours, t_ours = run_ours(task, data_dir, args.batch_size)
        rows.append((task, s_ours, s_ref, t_ours, t_ref))
        print(f"{task}: ours {s_ours:.5f} in {t_ours:.1f}s | mteb+ST {s_ref:.5f} in {t_ref:.1f}s", file=sys.stderr)
    print(f"\ntorch threads: {torch.get_num_threads()}, batch size {args.batch_size}, CPU, MiniLM fp32\n")
    print("| task | main score (eval.py) | main score (mteb+ST) | eval.py s | mteb+ST s | eval.py / mteb+ST |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for task, so, sr, to, tr in rows:
        print(f"| {task} | {so:.5f} | {sr:.5f} | {to:.1f} | {tr:.1f} | {to / tr:.2f} |")
    tot_o, tot_r = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print(f"| total | | | {tot_o:.1f} | {tot_r:.1f} | {tot_o / tot_r:.2f} |")


if __name__ == "__main__":
    main()
