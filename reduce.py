"""Dimension reduction of any embedding model from unlabelled text: the proposal that closes sec. 2.4 of arXiv
2412.19048 ("the reduction of the dimensionality of any embedding model, utilizing only unsupervised data and the
model itself"), as a command.

    python reduce.py --model all-MiniLM-L6-v2 --dims 128 64 32 --out runs/minilm-reduced
    python reduce.py --model DIR --texts my_texts.jsonl --dims 256 --out runs/reduced       # your own texts

One run:
  1. texts: `--texts FILE...` (jsonl/txt/parquet, read by data.py), or by default data.py's recipe over the shared
     text folder cut into 1-2 sentence pieces (the demo's recipe), written to OUT/texts.jsonl with row hashes;
  2. the model is frozen and encodes every text ONCE (teachers.build_cache: verified, resumable shards in
     OUT/cache; a killed run reuses the finished ones): X (N, D), L2-normalised, the model's own full vectors;
  3. one new Linear head per requested dim d is trained on X alone: s = normalize(W x + b) (m, d) learns the
     teacher-free targets t = x (m, D) through the similarity loss (eq. 2) and the relative-similarity loss (eq. 3)
     of losses.py -- the losses that carry Jasper's FC2-4 in stage 3, with the model's own FC1-like full vector as
     the teacher.  No gradient ever reaches the model: its vectors are constants, so this costs one encoding pass
     plus a few minutes of (m x D) @ (D x d) matmuls, whatever the model's size;
  4. export: OUT/heads.safetensors (`{d}.weight` (d, D), `{d}.bias` (d,)) + OUT/heads.json, and for a
     sentence-transformers source (a folder with modules.json, e.g. all-MiniLM-L6-v2) one standard
     sentence-transformers folder per dim, OUT/st-{d}/: the frozen model's own folder, then (a Normalize if the
     model has none, since the heads read normalised vectors) a Dense module (identity activation) and Normalize.
     `SentenceTransformer("OUT/st-128").encode(texts)` gives the reduced vectors.

Head initialisation (`--init`): 'random' (default: nn.Linear's init), 'pca' (the top-d principal directions of X,
centred: head(x) = V_d^T (x - mean)), 'svd' (the same without centring: the best rank-d approximation of X, hence
of the Gram matrix eq. 2 compares) or 'truncate' (starts as the first d coordinates, i.e. truncation +
renormalisation).  The default was chosen on STSBenchmark dev for all-MiniLM-L6-v2 (128 / 64 / 32 dims, mean):
random 0.8378, truncate 0.8304, svd 0.8258, pca 0.8253; truncation alone 0.8362 (README, *Dimension reduction*).
Measured against truncation and PCA in README ("Dimension reduction") and bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import data
import losses as L
import teachers as T
from checkpoints import atomic_dir, atomic_write, fmt_duration, progress
from teacher_cache import TeacherCache, build_cache

# The default text recipe: data.py's mix over the shared text folder, every passage cut into 1-2 sentence pieces
# (sentence-length texts are what STS and queries look like, and they encode fast).  The same as the demo's.
TEXT_RECIPE = dict(passage_ratio=0.85, split_ratio=1.0, min_sentences=1, max_sentences=2)


class ReduceError(ValueError):
    """A bad input to reduce.py, with the file or setting named."""


# ======================================================================================================================
# 1. Heads: PCA init, training on the frozen vectors, application
# ======================================================================================================================
def pca(x: Tensor, d: int, center: bool = True) -> tuple[Tensor, Tensor]:
    """Top-d principal directions of x (N, D): (components (d, D), mean (D,)); x_reduced = (x - mean) @ comp.T.

    From the (D, D) covariance in fp64 (N >> D here), eigenvectors in order of decreasing eigenvalue, each signed so
    that its largest coordinate is positive (deterministic output).  center=False uses the second-moment matrix
    x^T x / N instead (mean = 0): its top-d directions span the best rank-d approximation of x, hence of the Gram
    matrix x x^T that eq. 2 compares, the mean direction included."""
    if x.dim() != 2 or not 0 < d <= x.shape[1]:
        raise ReduceError(f"pca: need (N, D) vectors and 0 < d <= D, got {tuple(x.shape)} and d={d}")
    xd = x.double()  # fp64: close eigenvalues of cov stay separable
    mean = xd.mean(0) if center else xd.new_zeros(xd.shape[1])  # (D,)
    xc = xd - mean  # (N, D); center=False leaves x as is: cov = x^T x / (N-1)
    cov = xc.T @ xc / max(1, xd.shape[0] - 1)                    # (D, D)
    evals, evecs = torch.linalg.eigh(cov)                        # ascending
    comp = evecs[:, evals.argsort(descending=True)[:d]].T        # (d, D)
    sign = torch.sign(comp.gather(1, comp.abs().argmax(1, keepdim=True)))  # (d, 1)
    return (comp * sign).float(), mean.float()  # fp32, the heads' dtype


INITS = ("svd", "truncate", "pca", "random")  # --init choices; the default ('random') is set in build_parser


def make_heads(x: Tensor, dims: list[int], init: str, seed: int) -> dict[int, torch.nn.Linear]:
    """One Linear(D, d) per dim.  init: 'svd' (the uncentred top-d directions, bias 0), 'truncate' (the first d
    coordinates: starts as truncation + renormalisation), 'pca' (centred: weight = components, bias = -components @
    mean) or 'random' (nn.Linear's own init)."""
    if init not in INITS:
        raise ReduceError(f"reduce: init must be one of {INITS}, got {init!r}")
    D = x.shape[1]
    heads = {}
    for d in dims:
        torch.manual_seed(seed + d)  # per dim: a head's init does not depend on the other --dims
        lin = torch.nn.Linear(D, d)  # weight (d, D), bias (d,)
        with torch.no_grad():
            if init in ("svd", "pca"):
                comp, mean = pca(x, d, center=init == "pca")  # (d, D), (D,); mean = 0 for svd
                lin.weight.copy_(comp)
                lin.bias.copy_(-comp @ mean)  # W x + b = comp (x - mean); b = 0 for svd
            elif init == "truncate":
                lin.weight.copy_(torch.eye(D)[:d])  # x[:d]; the normalize() after the head renormalises
                lin.bias.zero_()
        heads[d] = lin
    return heads


def apply_heads(x: Tensor, heads: dict[int, torch.nn.Module]) -> dict[int, Tensor]:
    """{d: (N, d) L2-normalised reduced vectors} of full vectors x (N, D) (normalised as the model outputs them)."""
    with torch.no_grad():
        return {d: F.normalize(h(x.float()), dim=-1) for d, h in heads.items()}  # (N, d) each: the same map as training


def head_loss(s: Tensor, t: Tensor, weights: tuple[float, float], margin: float) -> tuple[Tensor, dict[str, float]]:
    """eq. 2 + eq. 3 of one head: s (m, d) normalised reduced vectors, t (m, D) the model's own full vectors."""
    # t is a constant: losses.py detaches it, so only the head gets gradients (eq. 2, eq. 3)
    sim, resim = L.similarity_loss(s, t), L.resim_loss(s, t, margin=margin)
    return weights[0] * sim + weights[1] * resim, {"sim": sim.item(), "resim": resim.item()}


def evaluate_heads(x: Tensor, heads: dict, weights, margin: float, batch: int, seed: int) -> dict[int, dict]:
    """Mean unweighted losses of every head over fixed batches of x (the held-out rows): {d: {"sim", "resim"}}."""
    g = torch.Generator().manual_seed(seed)  # same seed, same batches: before/after comparable
    order = torch.randperm(x.shape[0], generator=g)  # (N,)
    out = {d: {"sim": 0.0, "resim": 0.0} for d in heads}
    n = 0
    with torch.no_grad():
        for i in range(0, x.shape[0] - batch + 1, batch):  # full batches only: in-batch losses depend on m
            t = x[order[i:i + batch]]  # (batch, D)
            for d, h in heads.items():
                _, parts = head_loss(F.normalize(h(t), dim=-1), t, weights, margin)
                for k in parts:
                    out[d][k] += parts[k]
            n += 1
    return {d: {k: v / max(n, 1) for k, v in p.items()} for d, p in out.items()}  # mean over batches


def train_heads(x: Tensor, heads: dict[int, torch.nn.Linear], steps: int, batch: int, lr: float,
                weights=(200.0, 20.0), margin: float = 0.015, warmup: float = 0.05, seed: int = 0,
                log_every: int = 50) -> list[dict]:
    """AdamW (no weight decay) on every head at once, one random batch of x (N, D) per step, warmup + cosine.
    The heads are independent (separate parameters, summed losses), so training them together only shares the
    batches.  Progress (rate, ETA, the last losses) on stderr.  Returns the per-step log records."""
    if x.shape[0] < batch:
        raise ReduceError(f"reduce: {x.shape[0]} training vectors, fewer than one batch of {batch}")
    params = [p for h in heads.values() for p in h.parameters()]  # one optimizer; the heads share no parameter
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, round(warmup * steps))  # warmup steps, >= 1: the lambda divides by it
    sched = torch.optim.lr_scheduler.LambdaLR(  # lr factor: linear up to 1, then cosine down to 0
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)  # batch order fixed by --seed alone
    hist = []
    bar = progress(total=steps, desc="reduce: heads", unit="step")
    for step in range(1, steps + 1):
        t = x[torch.randint(0, x.shape[0], (batch,), generator=g)]   # (m, D) constants: the frozen model's vectors
        total, rec = 0.0, {"step": step}  # rec: this step's log, "{d}.sim" / "{d}.resim"
        for d, h in heads.items():
            loss, parts = head_loss(F.normalize(h(t), dim=-1), t, weights, margin)
            total = total + loss  # each head gets the gradient of its own term only
            rec.update({f"{d}.{k}": v for k, v in parts.items()})
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        rec["loss"] = total.item()  # weighted, summed over heads
        hist.append(rec)
        bar.update(1)
        if step % log_every == 0 or step == steps:
            bar.set_postfix_str(" ".join(f"{d}: sim {rec[f'{d}.sim']:.3g} resim {rec[f'{d}.resim']:.3g}"
                                         for d in heads), refresh=False)
    bar.close()
    return hist


