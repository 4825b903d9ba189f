"""The one GPU check: correctness and speed of the loss kernel, and a timed full-width training step, on one GPU.

    python bench/gpu_check.py                  # one CUDA GPU (H100/H200: about 2-4 minutes), no hub access
    python bench/gpu_check.py --dry-run        # the same logic on the CPU at toy sizes (kernel interpreted)

Writes bench/gpu_check.json (every figure) and bench/gpu_check.md (a block to paste into bench/RESULTS.md), or
--out PREFIX.{json,md}.  Exit status 1 if a correctness check fails.  Sections:

1. resim kernel vs sort engine vs reference on the device, m in {2, 3, 90, 128, 256, 512, 1024}: loss and gradient
   w.r.t. the student rows, relative error <= 1e-5 (the materialising reference where its (P, P) temporaries, ~32 B
   per entry, fit in 40 % of free memory: up to m = 256 on an H200, m = 128 on an 80 GB H100); the kernel run twice
   must agree bitwise.
2. fwd+bwd time of both engines at each m >= 90 (median of --repeat), and what `impl="auto"` picks.
3. bf16 FSDP2 training steps of the full-width student (Qwen2 body 28 layers x 1536 as stella_en_1.5B_v5 / Jasper,
   random weights, the four heads 12288/1024/512/256) at batch 128 x 512 tokens with activation checkpointing,
   stage-3 objective against a random (128, 12288) teacher: tokens/s, peak memory, MFU.  One process, world size 1,
   through distributed.setup_distributed and train.py's own set_trainable / shard_model / build_optimizer.
   MFU counts model FLOPs only: 6 N per token for the N body matmul parameters (embeddings and heads excluded) plus
   12 L H T per token for attention (PaLM's formula, bidirectional, no causal halving); the recompute of activation
   checkpointing (another ~2 N) is not counted.  Peak: dense bf16 of the named GPU (table below).
4. A stella-shaped teacher encode (the same Qwen2 body + Linear(1536, 8192), bf16, inference): texts/s and tokens/s
   at 128 x 512, the cost of filling the teacher cache.
5. Packed vs padded (packing.py): the same body on a global batch of 128 texts of the recipe's length mix (max 512),
   padded micro-batches of 16 sorted rows vs 16 packed rows of 512 tokens: padding efficiency, and real tokens/s of
   fwd+bwd and of inference, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel on the CPU: set before triton is first imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import losses  # noqa: E402

BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0, "4090": 165.2}
TOL = 1e-5


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------------
# 1-2. the relative-similarity loss
# ---------------------------------------------------------------------------------------------------------------------
def resim_case(m: int, dev: torch.device, impl: str, s0: torch.Tensor, t: torch.Tensor):
    s = s0.clone().requires_grad_()
    loss = losses.resim_loss(s, t, impl=impl)
    loss.backward()
    return loss.detach(), s.grad


def resim_inputs(m: int, dev: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(P = m(m-1)/2 pairs, student (m, 256), teacher (m, 384)): unit rows seeded by m, the same for the accuracy
    check and the timing, so the two tables describe the same inputs."""
    g = torch.Generator().manual_seed(m)
    s0 = F.normalize(torch.randn(m, 256, generator=g), dim=-1).to(dev)
    t = F.normalize(torch.randn(m, 384, generator=g), dim=-1).to(dev)
    return m * (m - 1) // 2, s0, t


