"""Any sentence-transformers folder as a teacher (teachers.SentenceTransformerTeacher) vs sentence-transformers itself.

Every model here is built BY sentence-transformers (models.Transformer on a tiny random transformers body saved in the
hub layout, models.Pooling / Dense / Normalize, prompts) and saved with its own `save`, then encoded by the library
and by our teacher: vectors <= 1e-5 relative (fp32) for each body (BERT, Qwen2, Qwen3, Mistral) and pooling mode,
right and left padding, include_prompt true and false. Pooling itself is compared with the library's Pooling
module on random token states. The real all-MiniLM-L6-v2 parity lives in test_teachers.py.
"""
import json
import shutil

import numpy as np
import pytest
import torch

import checkpoints as C
import teachers as T
from common import minilm_dir, qwen_tokenizer_dir
from test_teachers_qwen import stella_dir  # noqa: F401  (fixture: a tiny stella-layout folder)

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

RTOL = 1e-5
TEXTS = ["The quick brown fox jumps over the lazy dog.", "a cat", "  leading and trailing spaces  ",
         "Qwen3 pads on the left; BERT on the right. " * 6, "What is the capital of France?", "ok",
         "naïve café — unicode ✓", "money flows to the river bank"]
H = 32


def _body(kind, **cfg_kw):
    """A tiny random transformers body of `kind` (norms perturbed so they matter)."""
    common = dict(hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=30522, **common, **cfg_kw)
        cls = transformers.BertModel
    else:
        dec = dict(vocab_size=151680, num_key_value_heads=2, tie_word_embeddings=False, **common)
        cfg, cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
                    "qwen3": (transformers.Qwen3Config, transformers.Qwen3Model),
                    "mistral": (transformers.MistralConfig, transformers.MistralModel)}[kind]
        if kind == "qwen3":
            dec["head_dim"] = 12  # != hidden / heads, as in the real Qwen3 models
        cfg = cfg(**dec, **cfg_kw)
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n.lower() or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return m


def _tokenizer_files(dst, kind, padding_side, eos):
    if kind == "bert":
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (minilm_dir() / f).is_file():
                shutil.copy(minilm_dir() / f, dst / f)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(qwen_tokenizer_dir() / f, dst / f)
        if eos:  # Qwen3-Embedding's tokenizer appends <|endoftext|> to every text (its last-token pooling reads it)
            tj = json.loads((dst / "tokenizer.json").read_text())
            tj["post_processor"] = {"type": "TemplateProcessing",
                                    "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                               {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                                    "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                             {"Sequence": {"id": "B", "type_id": 1}},
                                             {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                                    "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643],
                                                                         "tokens": ["<|endoftext|>"]}}}
            (dst / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    # a hub embedder's tokenizer_config carries no chat template for sentence-transformers to apply (folders that
    # do, the `message` modality: test_st_message.py)
    tc.pop("chat_template", None)
    tc["padding_side"] = padding_side
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))


def build_st(tmp, kind, pooling, include_prompt=True, dense=None, normalize=True, padding_side="right", eos=False,
             prompts=None, default_prompt_name=None, max_seq_length=24, drop_activation_key=False, **cfg_kw):
    """Build and save a sentence-transformers model with sentence-transformers; returns its folder."""
    from sentence_transformers import SentenceTransformer, models

    body_dir = tmp / f"{kind}_body"
    _body(kind, **cfg_kw).save_pretrained(body_dir)
    _tokenizer_files(body_dir, kind, padding_side, eos)
    mods = [models.Transformer(str(body_dir), max_seq_length=max_seq_length),
            models.Pooling(H, pooling_mode=pooling, include_prompt=include_prompt)]
    if dense is not None:
        torch.manual_seed(5)
        n_modes = 1 if isinstance(pooling, str) else len(pooling)
        mods.append(models.Dense(H * n_modes, 20, activation_function=dense))
    if normalize:
        mods.append(models.Normalize())
    model = SentenceTransformer(modules=mods, prompts=prompts, default_prompt_name=default_prompt_name,
                                device="cpu")
    out = tmp / "st"
    model.save(str(out))
    if drop_activation_key:
        dcfg = next(out.glob("*_Dense")) / "config.json"
        c = json.loads(dcfg.read_text())
        del c["activation_function"]
        dcfg.write_text(json.dumps(c))
    return out