# ======================================================================================================================
# 2. Export: heads.safetensors + heads.json, and one sentence-transformers folder per dim
# ======================================================================================================================
def save_heads(out: Path, heads: dict[int, torch.nn.Linear], meta: dict) -> None:
    from safetensors.torch import save_file
    state = {}
    for d, h in heads.items():
        state[f"{d}.weight"] = h.weight.detach().float().contiguous()   # (d, D)
        state[f"{d}.bias"] = h.bias.detach().float().contiguous()       # (d,)
    atomic_write(out / "heads.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / "heads.json", json.dumps(meta, indent=1) + "\n")  # main() rewrites it with the exports


def load_heads(out: str | Path) -> dict[int, torch.nn.Linear]:
    """The heads a run wrote to OUT: {d: Linear(D, d)}."""
    from safetensors.torch import load_file
    f = Path(out) / "heads.safetensors"
    if not f.is_file():
        raise ReduceError(f"{f}: not found (is {out} the --out of a finished reduce.py run?)")
    st = load_file(str(f))
    heads = {}
    for d in sorted({int(k.split(".")[0]) for k in st}, reverse=True):  # keys "{d}.weight": widest first
        w, b = st[f"{d}.weight"], st[f"{d}.bias"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0])  # w (d, D) -> Linear(D, d)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        heads[d] = lin
    return heads


