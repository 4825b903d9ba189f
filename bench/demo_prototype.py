"""Prototype for the demo (demo.py): find a configuration that trains a small Qwen2-architecture
student from all-MiniLM-L6-v2 in <= 20 min on 2 CPU cores with STSBenchmark test Spearman >= 0.75.

A minimal loop over the project's public APIs (data.build, teacher_cache.build_cache/TeacherCache, model.JasperModel,
losses.distill_loss, train.set_trainable/build_optimizer/lr_factor, eval.quick_eval). It is NOT the demo itself
(that is `python demo.py`); it exists to measure per-step CPU cost and scores of candidate settings.

Costs are reported as CPU seconds (user+sys of this process, OMP_WAIT_POLICY=PASSIVE so that spinning threads do
not count) because the machine is shared while this was written; an unloaded 2-core machine runs at about
cpu_seconds / 1.9 wall seconds.

    OMP_WAIT_POLICY=PASSIVE python bench/demo_prototype.py data   --work /tmp/demo/w
    OMP_WAIT_POLICY=PASSIVE python bench/demo_prototype.py cache  --work /tmp/demo/w
    OMP_WAIT_POLICY=PASSIVE python bench/demo_prototype.py train  --work /tmp/demo/w --steps 100 200 300
    OMP_WAIT_POLICY=PASSIVE python bench/demo_prototype.py bow    --work /tmp/demo/w   # untrained baselines
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
import eval as E  # noqa: E402
import losses as L  # noqa: E402
import model as M  # noqa: E402
from checkpoints import read_safetensors  # noqa: E402
import teacher_cache as TC  # noqa: E402
import teachers as T  # noqa: E402
import train as TR  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_student(layers=4, hidden=384, inter=1536, heads=6, kv=2, head_dims=(384, 256, 128, 64), max_length=32,
                 emb="ln", zero_out=True, seed=0) -> M.JasperModel:
    """Random-init Qwen2 student on MiniLM's WordPiece vocab; embeddings copied from the teacher."""
    tdir = T.minilm_path()
    tok = M.TextTokenizer.from_pretrained(tdir, max_length=max_length)
    text = M.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         rope_theta=10000.0, max_position_embeddings=512, causal=False)
    torch.manual_seed(seed)
    m = M.JasperModel(M.JasperConfig(text=text, head_dims=head_dims, max_length=max_length))
    st = read_safetensors(tdir)
    pre = "bert." if any(k.startswith("bert.") for k in st) else ""
    w = st[pre + "embeddings.word_embeddings.weight"].float()
    if emb == "ln":  # the teacher's layer-0 input without the position term: LN(word + token_type[0])
        w = torch.nn.functional.layer_norm(w + st[pre + "embeddings.token_type_embeddings.weight"][0].float(),
                                           (w.shape[1],), st[pre + "embeddings.LayerNorm.weight"].float(),
                                           st[pre + "embeddings.LayerNorm.bias"].float(), eps=1e-12)
    if emb != "random":
        assert w.shape == m.model.embed_tokens.weight.shape, (w.shape, m.model.embed_tokens.weight.shape)
        m.model.embed_tokens.weight.data.copy_(w)
    if zero_out:
        for layer in m.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
            torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    m.tokenizer = tok
    return m


