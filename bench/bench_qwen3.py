"""Forward+backward throughput: our Qwen2Encoder with the Qwen3 switches (q/k RMSNorm, explicit head_dim, no q/k/v
bias) vs transformers' Qwen3Model, same weights, same inputs, side by side in one run (target >= 1.0x).

    .venv/bin/python bench/bench_qwen3.py          # hidden 512, 8 heads x head_dim 128 (q width 1024 != hidden, as
                                                   # in Qwen3-0.6B), 2 kv heads, 4 layers, seq 256, batch 8, fp32 CPU
    .venv/bin/python bench/bench_qwen3.py --steps 20 --threads 2

The machinery (alternating A B A B steps, median step time, real-token throughput, an output-equality guard per
case) is bench/bench_qwen2.py's; this adds the causal left-padding case Qwen3-Embedding runs in.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qwen2 import main  # noqa: E402

if __name__ == "__main__":
    main(arch="qwen3", doc=__doc__, head_dim=128)