def export_sentence_transformers(src: Path, out_dir: Path, head: torch.nn.Linear, model_normalizes: bool) -> Path:
    """A standard sentence-transformers folder: the frozen model's folder (its modules.json pipeline), then
    [Normalize if the model has none], Dense(D -> d, identity activation), Normalize.  Written to a temporary
    sibling folder and renamed into place when complete."""
    from safetensors.torch import save_file
    modules_file = src / "modules.json"
    if not modules_file.is_file():
        raise ReduceError(f"{src}: no modules.json: not a sentence-transformers folder, so no standard folder can "
                          f"be exported (the heads are in heads.safetensors)")
    modules = json.loads(modules_file.read_text())  # [{idx, name, path, type}] in pipeline order
    used = {m.get("path", "") for m in modules}  # folders taken ("" = the source root)
    k = len(modules)  # new folders "{idx}_{Type}" after the source's
    new = [("Normalize", f"{k}_Normalize")] if not model_normalizes else []  # heads expect unit x
    k += len(new)
    new += [("Dense", f"{k}_Dense"), ("Normalize", f"{k + 1}_Normalize")]
    for _, path in new:
        if path in used or (src / path).exists():  # never overwrite a source folder
            raise ReduceError(f"{src}: already has a {path} folder; cannot append the reduction head")

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)  # atomic_dir already made tmp
        mods = list(modules)
        for typ, path in new:
            (tmp / path).mkdir()
            mods.append({"idx": len(mods), "name": str(len(mods)), "path": path,
                         "type": f"sentence_transformers.models.{typ}"})
        dense = tmp / new[-2][1]  # new ends with Dense, Normalize
        d, D = head.weight.shape                                    # (d, D)
        (dense / "config.json").write_text(json.dumps({"in_features": D, "out_features": d, "bias": True,
                                                       "activation_function": "torch.nn.modules.linear.Identity"},
                                                      indent=2))
        save_file({"linear.weight": head.weight.detach().float().contiguous(),
                   "linear.bias": head.bias.detach().float().contiguous()}, str(dense / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "modules.json").write_text(json.dumps(mods, indent=2))  # the copy's modules.json only

    atomic_dir(out_dir, fill)  # a kill leaves the old folder or the new, never half
    return out_dir


# ======================================================================================================================
# 3. The command
# ======================================================================================================================
def prepare_texts(out: Path, texts: list[str] | None, data_dir: str | None, max_texts: int | None, seed: int) -> Path:
    """OUT/texts.jsonl (rows {"id", "text", "hash"}): the given files' texts (deduplicated, empty skipped, a random
    `max_texts` of them) or data.py's recipe over the shared text folder."""
    path = out / "texts.jsonl"
    if texts:
        rows, seen, skips = [], set(), Counter()
        for f in texts:
            if not Path(f).exists():
                raise ReduceError(f"reduce.py: --texts {f}: no such file")
            for t in data.read_texts(f, skips=skips):
                if t.strip() and t not in seen:  # exact duplicates once, blanks dropped
                    seen.add(t)
                    rows.append(t)
        if skips:
            print(f"[reduce] skipped input rows: {dict(skips)}", file=sys.stderr)
        if not rows:
            raise ReduceError(f"reduce.py: no usable text in {texts}")
    else:
        # default: data.py writes OUT/data/texts.jsonl (its recipe); only the texts are kept
        meta = data.build(out / "data", data_dir=data_dir, seed=seed, progress=False, **TEXT_RECIPE)
        rows = [json.loads(ln)["text"] for ln in (out / "data" / "texts.jsonl").read_text(encoding="utf-8").splitlines()
                if ln.strip()]
        print(f"[reduce] texts: data.py recipe over {meta.get('data_dir', data_dir or data.default_data_dir())}: "
              f"{len(rows):,} texts", file=sys.stderr)
    if max_texts and len(rows) > max_texts:  # a seeded sample, file order kept
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), max_texts))]
    body = "".join(json.dumps({"id": i, "text": t, "hash": data.text_hash(t)}, ensure_ascii=False) + "\n"
                   for i, t in enumerate(rows))
    if not path.exists() or path.read_text(encoding="utf-8") != body:  # unchanged texts keep the cache valid
        atomic_write(path, body)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model to reduce: any spec teachers.load_teacher reads (a "
                   "folder, 'all-MiniLM-L6-v2', 'DIR@dim=1024', ...); it stays frozen")
    p.add_argument("--out", required=True, help="output folder (texts, cache, heads, st-{d} folders)")
    p.add_argument("--dims", type=int, nargs="+", required=True, help="target dims, each < the model's dim")
    p.add_argument("--texts", nargs="+", default=None, help="unlabelled text files (jsonl 'text' field, txt, "
                   "parquet); default: data.py's recipe over the shared text folder (1-2 sentence pieces)")
    p.add_argument("--data-dir", default=None, help="shared data folder for the default texts "
                   "(default $JASPER_DATA_DIR or ../shared/data)")
    p.add_argument("--max-texts", type=int, default=None, help="a random subset of at most this many texts")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (all heads together)")
    p.add_argument("--batch", type=int, default=128, help="texts per step: the in-batch losses compare all pairs")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warmup 5%%, cosine)")
    p.add_argument("--loss-weights", type=float, nargs=2, default=[200.0, 20.0],
                   help="lambda2 (similarity, eq. 2), lambda3 (relative similarity, eq. 3); the paper's values")
    p.add_argument("--margin", type=float, default=0.015, help="margin of eq. 3")
    p.add_argument("--init", choices=list(INITS), default="random", help="head initialisation (module docstring; default chosen on STSBenchmark dev)")
    p.add_argument("--val-texts", type=int, default=1024, help="texts held out to report the heads' losses on")
    p.add_argument("--encode-batch", type=int, default=64, help="batch size of the encoding pass")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    t_start = time.time()
    out = Path(a.out)
    try:
        teacher = T.load_teacher(a.model)
    except (T.TeacherError, OSError, ValueError) as e:
        raise SystemExit(f"reduce.py: --model {a.model}: {e}")
    D = teacher.dim  # full dim of the cached vectors
    dims = sorted(set(a.dims), reverse=True)  # widest first, duplicates dropped
    bad = [d for d in dims if not 0 < d < D]
    if bad:
        raise SystemExit(f"reduce.py: --dims {bad}: every dim must be between 1 and the model's dim {D} - 1")
    if a.steps < 1 or a.batch < 2:  # eq. 2 / eq. 3 compare pairs within a batch
        raise SystemExit(f"reduce.py: need --steps >= 1 and --batch >= 2, got {a.steps} and {a.batch}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        texts = prepare_texts(out, a.texts, a.data_dir, a.max_texts, a.seed)
    except ReduceError as e:
        raise SystemExit(str(e))

    # 2. one encoding pass of the frozen model (resumable cache shards)
    t0 = time.time()
    build_cache([teacher], texts, out / "cache", batch_size=a.encode_batch, shard_size=4096)  # finished shards reused
    cache = TeacherCache(out / "cache")
    x = cache.targets(torch.arange(cache.n_rows))                  # (N, D) fp32, normalised
    t_encode = time.time() - t0
    n_val = min(a.val_texts, x.shape[0] // 10)  # at most 10% held out
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(a.seed))
    x_val, x_train = x[perm[:n_val]], x[perm[n_val:]]  # (n_val, D), (N - n_val, D)
    if x_train.shape[0] < a.batch:
        raise SystemExit(f"reduce.py: only {x_train.shape[0]} training texts after holding out {n_val}; need at "
                         f"least --batch {a.batch}")
    print(f"[reduce] {teacher.name}: {x.shape[0]:,} vectors of {D} dims ({fmt_duration(t_encode)}); training "
          f"heads {dims} on {x_train.shape[0]:,}, {n_val} held out", file=sys.stderr, flush=True)

    # 3. heads
    t0 = time.time()
    w, m = tuple(a.loss_weights), a.margin  # (lambda2, lambda3), margin of eq. 3
    heads = make_heads(x_train, dims, a.init, a.seed)  # pca/svd fit on train rows only
    vb = min(a.batch, max(2, n_val))  # the training m unless fewer are held out
    before = evaluate_heads(x_val, heads, w, m, vb, a.seed) if n_val >= 2 else {}  # the init's losses
    hist = train_heads(x_train, heads, a.steps, a.batch, a.lr, w, m, seed=a.seed)
    after = evaluate_heads(x_val, heads, w, m, vb, a.seed) if n_val >= 2 else {}  # same batches as before
    t_train = time.time() - t0

    # 4. export
    meta = dict(model=a.model, model_spec=teacher.spec, dim=D, dims=dims, n_texts=int(x.shape[0]), n_val=n_val,
                init=a.init, steps=a.steps, batch=a.batch, lr=a.lr, loss_weights=list(w), margin=m, seed=a.seed,
                input="the model's own output vectors, L2-normalised; reduced = normalize(weight @ x + bias)",
                val_losses_before={str(d): v for d, v in before.items()},
                val_losses_after={str(d): v for d, v in after.items()},
                times_s=dict(encode=round(t_encode, 1), train=round(t_train, 1)))
    save_heads(out, heads, meta)  # heads.json rewritten below with the exports
    exported = {}
    src = Path(teacher.spec.get("path", ""))  # the folder the model was read from
    # a standard folder only where the folder's own pipeline IS what was encoded: a sentence-transformers folder read
    # by teachers.SentenceTransformerTeacher, without a Matryoshka `dim=` cut or a prompt the folder does not apply
    why_not = ("not a sentence-transformers folder read by teachers.SentenceTransformerTeacher"
               if teacher.spec.get("family") not in ("sentence-transformers", "bert")
               or not (src / "modules.json").is_file() else
               "encoded with a dim= cut or a prompt that the folder itself does not apply"
               if teacher.spec.get("truncate_dim") or teacher.spec.get("prompt") else None)
    if why_not is None:
        for d in dims:
            exported[d] = str(export_sentence_transformers(src, out / f"st-{d}", heads[d], teacher.normalize))
    else:
        print(f"[reduce] no sentence-transformers export for {teacher.name}: {why_not}; heads saved to "
              f"{out / 'heads.safetensors'} only (apply with reduce.load_heads / reduce.apply_heads)",
              file=sys.stderr)
    meta["exported"] = {str(d): p for d, p in exported.items()}
    atomic_write(out / "heads.json", json.dumps(meta, indent=1) + "\n")  # now with "exported"
    for d in dims:
        if after:
            print(f"[reduce] dim {d}: held-out sim {before[d]['sim']:.5f} -> {after[d]['sim']:.5f}, resim "
                  f"{before[d]['resim']:.5f} -> {after[d]['resim']:.5f}" + (f" | {exported[d]}" if d in exported else ""),
                  file=sys.stderr)
    print(f"[reduce] done in {fmt_duration(time.time() - t_start)} (encode {fmt_duration(t_encode)}, heads "
          f"{fmt_duration(t_train)})", file=sys.stderr)
    return dict(meta=meta, heads=heads, history=hist)


if __name__ == "__main__":
    main(sys.argv[1:])