class AllHeads:
    """Encoder for eval.quick_eval that runs the body once per text and projects to any head."""

    uses_instructions = False

    def __init__(self, m: M.JasperModel):
        self.m, self.dims, self.pooled = m, tuple(m.config.head_dims), {}

    @torch.inference_mode()
    def encode(self, texts, dim=None, instruction=None, batch_size=256, show_progress=False):
        m = self.m
        m.eval()
        todo = [t for t in dict.fromkeys(texts) if t not in self.pooled]
        ids = m.tokenizer.encode_ids(todo, None, m.config.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for s in range(0, len(order), 256):
                idx = order[s:s + 256]
                x, mask = m.tokenizer.pad([ids[i] for i in idx])
                p = m.pool(x, mask).float()
                for i, row in zip(idx, p):
                    self.pooled[todo[i]] = row
        pooled = torch.stack([self.pooled[t] for t in texts])
        return m.project(pooled, [dim or self.dims[0]])[dim or self.dims[0]]


def scores(m, dims=None, splits=("dev", "test")) -> dict:
    enc = AllHeads(m)
    out = {}
    for split in splits:
        for d in (dims or enc.dims):
            out[f"{split}@{d}"] = round(E.quick_eval(enc, DATA, "STSBenchmark", split, dim=d, instructions="none"), 4)
    m.train()
    return out


def cmd_data(a):
    t0 = cpu_s()
    meta = D.build(Path(a.work) / "data", data_dir=DATA, passage_ratio=a.passage_ratio, split_ratio=1.0,
                   min_sentences=1, max_sentences=a.max_sentences, progress=False)
    print(json.dumps(meta["stats"]["texts"]), meta["n_texts"], f"cpu {cpu_s() - t0:.1f}s")


def cmd_cache(a):
    t0, w0 = cpu_s(), time.time()
    teacher = T.BertTeacher(T.minilm_path(), max_length=a.max_length, dtype=getattr(torch, a.teacher_dtype))
    TC.build_cache([teacher], Path(a.work) / "data" / "texts.jsonl", Path(a.work) / "cache", batch_size=256)
    n = TC.TeacherCache(Path(a.work) / "cache").n_rows
    c = cpu_s() - t0
    print(f"cache: {n} texts, cpu {c:.1f}s ({n / c:.0f} texts per cpu-s), wall {time.time() - w0:.1f}s")


def cmd_bow(a):
    for emb in ("ln", "raw", "random"):
        m = make_student(emb=emb)
        print(emb, scores(m, splits=("dev",)))


def cmd_train(a):
    work = Path(a.work)
    torch.manual_seed(a.seed)
    m = make_student(layers=a.layers, inter=a.inter, heads=a.heads, kv=a.kv, emb=a.emb, zero_out=not a.no_zero,
                     head_dims=tuple(a.dims), max_length=a.max_length, seed=a.seed)
    print("params", sum(p.numel() for p in m.parameters()), "untrained", scores(m, splits=("dev",)), flush=True)
    cache = TC.TeacherCache(work / "cache")
    loader = D.TrainLoader(work / "data" / "texts.jsonl", m.tokenizer, global_batch=a.batch,
                           max_length=a.max_length, seed=a.seed, micro_batch=a.batch)
    it = iter(loader)
    hist = []
    total_cpu = 0.0
    for stage, (steps, lr) in enumerate(zip(a.steps, a.lr), start=1):
        if steps == 0:
            continue
        names = TR.set_trainable(m, stage if not a.all_trainable else 3)
        if a.stage1_body and stage == 1:
            m.requires_grad_(True)
            for D_ in m.config.head_dims[1:]:
                m.head(D_).requires_grad_(False)
        cfg = TR.TrainConfig(stage=stage, lr=lr, steps=steps, batch=a.batch, warmup_ratio=a.warmup)
        opt = TR.build_optimizer(m, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: TR.lr_factor(s, cfg))
        params = [p for p in m.parameters() if p.requires_grad]
        heads = list(m.config.head_dims[:1]) if stage <= 2 else list(m.config.head_dims)
        m.train()
        c0, w0, ntok = cpu_s(), time.time(), 0
        for step in range(steps):
            b = next(it)
            tgt = cache.targets(b.rows, b.hashes)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.fp32):
                out = m(b.input_ids, b.attention_mask, dims=heads)
            out = {d: v.float() for d, v in out.items()}
            loss, parts = L.distill_loss(stage, out, tgt, weights=tuple(a.weights))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ntok += int(b.attention_mask.sum())
            hist.append(dict(stage=stage, step=step, loss=loss.item(), **parts))
            if (step + 1) % max(1, steps // 5) == 0:
                c = cpu_s() - c0
                print(f"stage {stage} step {step + 1}/{steps} loss {loss.item():.4f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "total")
                      + f" | {c / (step + 1) * 1000:.0f} cpu-ms/step, {ntok / (step + 1):.0f} tok/step", flush=True)
        c = cpu_s() - c0
        total_cpu += c
        print(f"stage {stage}: {steps} steps, {len(names)} trainable tensors, cpu {c:.1f}s "
              f"({c / steps * 1000:.0f} cpu-ms/step), wall {time.time() - w0:.1f}s", flush=True)
        if a.eval_each or stage == len(a.steps):
            print(f"stage {stage} scores", scores(m, dims=None if stage == 3 else m.config.head_dims[:1]), flush=True)
    print(f"train cpu total {total_cpu:.1f}s -> ~{total_cpu / 1.9 / 60:.1f} min on 2 idle cores")
    if a.save:
        m.save_pretrained(a.save)
        (Path(a.save) / "hist.json").write_text(json.dumps(hist))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["data", "cache", "train", "bow"])
    p.add_argument("--work", default="/tmp/demo/w")
    p.add_argument("--passage-ratio", type=float, default=0.85)
    p.add_argument("--max-sentences", type=int, default=2)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--teacher-dtype", default="bfloat16")
    p.add_argument("--steps", type=int, nargs=3, default=[100, 300, 600])
    p.add_argument("--lr", type=float, nargs=3, default=[1e-3, 5e-4, 5e-4])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--weights", type=float, nargs=3, default=[10, 200, 20])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv", type=int, default=2)
    p.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64])
    p.add_argument("--emb", default="ln", choices=["ln", "raw", "random"])
    p.add_argument("--no-zero", action="store_true")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--all-trainable", action="store_true")
    p.add_argument("--stage1-body", action="store_true")
    p.add_argument("--eval-each", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dict(data=cmd_data, cache=cmd_cache, train=cmd_train, bow=cmd_bow)[a.cmd](a)


if __name__ == "__main__":
    main()