def check_resim(dev: torch.device, sizes: list[int], ref_budget: float) -> list[dict]:
    rows = []
    for m in sizes:
        P, s0, t = resim_inputs(m, dev)
        out = {e: resim_case(m, dev, e, s0, t) for e in ("triton", "sort")}
        again = resim_case(m, dev, "triton", s0, t)
        row = dict(m=m, P=P, loss=float(out["sort"][0]),
                   loss_rel_triton_sort=rel(out["triton"][0], out["sort"][0]) if P > 1 else 0.0,
                   grad_rel_triton_sort=rel(out["triton"][1], out["sort"][1]) if P > 1 else 0.0,
                   triton_bitwise_repeat=bool(torch.equal(again[0], out["triton"][0])
                                              and torch.equal(again[1], out["triton"][1])))
        if 32 * P * P <= ref_budget:  # the reference's (P, P) temporaries (bench_losses.REF_BYTES_PER_ENTRY)
            ref = resim_case(m, dev, "reference", s0, t)
            row["loss_rel_triton_ref"] = rel(out["triton"][0], ref[0]) if P > 1 else 0.0
            row["grad_rel_triton_ref"] = rel(out["triton"][1], ref[1]) if P > 1 else 0.0
            row["loss_rel_sort_ref"] = rel(out["sort"][0], ref[0]) if P > 1 else 0.0
            del ref
        else:
            row["reference"] = f"skipped: needs ~{32 * P * P / 2**30:,.0f} GiB"
        errs = [v for k, v in row.items() if k.startswith(("loss_rel", "grad_rel"))]
        row["ok"] = all(e <= TOL for e in errs) and row["triton_bitwise_repeat"]
        rows.append(row)
        vs_ref = (f"loss {row['loss_rel_triton_ref']:.1e} grad {row['grad_rel_triton_ref']:.1e}"
                  if "loss_rel_triton_ref" in row else row["reference"])
        print(f"  m={m:5d} P={P:9,d} loss {row['loss']:.6f} | triton vs sort: loss {row['loss_rel_triton_sort']:.1e} "
              f"grad {row['grad_rel_triton_sort']:.1e} | vs reference: {vs_ref} | {'OK' if row['ok'] else 'FAIL'}",
              flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_other_device() -> dict:
    """The launch follows x.device: with two GPUs, run on cuda:1 while cuda:0 is current."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 GPUs"}
    g = torch.Generator().manual_seed(5)
    s0, t = F.normalize(torch.randn(90, 64, generator=g), dim=-1), F.normalize(torch.randn(90, 48, generator=g), dim=-1)
    torch.cuda.set_device(0)
    a = resim_case(90, torch.device("cuda:1"), "triton", s0.to("cuda:1"), t.to("cuda:1"))
    b = resim_case(90, torch.device("cuda:0"), "sort", s0.to("cuda:0"), t.to("cuda:0"))
    return {"loss_rel": rel(a[0], b[0]), "grad_rel": rel(a[1], b[1]), "ok": rel(a[1], b[1]) <= TOL}


def time_resim(dev: torch.device, sizes: list[int], repeat: int) -> list[dict]:
    rows = []
    for m in sizes:
        P, s0, t = resim_inputs(m, dev)
        row = dict(m=m, P=P, auto=losses.auto_engine(P, dev.type))
        for e in ("triton", "sort"):
            row[f"{e}_ms"] = 1e3 * statistics.median(timed(lambda: resim_case(m, dev, e, s0, t), dev, repeat))
        row["model_triton_ms"], row["model_sort_ms"] = (1e3 * v for v in losses.resim_cost_model(P))
        row["faster"] = "triton" if row["triton_ms"] < row["sort_ms"] else "sort"
        rows.append(row)
        print(f"  m={m:5d} kernel {row['triton_ms']:9.3f} ms | sort {row['sort_ms']:9.3f} ms | model "
              f"{row['model_triton_ms']:.3f} / {row['model_sort_ms']:.3f} ms | auto: {row['auto']}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# 3-4. the student training step and the teacher encode
# ---------------------------------------------------------------------------------------------------------------------
def qwen2_config(dry: bool):
    import model as M
    if dry:
        return M.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    # stella_en_1.5B_v5 / Jasper's text body (vocab + the 3 image tokens of Jasper)
    return M.Qwen2Config(vocab_size=151_649, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2)


def bf16_body(cfg, dev: torch.device):
    """A randomly initialised Qwen2Encoder in bf16 on `dev`, built on the meta device first so the full-size body is
    allocated on the device (never on the host), then cast."""
    import model as M
    with torch.device("meta"):
        body = M.Qwen2Encoder(cfg)
    body = body.to_empty(device=dev)
    body.init_weights()
    return body.to(torch.bfloat16)


def body_matmul_params(cfg) -> int:
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = H * q + q + 2 * (H * kv + kv) + q * H + 3 * H * I
    return cfg.num_hidden_layers * per_layer


def flops_per_token(cfg, T: int, train: bool) -> float:
    """Model FLOPs per token: 2 N (forward) or 6 N (forward + backward) plus attention (4 or 12) L H T."""
    n = body_matmul_params(cfg)
    attn = cfg.num_hidden_layers * cfg.hidden_size * T
    return (6 * n + 12 * attn) if train else (2 * n + 4 * attn)


def init_single_process_group(dev: torch.device):
    """world size 1 on this machine: the FSDP2 path train.py takes under torchrun, in one process."""
    if "RANK" not in os.environ:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import distributed
    return distributed.setup_distributed(dev.type)


def train_steps(dev: torch.device, batch: int, seq: int, steps: int, warmup: int, dry: bool) -> dict:
    import model as M
    import train
    cfg_text = qwen2_config(dry)
    heads = (96, 32, 16, 8) if dry else M.JASPER_HEAD_DIMS
    d = init_single_process_group(dev)
    try:
        with torch.device("meta"):
            student = M.JasperModel(M.JasperConfig(text=cfg_text, head_dims=heads))
        student = student.to_empty(device=d.device)
        torch.manual_seed(0)
        student.model.init_weights()                        # random weights, as transformers' init
        for D in heads:
            student.head(D).reset_parameters()
        tcfg = train.TrainConfig(dtype="bf16", activation_checkpointing=True, stage=3, lr=7e-5)  # sec. 3.1
        train.set_trainable(student, 3)                     # stage 3: the whole text side and the four heads
        student = train.shard_model(student, tcfg, d)
        opt = train.build_optimizer(student, tcfg)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg_text.vocab_size - 3, (batch, seq), generator=g).to(d.device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=d.device)
        teacher = F.normalize(torch.randn(batch, heads[0], generator=g), dim=-1).to(d.device)
        parts = {}

        def step():
            vec = student(ids, mask)                        # {D: (B, D)} fp32, L2-normalised
            total, p = losses.distill_loss(3, vec, teacher)
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            parts.update(p)

        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        times = timed(step, d.device, steps, warmup)
        t = statistics.median(times)
        tokens = batch * seq
        fl = flops_per_token(cfg_text, seq, train=True) * tokens
        name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else platform.processor() or "cpu"
        peak = peak_tflops(name) if d.device.type == "cuda" else None
        res = dict(batch=batch, seq=seq, layers=cfg_text.num_hidden_layers, hidden=cfg_text.hidden_size,
                   params=sum(p.numel() for p in student.parameters()), body_matmul_params=body_matmul_params(cfg_text),
                   steps=steps, warmup=warmup, step_s=t, step_s_all=times, tokens_per_s=tokens / t,
                   model_tflops_per_s=fl / t / 1e12, peak_bf16_tflops=peak,
                   mfu=(fl / t / 1e12 / peak) if peak else None, last_loss=parts.get("total"),
                   peak_mem_gib=(torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda"
                                 else None))
        mfu = "n/a" if res["mfu"] is None else f"{res['mfu']:.1%}"
        print(f"  step {t:.3f} s | {res['tokens_per_s']:,.0f} tokens/s | {res['model_tflops_per_s']:.1f} TFLOP/s | "
              f"MFU {mfu} | peak mem {res['peak_mem_gib']} GiB | loss {res['last_loss']}", flush=True)
        return res
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def teacher_encode(dev: torch.device, batch: int, seq: int, batches: int, dry: bool) -> dict:
    import model as M
    cfg = qwen2_config(dry)
    cfg.vocab_size = 151_646 if not dry else cfg.vocab_size       # stella's vocab (no image tokens)
    out_dim = 128 if dry else 8192
    body = bf16_body(cfg, dev)
    head = torch.nn.Linear(cfg.hidden_size, out_dim, device=dev, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    mask = torch.ones(batch, seq, dtype=torch.long, device=dev)

    @torch.inference_mode()
    def enc():
        h = body(ids, mask)                                  # (B, T, H)
        return F.normalize(head(M.mean_pool(h, mask).to(torch.bfloat16)).float(), dim=-1)

    times = timed(enc, dev, batches, 1)
    t = statistics.median(times)
    fl = flops_per_token(cfg, seq, train=False) * batch * seq
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name) if dev.type == "cuda" else None
    res = dict(batch=batch, seq=seq, out_dim=out_dim, batch_s=t, texts_per_s=batch / t, tokens_per_s=batch * seq / t,
               model_tflops_per_s=fl / t / 1e12, mfu=(fl / t / 1e12 / peak) if peak else None)
    print(f"  {res['texts_per_s']:,.0f} texts/s | {res['tokens_per_s']:,.0f} tokens/s | "
          f"{res['model_tflops_per_s']:.1f} TFLOP/s", flush=True)
    del body, head
    return res


def packed_vs_padded(dev: torch.device, batch: int, max_len: int, micro: int, repeat: int, dry: bool) -> dict:
    """5. The same global batch through the stella-shaped body (bf16), padded as TrainLoader(packing=False) cuts it
    (sorted by length, micro-batches of `micro` rows each padded to its longest) and packed as TrainLoader's default
    (packing.plan_rows into rows of max_len tokens, `micro` rows per forward): training (fwd + bwd of a masked-mean
    read-out) and encoding (inference) tokens/s, the two alternated and the median kept. Text lengths: a lognormal
    fitted to the recipe's Qwen-token lengths (median 63, mean 100 at max_length 512), scaled to max_len."""
    import math
    import model as M
    from packing import Packed, plan_rows
    from tokenizer import pad_ids
    cfg = qwen2_config(dry)
    body = bf16_body(cfg, dev)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(batch, generator=g)
    lens = torch.exp(math.log(63 * max_len / 512) + 0.96 * z).round().clamp(1, max_len).long().tolist()
    ids = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    order = sorted(range(batch), key=lambda i: -lens[i])
    padded = [tuple(t.to(dev) for t in pad_ids([ids[i] for i in order[a:a + micro]], 0))
              for a in range(0, batch, micro)]
    rows = plan_rows(lens, max_len)
    packs = []
    for a in range(0, len(rows), micro):
        chunk = rows[a:a + micro]
        flat = [i for r in chunk for i in r]
        local, k = [], 0
        for r in chunk:
            local.append(list(range(k, k + len(r))))
            k += len(r)
        packs.append(Packed.from_ids([ids[i] for i in flat], max_len, 0, rows=local).to(dev))
    real = sum(lens)
    computed = {"padded": sum(x.numel() for x, _ in padded), "packed": sum(p.numel() for p in packs)}

    def run(kind: str, train: bool):
        with torch.set_grad_enabled(train):
            for item in (padded if kind == "padded" else packs):
                if kind == "padded":
                    x, m = item
                    v = M.mean_pool(body(x, m), m)                      # (b, H) fp32
                else:
                    v = item.pool(body(packed=item))                    # (n, H) fp32
                if train:
                    v.sum().backward()                                  # grads accumulate over micro-batches
        if train:
            body.zero_grad(set_to_none=True)

    res = dict(batch=batch, max_len=max_len, micro=micro, real_tokens=real,
               efficiency={k: real / v for k, v in computed.items()})
    for train in (True, False):
        times: dict[str, list[float]] = {"padded": [], "packed": []}
        for kind in ("padded", "packed"):
            run(kind, train)                                            # warm-up
        for _ in range(repeat):
            for kind in ("padded", "packed"):
                times[kind] += timed(lambda: run(kind, train), dev, 1, 0)
        key = "train" if train else "encode"
        med = {k: statistics.median(v) for k, v in times.items()}
        res[key] = {k: dict(s=med[k], real_tokens_per_s=real / med[k]) for k in med}
        res[key]["speedup"] = med["padded"] / med["packed"]
        print(f"  {key}: padded {real / med['padded']:,.0f} | packed {real / med['packed']:,.0f} real tokens/s "
              f"-> {res[key]['speedup']:.2f}x (padding efficiency {res['efficiency']['padded']:.3f} -> "
              f"{res['efficiency']['packed']:.3f})", flush=True)
    del body
    return res


# ---------------------------------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    L = [f"### GPU check on {r['device']} ({r['when']}, `python bench/gpu_check.py{' --dry-run' if r['dry'] else ''}`)",
         "", f"torch {r['torch']}, triton {r['triton']}; {r['elapsed_s']:.0f} s in all. "
         f"Correctness: {'all OK' if r['ok'] else 'FAILED'}.", "",
         "| m | P | kernel vs sort: loss / grad rel | kernel vs reference: loss / grad rel | bitwise repeat | ok |",
         "|---|---|---|---|---|---|"]
    for c in r["resim_check"]:
        refs = (f"{c['loss_rel_triton_ref']:.1e} / {c['grad_rel_triton_ref']:.1e}" if "loss_rel_triton_ref" in c
                else c["reference"])
        L.append(f"| {c['m']} | {c['P']:,} | {c['loss_rel_triton_sort']:.1e} / {c['grad_rel_triton_sort']:.1e} | "
                 f"{refs} | {c['triton_bitwise_repeat']} | {'OK' if c['ok'] else 'FAIL'} |")
    L += ["", "| m | kernel ms | sort ms | faster | model kernel / sort ms | auto picks |", "|---|---|---|---|---|---|"]
    for c in r["resim_time"]:
        L.append(f"| {c['m']} | {c['triton_ms']:.3f} | {c['sort_ms']:.3f} | {c['faster']} | "
                 f"{c['model_triton_ms']:.3f} / {c['model_sort_ms']:.3f} | {c['auto']} |")
    tr, te = r["train"], r["teacher"]
    mfu = f"{tr['mfu']:.1%}" if tr.get("mfu") is not None else "n/a"
    L += ["", f"Student training step (bf16 FSDP2, world size 1, activation checkpointing, {tr['layers']} layers x "
          f"{tr['hidden']}, {tr['params'] / 1e9:.2f} B parameters, batch {tr['batch']} x {tr['seq']}, stage-3 "
          f"objective): **{tr['tokens_per_s']:,.0f} tokens/s**, {tr['step_s']:.3f} s/step (median of "
          f"{tr['steps']}), {tr['model_tflops_per_s']:.1f} model TFLOP/s, **MFU {mfu}** (peak "
          f"{tr['peak_bf16_tflops']} TFLOP/s bf16 dense), peak memory "
          f"{tr['peak_mem_gib'] if tr['peak_mem_gib'] is None else round(tr['peak_mem_gib'], 1)} GiB.",
          "", f"Stella-shaped teacher encode (bf16, inference, batch {te['batch']} x {te['seq']}, Linear to "
          f"{te['out_dim']}): **{te['texts_per_s']:,.0f} texts/s**, {te['tokens_per_s']:,.0f} tokens/s, "
          f"{te['model_tflops_per_s']:.1f} model TFLOP/s."]
    pk = r.get("packing")
    if pk:
        L += ["", f"Packed vs padded (the body above, bf16, global batch {pk['batch']} texts of the recipe's length mix "
              f"cut at {pk['max_len']}, {pk['micro']} rows per forward): padding efficiency "
              f"{pk['efficiency']['padded']:.3f} padded, {pk['efficiency']['packed']:.3f} packed; training "
              f"(fwd+bwd) {pk['train']['padded']['real_tokens_per_s']:,.0f} vs "
              f"{pk['train']['packed']['real_tokens_per_s']:,.0f} real tokens/s (**{pk['train']['speedup']:.2f}x**); "
              f"encoding {pk['encode']['padded']['real_tokens_per_s']:,.0f} vs "
              f"{pk['encode']['packed']['real_tokens_per_s']:,.0f} (**{pk['encode']['speedup']:.2f}x**)."]
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, kernel interpreted: the logic only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "gpu_check"), help="PREFIX for PREFIX.json and PREFIX.md")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats per engine and size")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    a = ap.parse_args()
    t_start = time.perf_counter()
    if a.dry_run:
        dev = torch.device("cpu")
        sizes, time_sizes, (B, T), steps, warmup, batches = [2, 3, 9, 14], [9, 14], (8, 16), 2, 1, 2
        a.repeat = 1
        ref_budget = 2**30
    else:
        if not torch.cuda.is_available():
            print("gpu_check.py: no CUDA device (use --dry-run to exercise the logic on the CPU)")
            return 2
        dev = torch.device("cuda", torch.cuda.current_device())
        sizes, time_sizes, (B, T), steps, warmup, batches = ([2, 3, 90, 128, 256, 512, 1024],
                                                             [90, 128, 256, 384, 512, 768, 1024], (128, 512),
                                                             a.steps, 2, 5)
        ref_budget = 0.4 * torch.cuda.mem_get_info(dev)[0]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()}, dry run)"
    import triton
    r = dict(device=name, dry=a.dry_run, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             torch=torch.__version__, triton=triton.__version__, tiles=list(losses.CUDA_TILES))

    def section(title):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {title}", flush=True)

    section(f"1. resim: kernel vs sort engine vs reference on {name}")
    r["resim_check"] = check_resim(dev, sizes, ref_budget)
    r["launch_on_other_device"] = check_other_device()
    section("2. resim: fwd+bwd time per engine")
    r["resim_time"] = time_resim(dev, time_sizes, a.repeat)
    section(f"3. student training steps, batch {B} x {T}")
    r["train"] = train_steps(dev, B, T, steps, warmup, a.dry_run)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    section(f"4. stella-shaped teacher encode, batch {B} x {T}")
    r["teacher"] = teacher_encode(dev, B, T, batches, a.dry_run)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    section(f"5. packed vs padded, global batch {B}, texts cut at {T}")
    r["packing"] = packed_vs_padded(dev, B, T, 4 if a.dry_run else 16, a.repeat if not a.dry_run else 1, a.dry_run)
    r["elapsed_s"] = time.perf_counter() - t_start
    r["ok"] = all(c["ok"] for c in r["resim_check"]) and r["launch_on_other_device"].get("ok", True)
    md = markdown(r)
    Path(a.out + ".json").write_text(json.dumps(r, indent=1))
    Path(a.out + ".md").write_text(md)
    print("\n" + md + f"\nwrote {a.out}.json and {a.out}.md")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