def st_encode(folder, texts, **kw):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return torch.from_numpy(model.encode(texts, batch_size=3, convert_to_numpy=True, **kw)).float()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = {
    # name: (body, build kwargs, teacher spec options, sentence-transformers encode kwargs)
    "minilm-like": ("bert", dict(pooling="mean"), "", {}),
    "bge-like-cls-prompt": ("bert", dict(pooling="cls", prompts={"query": "Represent this sentence: "}),
                            "@prompt_name=query", dict(prompt_name="query")),
    "bert-cls-exclude-prompt-dense-tanh": ("bert", dict(pooling="cls", include_prompt=False, dense=torch.nn.Tanh(),
                                                        normalize=False, prompts={"q": "query: "}),
                                           "@prompt_name=q", dict(prompt_name="q")),
    "bert-max+mean": ("bert", dict(pooling=("max", "mean")), "", {}),
    "bert-weightedmean-sqrt": ("bert", dict(pooling=("weightedmean", "mean_sqrt_len_tokens"), include_prompt=False,
                                            prompts={"q": "query: "}, default_prompt_name="q"), "", {}),
    "qwen3-embedding-like": ("qwen3", dict(pooling="lasttoken", padding_side="left", eos=True,
                                           prompts={"query": "Instruct: Given a query\nQuery:", "document": ""}),
                             "@prompt_name=query", dict(prompt_name="query")),
    "qwen3-embedding-like-docs": ("qwen3", dict(pooling="lasttoken", padding_side="left", eos=True), "", {}),
    "qwen3-lasttoken-right": ("qwen3", dict(pooling="lasttoken", padding_side="right", eos=True), "", {}),
    "qwen3-bidir-mean-exclude-prompt": ("qwen3", dict(pooling="mean", include_prompt=False, is_causal=False,
                                                      prompts={"q": "Instruct: find\nQuery: "}, dense=None),
                                        "@prompt_name=q", dict(prompt_name="q")),
    "qwen3-cls-left-dense-identity": ("qwen3", dict(pooling="cls", padding_side="left",
                                                    dense=torch.nn.Identity()), "", {}),
    "qwen2-gte-like": ("qwen2", dict(pooling="lasttoken", padding_side="right", eos=True,
                                     prompts={"query": "Instruct: x\nQuery: "}), "@prompt_name=query",
                       dict(prompt_name="query")),
    "qwen2-stella-like-2_Dense": ("qwen2", dict(pooling="mean", dense=torch.nn.Identity(), is_causal=False), "", {}),
    "mistral-e5-like": ("mistral", dict(pooling="lasttoken", padding_side="left", eos=True), "", {}),
    "mistral-mean-exclude-prompt-left": ("mistral", dict(pooling="mean", include_prompt=False, padding_side="left",
                                                         prompts={"q": "Instruct: y\nQuery: "}),
                                         "@prompt_name=q", dict(prompt_name="q")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_sentence_transformers(tmp_path, case):
    kind, build_kw, opts, enc_kw = CASES[case]
    folder = build_st(tmp_path, kind, **build_kw)
    ref = st_encode(folder, TEXTS, **enc_kw)
    teacher = T.load_teacher(str(folder) + opts)
    assert isinstance(teacher, T.SentenceTransformerTeacher) and teacher.spec["body"] == kind
    ours = teacher.encode(TEXTS, batch_size=3)
    assert ours.shape == ref.shape and torch.isfinite(ours).all()
    err = rel(ours, ref)
    assert err <= RTOL, (case, err)
    if build_kw.get("include_prompt") is False and (enc_kw or build_kw.get("default_prompt_name")):
        assert teacher._instruction_tokens(None) > 0  # the exclusion really happened


def test_dense_without_activation_key_is_tanh(tmp_path):
    """A Dense config.json without `activation_function` means Tanh (the library's default), not Identity."""
    folder = build_st(tmp_path, "qwen3", pooling="mean", dense=torch.nn.Identity(), normalize=False,
                      drop_activation_key=True)
    ref = st_encode(folder, TEXTS[:4])
    t = T.load_teacher(str(folder))
    assert t.heads[0].act_name == "Tanh" and "Tanh" in t.spec["dense"][0]
    ours = t.encode(TEXTS[:4])
    assert rel(ours, ref) <= RTOL
    assert ours.abs().max() < 1  # tanh range: an Identity reading would not be bounded like this


def test_prompt_choice_and_errors(tmp_path):
    folder = build_st(tmp_path, "bert", pooling="mean", prompts={"query": "query: ", "passage": "passage: "},
                      default_prompt_name="passage")
    t = T.load_teacher(str(folder))
    assert t.prompt == "passage: " and t.prompt_name == "passage"  # default_prompt_name, as the library
    assert rel(t.encode(TEXTS[:3]), st_encode(folder, TEXTS[:3])) <= RTOL
    lit = T.load_teacher(str(folder) + "@prompt=query: ")
    assert lit.prompt == "query: " and rel(lit.encode(TEXTS[:3]), st_encode(folder, TEXTS[:3], prompt="query: ")) \
        <= RTOL
    with pytest.raises(T.TeacherError, match=r"no prompt named 'nope' \(prompts: \['document', 'passage', 'query'\]\)"):
        T.load_teacher(str(folder) + "@prompt_name=nope")
    with pytest.raises(T.TeacherError, match="causal=.*not a boolean"):
        T.load_teacher(str(folder) + "@causal=maybe")


def test_matryoshka_dim_truncates_and_renormalises(tmp_path):
    folder = build_st(tmp_path, "qwen3", pooling="lasttoken", padding_side="left", eos=True)
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(folder), device="cpu", truncate_dim=16).encode(
        TEXTS, convert_to_tensor=True, normalize_embeddings=True).float()
    t = T.load_teacher(str(folder) + "@dim=16")
    assert t.dim == 16 and t.name.endswith("-16")
    assert rel(t.encode(TEXTS), ref) <= RTOL
    with pytest.raises(T.TeacherError, match="dim=64 asked but the model gives 32 dims"):
        T.load_teacher(str(folder) + "@dim=64")


def test_unknown_module_and_layout_refused(tmp_path):
    folder = build_st(tmp_path, "bert", pooling="mean")
    mf = folder / "modules.json"
    mods = json.loads(mf.read_text())
    mods.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    mf.write_text(json.dumps(mods))
    with pytest.raises(T.TeacherError, match=r"modules\.json: module 2 '2' \(sentence_transformers\.models\.LayerNorm"
                                             r", path '2_LayerNorm'\): module type not supported"):
        T.load_teacher(str(folder))
    mf.write_text(json.dumps([m for m in mods if not m["type"].endswith(("LayerNorm", "Pooling"))]))
    with pytest.raises(T.TeacherError, match="Normalize before any Pooling"):
        T.load_teacher(str(folder))
    # the reader lives in checkpoints.py: its own CheckpointError unless the caller (teachers.py) names another type
    with pytest.raises(C.CheckpointError, match="Normalize before any Pooling"):
        C.read_st_layout(folder)
    with pytest.raises(T.TeacherError, match="Normalize before any Pooling"):
        C.read_st_layout(folder, T.TeacherError)
    cfg = folder / "config.json"
    c = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**c, "model_type": "roberta"}))
    mf.write_text(json.dumps(mods[:2]))
    with pytest.raises(T.TeacherError, match=r"config\.json: model_type 'roberta' is not a supported"):
        T.SentenceTransformerTeacher(folder)


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("prompt_length", [0, 3])
def test_pool_tokens_equals_library_pooling(left, prompt_length):
    """teachers.pool_tokens vs sentence-transformers' Pooling.forward on random states, every mode and a combination."""
    from sentence_transformers.models import Pooling

    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 7, 5]
    B, Tn = len(lengths), max(lengths)
    h = torch.randn(B, Tn, 6, generator=g)
    mask = torch.zeros(B, Tn, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, Tn - n:] = 1 if left else 0
        if not left:
            mask[i, :n] = 1
    for modes in [*T.POOLING_MODES, ("cls", "lasttoken", "mean")]:
        pool = Pooling(6, pooling_mode=modes, include_prompt=prompt_length == 0)
        feats = {"token_embeddings": h, "attention_mask": mask}
        if prompt_length:
            feats["prompt_length"] = prompt_length
        ref = pool(feats)["sentence_embedding"]
        ours = T.pool_tokens(h, mask, modes, prompt_length)
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(ours)), modes  # max over nothing is -inf in both
        assert torch.allclose(ours[fin], ref[fin], atol=1e-6), modes


