"""Dimension reduction of a frozen model (reduce.py) vs truncation + renormalisation vs PCA: one table.

The model is frozen, so every evaluation text is encoded ONCE to the model's full vector (kept in WORK/vectors.pt,
reused by reruns) and every variant is derived from it:
  full            the model's own vectors (reproduces its published MTEB scores: a check of the setup)
  truncation d    the first d coordinates, renormalised (what a Matryoshka-less model offers for free)
  PCA d           the top-d principal directions fitted on the SAME unlabelled texts reduce.py trained on (its cache),
                  centred, renormalised
  reduce.py d     the heads reduce.py trained on those texts with L_sim + L_resim (eq. 2-3) against the full vectors
Tasks go through eval.py's evaluators: STS and SciFact by the built-in engine, Banking77 by MTEB's classification
evaluator (the MTEB protocol). Scores: STS cosine Spearman, SciFact nDCG@10, Banking77 accuracy, test splits.

    python reduce.py --model all-MiniLM-L6-v2 --dims 128 64 32 --out runs/minilm-reduced
    python bench/bench_reduce.py --reduced runs/minilm-reduced --work runs/bench_reduce
    python bench/bench_reduce.py --reduced runs/minilm-reduced --extra random=runs/minilm-reduced-random ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
import eval as E  # noqa: E402
import reduce as R  # noqa: E402
from checkpoints import atomic_write  # noqa: E402
from teacher_cache import TeacherCache  # noqa: E402

BUILTIN_TASKS = ("STSBenchmark", "STS12", "STS13", "BIOSSES", "SciFact")
MTEB_TASKS = ("Banking77Classification",)


class FrozenVectors:
    """The frozen model's full vectors, each text encoded once (memory + WORK/vectors.pt)."""

    def __init__(self, model: str, store: Path):
        self.enc = E.load_encoder(model)
        self.path, self.vec, self.n_new = store, {}, 0
        if store.exists():
            self.vec = torch.load(store, weights_only=True)

    def get(self, texts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self.vec))
        for i in range(0, len(todo), 2048):  # saved chunk by chunk: a killed run keeps what it encoded
            part = todo[i:i + 2048]
            out = self.enc.encode(part, batch_size=64, show_progress=False)
            self.vec.update(zip(part, out.float().clone()))
            self.n_new += len(part)
            print(f"[bench_reduce] encoded {i + len(part):,}/{len(todo):,} new texts", file=sys.stderr, flush=True)
            self.save()
        return torch.stack([self.vec[t] for t in texts])            # (N, D)

    def save(self):
        if self.n_new:
            atomic_write(self.path, lambda p: torch.save(self.vec, p))
            self.n_new = 0


class Variant:
    """An encoder for eval.py: full vectors -> fn -> (N, d), normalised."""

    uses_instructions = False

    def __init__(self, base: FrozenVectors, name: str, dim: int, fn):
        self.base, self.name, self.dim, self.fn, self.dims = base, name, dim, fn, (dim,)

    def encode(self, texts, dim=None, instruction=None, batch_size=64, show_progress=None):
        x = self.base.get(list(texts))
        return F.normalize(self.fn(x), dim=-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", required=True, help="reduce.py --out folder (heads + the cache of its texts)")
    p.add_argument("--extra", nargs="*", default=[], help="more reduce.py runs as LABEL=DIR (same model)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="the frozen model reduce.py reduced")
    p.add_argument("--work", default="runs/bench_reduce", help="keeps the eval texts' full vectors (vectors.pt)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS + MTEB_TASKS))
    p.add_argument("--split", default=None, help="split of the built-in tasks (default test; 'dev' for tuning)")
    p.add_argument("--out", default=None, help="write the table (markdown) and raw scores (json) here")
    a = p.parse_args(argv)
    data_dir = Path(a.data_dir) if a.data_dir else D.default_data_dir()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    heads = R.load_heads(a.reduced)
    meta = json.loads((Path(a.reduced) / "heads.json").read_text())
    dims = sorted(heads, reverse=True)
    x_fit = TeacherCache(Path(a.reduced) / "cache").targets(torch.arange(meta["n_texts"]))  # (N, D) its texts
    base = FrozenVectors(a.model, work / "vectors.pt")
    D_full = x_fit.shape[1]

    variants = [Variant(base, f"full ({D_full})", D_full, lambda x: x)]
    for d in dims:
        comp, mean = R.pca(x_fit, d)
        variants.append(Variant(base, f"truncation {d}", d, lambda x, d=d: x[:, :d]))
        variants.append(Variant(base, f"PCA {d}", d, lambda x, c=comp, m=mean: (x - m) @ c.T))
        variants.append(Variant(base, f"reduce.py {d}", d, lambda x, h=heads[d]: h(x)))
        for spec in a.extra:
            label, _, path = spec.partition("=")
            hx = R.load_heads(path)
            if d in hx:
                variants.append(Variant(base, f"reduce.py {label} {d}", d, lambda x, h=hx[d]: h(x)))
    builtin = [t for t in a.tasks if t not in MTEB_TASKS]
    mteb = [t for t in a.tasks if t in MTEB_TASKS]
    scores: dict[str, dict[str, float]] = {}
    t0 = time.time()
    for v in variants:
        scores[v.name] = {}
        with torch.no_grad():
            for tasks, engine, split in ((builtin, "builtin", a.split), (mteb, "mteb", None)):
                if not tasks:
                    continue
                rep = E.evaluate(E.EmbeddingCache(v, batch_size=256, show_progress=False), tasks, data_dir=data_dir,
                                 instructions="none", engine=engine, split=split)
                for t, per in rep["results"].items():
                    scores[v.name][t] = next(iter(per.values()))["main_score"]
        base.save()
        print(f"[bench_reduce] {v.name}: " + " ".join(f"{t} {s:.4f}" for t, s in scores[v.name].items())
              + f" ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    ref = json.loads((data_dir / "reference_scores.json").read_text())["scores"].get(
        "sentence-transformers/all-MiniLM-L6-v2", {}) if "minilm" in a.model.lower() else {}
    tasks = a.tasks
    short = {"Banking77Classification": "Banking77", "STSBenchmark": "STSB"}
    lines = [f"{a.model} reduced from {D_full} dims; reduce.py: {meta['n_texts']:,} unlabelled texts, init "
             f"{meta['init']}, {meta['steps']} steps of batch {meta['batch']}, lr {meta['lr']:g}, lambda2/lambda3 "
             f"{meta['loss_weights'][0]:g}/{meta['loss_weights'][1]:g}; PCA fitted on the same texts. "
             f"{a.split or 'test'} split (Banking77: test); STS cosine Spearman, SciFact nDCG@10, Banking77 accuracy.",
             "", "| method | dim | " + " | ".join(short.get(t, t) for t in tasks) + " | mean |",
             "|---|---:|" + "---:|" * (len(tasks) + 1)]
    if ref and not a.split:
        lines.append(f"| published (MTEB) | {D_full} | " + " | ".join(f"{ref[t]:.4f}" if t in ref else "-"
                                                                  for t in tasks) + " | |")
    for v in variants:
        s = scores[v.name]
        method = v.name.rsplit(" ", 1)[0] if not v.name.startswith("full") else "full"
        lines.append(f"| {method} | {v.dim} | " + " | ".join(f"{s[t]:.4f}" for t in tasks)
                     + f" | {sum(s.values()) / len(s):.4f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        atomic_write(Path(a.out).with_suffix(".md"), table + "\n")
        atomic_write(Path(a.out).with_suffix(".json"), json.dumps(dict(scores=scores, meta=meta), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
