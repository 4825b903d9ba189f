"""Tiny, fast inputs for the train.py tests: a tiny random Jasper student saved in the HF layout,
a small texts.jsonl materialised by data.py from the real shared text, and a real all-MiniLM-L6-v2 teacher cache.

Kept small on purpose (2 CPU cores shared by the whole team): hidden 32, 2-4 layers, heads (384, 64, 32, 16) where
FC1 = 384 matches MiniLM's width, so eq. 1's cosine loss applies as in the paper (FC1 width == teacher width).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import qwen_tokenizer_dir

import data
import model as M
import teachers
from teacher_cache import build_cache
from vision import IMG_END_ID, IMG_START_ID, IMG_TOKEN_ID, SiglipVisionConfig

ROOT = Path(__file__).resolve().parents[1]
TEACHER_DIM = 384  # all-MiniLM-L6-v2
HEADS = (TEACHER_DIM, 64, 32, 16)




def make_tiny_jasper(out: Path, layers: int = 4, vision: bool = True, seed: int = 0, hidden: int = 32,
                     intermediate: int = 64, heads: int = 4, kv_heads: int = 2, head_dims=HEADS) -> Path:
    """A tiny random JasperModel (real Qwen tokenizer, bidirectional Qwen2 body, optional tiny SigLIP tower whose
    4 patches pool into 4 image tokens) written with save_pretrained: a valid --init for train.py."""
    torch.manual_seed(seed)
    tok = M.TextTokenizer.from_pretrained(qwen_tokenizer_dir(), max_length=64)
    text = M.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=None, rope_theta=10000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=512, attention_bias=True, causal=False)
    vis = (SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14) if vision else None)
    ids = tok.image_token_ids or (IMG_START_ID, IMG_TOKEN_ID, IMG_END_ID)
    cfg = M.JasperConfig(text=text, vision=vis, head_dims=tuple(head_dims), img_start_token_id=ids[0],
                         img_token_id=ids[1], img_end_token_id=ids[2], num_image_tokens=4, max_length=64)
    m = M.JasperModel(cfg)
    m.model.init_weights()
    if m.vision_model is not None:
        m.vision_model.init_weights()
    m.save_pretrained(out, tokenizer=tok)
    return out


def make_texts(out: Path, n: int = 256, seed: int = 0) -> Path:
    data.build(out, n_texts=n, seed=seed, progress=False)
    return out / "texts.jsonl"


def make_cache(texts: Path, out: Path) -> Path:
    build_cache(["minilm@max_length=64"], texts, out, batch_size=64, show_progress=False, load=teachers.load_teacher)
    return out


def make_text_assets(d: Path, layers: int, n_texts: int) -> dict:
    """What a text-stage run needs, under d: a tiny text-only student (init/), n real texts (data/texts.jsonl) and
    their MiniLM teacher cache (cache/)."""
    texts = make_texts(d / "data", n=n_texts)
    return dict(root=d, init=make_tiny_jasper(d / "init", layers=layers, vision=False), texts=texts,
                cache=make_cache(texts, d / "cache"))


def make_images(out: Path, broken: int = 0) -> Path:
    """Real photographs shipped with scikit-image, saved as PNG, with hand-written captions. `broken` > 0 replaces
    the last `broken` images by files of garbage bytes (decoding fails: the loader must drop and count them)."""
    from PIL import Image
    from skimage import data as sk
    pairs = [("astronaut", "An astronaut in a white spacesuit holding a helmet, with an American flag behind."),
             ("chelsea", "A tabby cat looking to the side."),
             ("coffee", "A cup of coffee on a saucer, seen from above."),
             ("rocket", "A rocket on a launch pad under a clear sky."),
             ("cat", "A close-up of a cat's face."),
             ("immunohistochemistry", "A microscope image of stained tissue."),
             ("hubble_deep_field", "A deep field image of many distant galaxies."),
             ("retina", "A photograph of the back of a human eye, showing blood vessels.")]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cap in pairs:
        img = getattr(sk, name)()
        Image.fromarray(img).convert("RGB").save(out / f"{name}.png")
        rows.append({"image": f"{name}.png", "caption": cap})
    for r in rows[len(rows) - broken:]:
        (out / r["image"]).write_bytes(b"not a png" * 10)
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage4_args(d: Path, broken: int, micro_batch: int) -> list[str]:
    """train.py flags for 3 fp32 steps of stage 4 on a tiny student with a SigLIP tower and the 8 real photographs
    of make_images, `broken` of them garbage (without --out)."""
    init = make_tiny_jasper(d / "init", layers=2, vision=True)
    images = make_images(d / "images", broken=broken)
    return ["--stage", "4", "--init", str(init), "--images", str(images), "--batch", "8", "--micro-batch",
            str(micro_batch), "--steps", "3", "--lr", "1e-3", "--image-size", "28", "--num-workers", "0", "--dtype",
            "fp32", "--ckpt-every", "0", "--no-export"]


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True, **kw):
    """train.py through its CLI: plain python (nproc=1) or torchrun --standalone --nproc_per_node N."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args]
    p = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