def test_cache_mixes_qwen3_st_teacher_and_stella(tmp_path, stella_dir):  # noqa: F811
    """Multi-teacher targets from a tiny Qwen3-Embedding-layout teacher and a tiny stella-layout teacher, cached:
    each teacher's rows equal its own encode, and the targets are the normalised concatenation."""
    folder = build_st(tmp_path, "qwen3", pooling="lasttoken", padding_side="left", eos=True,
                      prompts={"query": "Instruct: q\nQuery:"})
    qwen3 = T.load_teacher(str(folder))
    stella = T.load_teacher(f"{stella_dir[0]}@dim=48")
    assert isinstance(stella, T.StellaTeacher) and T.detect_family(folder) == "st"
    texts = ["the cat sat on the mat", "money flows", "what is the river bank ?", "a quick brown fox",
             "the lazy dog", "how are passages retrieved ?", "dog", "query : fox"]
    from data import text_hash

    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": t, "hash": text_hash(t)}) + "\n" for i, t in enumerate(texts)))
    T.build_cache([qwen3, stella], inp, tmp_path / "cache", batch_size=3, shard_size=5, show_progress=False)
    cache = T.TeacherCache(tmp_path / "cache")
    assert cache.teachers == [qwen3.name, stella.name] and cache.dim == 32 + 48
    man = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert man["teachers"][0]["spec"]["family"] == "sentence-transformers"
    assert man["teachers"][0]["spec"]["pooling"] == "lasttoken"
    got = cache.targets(np.arange(len(texts)))
    want = T.MultiTeacher([qwen3, stella]).encode(texts, batch_size=3)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got[:, :32] / got[:, :32].norm(dim=-1, keepdim=True), qwen3.encode(texts), atol=1e-6)
