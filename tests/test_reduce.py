"""reduce.py: dimension reduction of a frozen model from unlabelled text (sec. 2.4's proposal).

A tiny random BERT saved as a real sentence-transformers folder (transformers writes the encoder, the folder layout is
sentence-transformers' own: modules.json, 1_Pooling, 2_Normalize) is reduced end to end on real text; the exported
folders must load in sentence-transformers and reproduce reduce.py's vectors. PCA is checked against numpy's SVD.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reduce as R
import teachers as T
from teacher_cache import TeacherCache
from common import minilm_dir


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT on MiniLM's real WordPiece vocabulary, in all-MiniLM-L6-v2's own
    sentence-transformers layout (modules.json: Transformer, Pooling (mean), Normalize)."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_st") / "st"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    src = minilm_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json"):
        shutil.copy(src / f, d / f)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    pool = json.loads((src / "1_Pooling" / "config.json").read_text())
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**pool, "word_embedding_dimension": 32}))
    return d


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory, data_dir) -> Path:
    rows = [json.loads(ln)["text"] for ln in (data_dir / "text" / "short.jsonl").read_text().splitlines()[:600]]
    p = tmp_path_factory.mktemp("reduce_texts") / "texts.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows) + '{"text": ""}\n{"nope": 1}\n')
    return p


def test_pca_matches_numpy_svd():
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(500, 24, generator=gen) * torch.linspace(3, 0.1, 24), dim=-1)
    comp, mean = R.pca(x, 5)
    xc = (x - x.mean(0)).double().numpy()
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = vt[:5]                                                     # (5, D), decreasing singular values
    assert np.allclose(mean.numpy(), x.mean(0).numpy(), atol=1e-6)
    # same directions up to sign, in the same order
    assert np.allclose(np.abs(np.sum(comp.double().numpy() * ref, axis=1)), 1.0, atol=1e-6)
    with pytest.raises(R.ReduceError, match="0 < d <= D"):
        R.pca(x, 25)


def test_reduce_end_to_end_exports_a_sentence_transformers_folder(tiny_st, texts_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "red"
    res = R.main(["--model", str(tiny_st), "--texts", str(texts_file), "--dims", "16", "8", "--out", str(out),
                  "--steps", "60", "--batch", "32", "--lr", "3e-3", "--val-texts", "64"])
    meta = json.loads((out / "heads.json").read_text())
    lines = [json.loads(ln) for ln in texts_file.read_text().splitlines()]
    n = len({r["text"] for r in lines if r.get("text")})   # duplicates dropped, the empty and field-less rows skipped
    assert n < 600 and meta["dims"] == [16, 8] and meta["n_texts"] == n and meta["dim"] == 32
    # heads trained: moved away from their PCA start, and the held-out loss went down for each
    x = TeacherCache(out / "cache").targets(torch.arange(n))
    heads = R.load_heads(out)
    for d in (16, 8):
        comp, _ = R.pca(x, d)  # ~ the start (fitted on the training part of x)
        assert (heads[d].weight - comp).abs().max() > 1e-2
        before, after = meta["val_losses_before"][str(d)], meta["val_losses_after"][str(d)]
        assert 200 * after["sim"] + 20 * after["resim"] < 200 * before["sim"] + 20 * before["resim"]
    assert set(res["heads"]) == {16, 8}
    # the exported folders load in sentence-transformers and reproduce reduce.py's vectors
    probe = ["A man is playing a guitar.", "How do I activate my new card?", "The cat sat on the mat, quietly."]
    full = T.load_teacher(str(tiny_st)).encode(probe)
    ours = R.apply_heads(full, heads)
    for d in (16, 8):
        folder = out / f"st-{d}"
        mods = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
        assert mods == ["Transformer", "Pooling", "Normalize", "Dense", "Normalize"]
        st = SentenceTransformer(str(folder), device="cpu")
        ref = torch.from_numpy(st.encode(probe, convert_to_numpy=True))
        assert ref.shape == (3, d)
        assert torch.allclose(ours[d], ref, atol=2e-5), (ours[d] - ref).abs().max()
        # and this project's own sentence-transformers reader (teachers.py, eval.py --model) reads it too
        own = T.load_teacher(str(folder)).encode(probe)
        assert own.shape == (3, d) and torch.allclose(own, ref, atol=2e-5)


def test_reduce_bad_inputs(tiny_st, texts_file, tmp_path):
    base = ["--model", str(tiny_st), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"--dims \[32\].*model's dim 32"):
        R.main(base + ["--dims", "32", "--texts", str(texts_file)])
    with pytest.raises(SystemExit, match="no such file"):
        R.main(base + ["--dims", "8", "--texts", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="--model"):
        R.main(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--dims", "8"])
    with pytest.raises(R.ReduceError, match="heads.safetensors"):
        R.load_heads(tmp_path)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(20)))
    with pytest.raises(SystemExit, match="need at least --batch 32"):
        R.main(base + ["--dims", "8", "--texts", str(few), "--batch", "32"])
