"""CPU serving: torch fp32 (JasperModel.encode) vs ONNX Runtime fp32 vs ONNX Runtime int8 (onnx_export.py).

One run, the three side by side on the same texts and threads: encode throughput (texts/s, STSBenchmark test's
sentences, length-sorted batches as every encoder here batches) and STSBenchmark test Spearman at every head (eval.py's
built-in engine, no instructions, as the demo reports it). The export folder is copied first (the source stays
read-only) and `python export.py onnx` runs on the copy. Prints one markdown table.

    .venv/bin/python bench/bench_onnx.py [--model /work/demo_run/stage3/final] [--data-dir ../shared/data]
        [--threads 2] [--repeat 5] [--batch-size 32]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import eval as ev  # noqa: E402
import onnx_export as O  # noqa: E402
from eval_inputs import find_task_dir, read_jsonl, split_file  # noqa: E402
from model import JasperModel  # noqa: E402


def sts_texts(data_dir: Path) -> list[str]:
    path = split_file(find_task_dir(data_dir, "STSBenchmark", "STS"), "test", "STSBenchmark")
    rows = read_jsonl(path, "STSBenchmark")
    return [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/demo_run/stage3/final")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx-"))
    try:
        folder = Path(shutil.copytree(a.model, tmp / "final"))
        t0 = time.perf_counter()
        O.export_onnx(folder)
        t_export = time.perf_counter() - t0
        encoders = {"torch fp32": JasperModel.from_pretrained(folder, vision=False),
                    "ONNX fp32": O.OnnxEncoder(folder, O.FP32_FILE, threads=a.threads),
                    "ONNX int8": O.OnnxEncoder(folder, O.INT8_FILE, threads=a.threads)}
        sizes = {"torch fp32": (folder / "model.safetensors").stat().st_size,
                 "ONNX fp32": (folder / "onnx" / O.FP32_FILE).stat().st_size,
                 "ONNX int8": (folder / "onnx" / O.INT8_FILE).stat().st_size}
        texts = sts_texts(Path(a.data_dir))
        dims = list(encoders["torch fp32"].dims)
        secs = {k: [] for k in encoders}
        vecs = {}
        for k, e in encoders.items():  # warm-up (also the vectors compared below)
            vecs[k] = e.encode(texts[:256], dim=dims[0], batch_size=a.batch_size, show_progress=False)
        for _ in range(a.repeat):  # interleaved: load changes on this shared machine hit all three alike
            for k, e in encoders.items():
                t0 = time.perf_counter()
                e.encode(texts, dim=dims[0], batch_size=a.batch_size, show_progress=False)
                secs[k].append(time.perf_counter() - t0)
        scores = {k: ev.evaluate(e, ["STSBenchmark"], data_dir=a.data_dir, dims=dims, instructions="none",
                                 engine="builtin", batch_size=a.batch_size, show_progress=False)["results"]
                  ["STSBenchmark"] for k, e in encoders.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = len(texts) / statistics.median(secs["torch fp32"])
    print(f"model {a.model}; {len(texts)} texts (STSBenchmark test), batch {a.batch_size}, {a.threads} threads, "
          f"median of {a.repeat}; torch {torch.__version__}; ONNX export + int8 quantisation {t_export:.1f} s\n")
    print("| backend | file MB | texts/s | vs torch | max abs diff vs torch (dim %d) | " % dims[0]
          + " | ".join(f"STSB test dim {d}" for d in dims) + " |")
    print("| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in dims) + " |")
    for k in encoders:
        rate = len(texts) / statistics.median(secs[k])
        diff = (vecs[k] - vecs["torch fp32"]).abs().max().item()
        print(f"| {k} | {sizes[k] / 2 ** 20:.1f} | {rate:.0f} | {rate / base:.2f}x | {diff:.1e} | "
              + " | ".join(f"{scores[k][str(d)]['main_score']:.4f}" for d in dims) + " |")


if __name__ == "__main__":
    main()
