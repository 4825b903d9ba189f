"""Forward+backward throughput: our Qwen2Encoder vs transformers' Qwen2Model, same weights, same inputs, one run.

    .venv/bin/python bench/bench_qwen2.py                 # hidden 512, 4 layers, seq 256, batch 8, fp32, CPU
    .venv/bin/python bench/bench_qwen2.py --steps 20 --threads 2

Both models are loaded from the same safetensors checkpoint. transformers runs with its SDPA attention (its fastest
CPU path) and, for the bidirectional rows, a 4-D non-causal mask (how stella / Jasper run it). Steps alternate
between the two implementations (A B A B ...) so that load from other processes on the machine hits both alike;
the table reports the median step time. Throughput counts real (non-padding) tokens.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402


def main(arch: str = "qwen2", doc: str = __doc__, head_dim: int | None = None):
    """`arch` qwen2 (q/k/v bias) or qwen3 (q/k RMSNorm, explicit head_dim, no bias; bench/bench_qwen3.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=head_dim, help="default hidden / heads (Qwen3: explicit)")
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation and case")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
                          "qwen3": (transformers.Qwen3Config, transformers.Qwen3Model)}[arch]
    hf_cfg = cfg_cls(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                     head_dim=args.head_dim or args.hidden // args.heads, max_position_embeddings=4096,
                     tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    ref = model_cls(hf_cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, safe_serialization=True)
        ours_bi = M.Qwen2Encoder.from_pretrained(d).train()
        ours_causal = M.Qwen2Encoder.from_pretrained(d, config_overrides={"causal": True}).train()

    B, T = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (B, T), generator=g)
    full = torch.ones(B, T, dtype=torch.long)
    lengths = torch.linspace(T // 4, T, B).long()  # right padding: lengths from T/4 to T
    padded = (torch.arange(T)[None] < lengths[:, None]).long()
    w = torch.randn(B, T, args.hidden, generator=g)

    def bidir_4d(mask):
        keep = mask.bool()[:, None, None, :].expand(-1, 1, T, -1)
        return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)

    def step_ours(enc, mask):
        def f():
            enc.zero_grad(set_to_none=True)
            h = enc(ids, mask)                               # (B, T, H)
            (h * w * mask[..., None]).sum().backward()
        return f

    def step_ref(mask, causal):
        def f():
            ref.zero_grad(set_to_none=True)
            am = mask if causal else bidir_4d(mask)
            h = ref(input_ids=ids, attention_mask=am).last_hidden_state
            (h * w * mask[..., None]).sum().backward()
        return f

    cases = [("bidirectional, no padding", ours_bi, full, False),
             ("bidirectional, right padding", ours_bi, padded, False),
             ("causal, no padding", ours_causal, full, True),
             ("causal, right padding", ours_causal, padded, True)]
    if arch == "qwen3":  # Qwen3-Embedding pads on the left (its last token sits at T-1)
        cases.append(("causal, left padding", ours_causal, padded.flip(1), True))
    print(f"{arch}: torch {torch.__version__}, transformers {transformers.__version__}, threads "
          f"{torch.get_num_threads()}, fp32 CPU; hidden {args.hidden}, layers {args.layers}, heads "
          f"{args.heads}/{args.kv_heads} (GQA) x head_dim {hf_cfg.head_dim}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, batch {B}, seq {T}; fwd+bwd; "
          f"median of {args.steps} alternating steps")
    rows = []
    for name, enc, mask, causal in cases:
        fa, fb = step_ours(enc, mask), step_ref(mask, causal)
        # correctness guard: same outputs (the benchmark compares equal work)
        with torch.no_grad():
            am = mask if causal else bidir_4d(mask)
            a, b = enc(ids, mask), ref(input_ids=ids, attention_mask=am).last_hidden_state
            m = mask.bool()
            err = ((a[m] - b[m]).abs().max() / b[m].abs().max()).item()
        for _ in range(args.warmup):
            fa(), fb()
        ta, tb = [], []
        for _ in range(args.steps):
            t = time.perf_counter(); fa(); ta.append(time.perf_counter() - t)
            t = time.perf_counter(); fb(); tb.append(time.perf_counter() - t)
        ma, mb = statistics.median(ta), statistics.median(tb)
        ntok = int(mask.sum())
        rows.append((name, ntok / ma, ntok / mb, mb / ma, err))
        print(f"  {name}: ours {ma:.2f} s/step, transformers {mb:.2f} s/step", file=sys.stderr, flush=True)
    print()
    print("| case | ours tok/s | transformers tok/s | ratio (ours/theirs) | max rel diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, a, b, r, err in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {r:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
