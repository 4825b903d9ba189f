"""Packed sequences (packing.py): texts laid end to end in rows of a token budget, block-diagonal attention,
positions restarting per text, per-text pooling, against the padded path (one text per row, right padding) as the
reference. Vectors and gradients agree to <= 1e-5 relative in fp32 for every body (Qwen2, Qwen3 and Mistral,
bidirectional and causal; BERT; the student with its heads; NV-Embed's latent attention with the instruction tokens
left out), on length mixes with 1-token texts, texts that fill a whole row, and everything in between. TrainLoader's
packed batches hold the same texts as its padded ones, and a training loss computed on them is the same."""
import json
import math
import random

import pytest
import torch

import bert as B
import model as M
import teachers as T
from packing import Packed, plan_rows
from tokenizer import pad_ids
from test_teachers_qwen import nvembed_dir, stella_dir  # noqa: F401  (tiny NV-Embed / stella checkpoints)

RTOL = 1e-5
BUDGET = 24
# two texts fill a row alone (24), several 1-token texts, and a mix that leaves FFD gaps to fill
LENGTHS = [1, 24, 7, 1, 13, 24, 3, 9, 2, 17, 5, 1, 11]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _ids(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _pad(ids, pad_id=0):
    return pad_ids(ids, pad_id)


def _perturb(module, seed):
    """Random init leaves norms at 1 and biases at 0; perturb them so a wrong mask or position cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _compare_grads(g_pad, g_packed):
    """Every parameter's gradient, relative to its own largest entry; a gradient that is mathematically zero
    (queries and keys when every text has one token: a softmax over one key ignores them) is only rounding noise,
    so it is measured on the scale of the whole model's gradient (1% of its largest entry) instead."""
    assert g_pad.keys() == g_packed.keys() and g_pad
    scale = max(g.abs().max().item() for g in g_pad.values())
    for n, g in g_pad.items():
        err = (g_packed[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-2 * scale)
        assert err <= RTOL, (n, err)


def _padded_pool(h, mask, mode, skip_first=0):
    if mode == "cls":
        return h[:, 0].float()
    if mode == "last":
        return h[torch.arange(h.shape[0]), mask.sum(1) - 1].float()
    m = mask.clone()
    m[:, :skip_first] = 0
    return M.mean_pool(h, m)


# ------------------------------------------------------------------------------------------------------------------
# the row planner and the packed layout
# ------------------------------------------------------------------------------------------------------------------
def test_plan_rows_uses_every_text_once_within_budget_and_is_deterministic():
    rng = random.Random(0)
    for _ in range(300):
        n, budget = rng.randint(1, 48), rng.randint(1, 64)
        lengths = [rng.randint(0, budget) for _ in range(n)]
        rows = plan_rows(lengths, budget)
        assert sorted(i for r in rows for i in r) == list(range(n))
        fills = [sum(lengths[i] for i in r) for r in rows]
        assert max(fills) <= budget
        # first-fit decreasing needs at most 11/9 OPT + 6/9 rows, and OPT >= ceil(total / budget)
        assert len(rows) <= 11 / 9 * max(1, math.ceil(sum(lengths) / budget)) + 6 / 9
        assert plan_rows(lengths, budget) == rows
    # rows end level: 6 texts of 10 tokens in rows of <= 32 -> 2 rows of 30, not 3 + 3 ... or 30 + 30
    assert sorted(sum([10] * len(r)) for r in plan_rows([10] * 6, 32)) == [30, 30]
    # balancing: 5 texts of 100 at budget 512 fit one row; 7 texts of 100 need 2 rows of <= 400, not 500 + 200
    rows = plan_rows([100] * 7, 512)
    assert len(rows) == 2 and max(len(r) for r in rows) * 100 <= 400
    # a text longer than the budget gets a row of its own
    rows = plan_rows([5, 30, 5], 16)
    assert [1] in rows and len(rows) == 2


def test_packed_layout_positions_and_segments():
    ids = _ids(LENGTHS, 50)
    p = Packed.from_ids(ids, BUDGET, pad_id=0)
    R, L = p.input_ids.shape
    assert L <= BUDGET and p.n_texts == len(ids) and p.n_tokens == sum(LENGTHS)
    assert p.n_tokens / p.numel() >= 0.9  # 127 tokens in 6 rows of 24 (the lower bound)
    flat_ids, flat_pos, flat_seq = p.input_ids.view(-1), p.position_ids.view(-1), p.seq_ids.view(-1)
    for i, x in enumerate(ids):
        s, n = int(p.starts[i]), len(x)
        assert flat_ids[s:s + n].tolist() == x
        assert flat_pos[s:s + n].tolist() == list(range(n))
        assert (flat_seq[s:s + n] == i).all()
    assert int((flat_seq >= 0).sum()) == sum(LENGTHS)
    mask = p.attention_mask(causal=False)[:, 0]  # (R, L, L)
    for r in range(R):
        for q in range(L):
            for k in range(L):
                same = int(p.seq_ids[r, q]) == int(p.seq_ids[r, k])
                assert bool(mask[r, q, k]) == same
    causal = p.attention_mask(causal=True)[:, 0]
    assert torch.equal(causal, mask & torch.ones(L, L, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="exactly once"):
        Packed.from_ids(ids[:2], BUDGET, rows=[[0]])


# ------------------------------------------------------------------------------------------------------------------
# Qwen2 / Mistral bodies and the student
# ------------------------------------------------------------------------------------------------------------------
def _qwen2(causal, kind="qwen2", seed=0):
    """A tiny body: qwen2 (q/k/v bias), mistral (no bias) or qwen3 (no bias, per-head q/k RMSNorm, head_dim != H/nh)."""
    extra = {"qwen2": dict(attention_bias=True), "mistral": dict(attention_bias=False),
             "qwen3": dict(attention_bias=False, qk_norm=True, head_dim=12)}[kind]
    cfg = M.Qwen2Config(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0, causal=causal,
                        model_type=kind, **extra)
    torch.manual_seed(seed)
    enc = M.Qwen2Encoder(cfg)
    _perturb(enc, seed + 1)
    return enc


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
def test_qwen2_qwen3_mistral_body_packed_equals_padded(kind, causal, mode):
    _assert_packed_equals_padded(_qwen2(causal, kind), _ids(LENGTHS, 61, seed=2), mode)


def _assert_packed_equals_padded(body, ids, mode):
    """Pooled vectors and every parameter gradient of a fixed linear read-out: packed == padded."""
    w = torch.randn(len(ids), 48, generator=torch.Generator().manual_seed(3))  # a fixed linear read-out
    input_ids, mask = _pad(ids)
    ref = _padded_pool(body(input_ids, mask), mask, mode)
    (ref * w).sum().backward()
    g_ref = _grads(body)
    body.zero_grad()
    p = Packed.from_ids(ids, BUDGET)
    got = p.pool(body(packed=p), mode)
    (got * w).sum().backward()
    assert rel(got, ref) <= RTOL
    _compare_grads(g_ref, _grads(body))


@pytest.mark.parametrize("modes", [("lasttoken",), ("cls",), ("mean",), ("max", "mean_sqrt_len_tokens", "weightedmean")])
def test_unpacked_states_pool_like_padded_in_every_sentence_transformers_mode(modes):
    """The sentence-transformers teacher runs its body packed and pools the unpacked states with teachers.pool_tokens:
    every pooling mode, with the prompt excluded or not, against a causal Qwen3 body padded right and left."""
    enc = _qwen2(True, "qwen3")
    ids = _ids(LENGTHS, 61, seed=6)
    p = Packed.from_ids(ids, BUDGET)
    h, m = p.unpack(enc(packed=p))
    for left in (False, True):
        input_ids, mask = pad_ids(ids, 0, left=left)
        hp = enc(input_ids, mask)
        for prompt_length in (0, 2):
            ref = T.pool_tokens(hp, mask, modes, prompt_length)
            got = T.pool_tokens(h, m, modes, prompt_length)
            # a text no longer than the prompt has nothing left to pool: max gives -inf, and padded CLS reads
            # position 0 (a real token under right padding, a padding slot under left): not defined, not compared
            keep = torch.tensor(LENGTHS) > prompt_length
            assert rel(got[keep], ref[keep]) <= RTOL, (left, prompt_length)


def test_causal_packing_is_not_bidirectional():
    """The test can tell the masks apart: a causal body's packed vectors differ from a bidirectional one's."""
    ids = _ids(LENGTHS, 61, seed=2)
    p = Packed.from_ids(ids, BUDGET)
    a = p.pool(_qwen2(True)(packed=p))
    b = p.pool(_qwen2(False)(packed=p))
    assert rel(a, b) > 1e-2


def test_student_with_heads_packed_equals_padded():
    text = M.Qwen2Config(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0)
    torch.manual_seed(0)
    student = M.JasperModel(M.JasperConfig(text=text, head_dims=(64, 32, 16), max_length=BUDGET))
    _perturb(student, 1)
    rng = random.Random(5)
    for lengths in (LENGTHS, [BUDGET] * 3, [1] * 7, [rng.randint(1, BUDGET) for _ in range(40)]):
        ids = _ids(lengths, 61, seed=len(lengths))
        ws = {D: torch.randn(len(ids), D, generator=torch.Generator().manual_seed(D)) for D in (64, 32, 16)}
        input_ids, mask = _pad(ids)
        ref = student(input_ids, mask)
        sum((ref[D] * ws[D]).sum() for D in ref).backward()
        g_ref = _grads(student)
        student.zero_grad()
        got = student(packed=Packed.from_ids(ids, BUDGET))
        sum((got[D] * ws[D]).sum() for D in got).backward()
        assert got.keys() == ref.keys()
        for D in ref:
            assert rel(got[D], ref[D]) <= RTOL, (lengths, D)
        _compare_grads(g_ref, _grads(student))
        student.zero_grad()


def test_student_packed_refuses_images():
    text = M.Qwen2Config(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=2)
    student = M.JasperModel(M.JasperConfig(text=text, head_dims=(16,), max_length=BUDGET))
    p = Packed.from_ids(_ids([3, 4], 61), BUDGET)
    with pytest.raises(ValueError, match="packed"):
        student(packed=p, pixel_values=torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------------------------
# teachers: BERT (real all-MiniLM-L6-v2 and a random tiny one for gradients), stella, NV-Embed
# ------------------------------------------------------------------------------------------------------------------
SENTENCES = ["a", "The cat sat on the mat.", "Money flows into the river bank when the rain comes down hard.",
             "why?", "Dogs bark. Cats meow. Birds sing in the morning and the evening, every single day of spring.",
             "ok", "The quick brown fox jumps over the lazy dog near the old mill by the water."]


def test_bert_teacher_packed_equals_padded_on_real_minilm():
    t = T.load_teacher("all-MiniLM-L6-v2", max_length=16)  # 16 tokens: long sentences fill a row, short ones share
    texts = SENTENCES * 3
    ref = t.encode(texts, batch_size=8, packing=False)
    got = t.encode(texts, batch_size=8, packing=True)
    assert rel(got, ref) <= RTOL


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_bert_body_packed_equals_padded_with_gradients(mode):
    cfg = B.BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=80, max_position_embeddings=BUDGET)
    torch.manual_seed(0)
    bert = B.BertModel(cfg)
    for m in bert.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.2)
    _perturb(bert, 1)
    _assert_packed_equals_padded(bert, _ids(LENGTHS, 61, seed=4), mode)


TEXTS = ["the quick brown fox jumps over the lazy dog .", "a", "money flows", "how is the river bank ?",
         "what are passages that answer the query", "the cat sat on the mat . the dog sat on the cat ."]


def test_stella_teacher_packed_equals_padded(stella_dir):  # noqa: F811
    t = T.load_teacher(str(stella_dir[0]), dim=48, max_length=12)
    for instruction in (None, "retrieve passages"):
        ref = t.encode(TEXTS * 2, batch_size=4, instruction=instruction, packing=False)
        got = t.encode(TEXTS * 2, batch_size=4, instruction=instruction, packing=True)
        assert rel(got, ref) <= RTOL


def test_nvembed_teacher_packed_equals_padded_instruction_tokens_left_out(nvembed_dir):  # noqa: F811
    t = T.load_teacher(str(nvembed_dir[0]), max_length=16)
    for instruction in (None, "retrieve passages that answer the query"):
        ref = t.encode(TEXTS * 2, batch_size=4, instruction=instruction, packing=False)
        got = t.encode(TEXTS * 2, batch_size=4, instruction=instruction, packing=True)
        assert rel(got, ref) <= RTOL
    # the instruction tokens really are left out of the pooling (the test can tell)
    t.mask_instruction = False
    unmasked = t.encode(TEXTS, instruction="retrieve passages that answer the query", packing=True)
    t.mask_instruction = True
    masked = t.encode(TEXTS, instruction="retrieve passages that answer the query", packing=True)
    assert rel(unmasked, masked) > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# TrainLoader: packed batches hold the padded batches' texts; the training loss is the same
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loader_texts(data_dir, tmp_path_factory):
    import data
    out = tmp_path_factory.mktemp("texts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JASPER_CACHE_DIR", str(out / "cache"))
        data.build(out, n_texts=400, seed=3, data_dir=data_dir, progress=False)
    return out / "texts.jsonl"


@pytest.fixture(scope="module")
def minilm_tok():
    return M.TextTokenizer.from_pretrained(T.minilm_path(), max_length=512)


@pytest.mark.parametrize("world,micro", [(1, 3), (2, 16)])
def test_trainloader_packed_batches_hold_the_padded_texts(loader_texts, minilm_tok, world, micro, monkeypatch,
                                                           tmp_path):
    import data
    monkeypatch.setenv("JASPER_CACHE_DIR", str(tmp_path))
    texts = {json.loads(x)["id"]: json.loads(x)["text"] for x in open(loader_texts, encoding="utf-8")}

    def make(packing, rank):
        return data.TrainLoader(loader_texts, minilm_tok, global_batch=32, max_length=40, seed=5, rank=rank,
                                world_size=world, micro_batch=micro, packing=packing)

    for step in range(3):  # the same global batch (all ranks together) packed or padded
        rows = {p: sorted(r for rank in range(world) for r in make(p, rank).batch_at(0, step).rows.tolist())
                for p in (False, True)}
        assert rows[False] == rows[True]
    for rank in range(world):
        padded, packed = make(False, rank), make(True, rank)
        for step in range(3):
            a, b = padded.batch_at(0, step), packed.batch_at(0, step)
            assert b.chunks == [] and a.packed is None
            # fewer slots per real token packed (which rank holds which text differs between the two plans)
            assert b.n_processed / b.n_tokens <= a.n_processed / a.n_tokens
            assert torch.equal(b.input_ids, packed.batch_at(0, step).input_ids)  # a pure function of the step
            # texts in the order the packed micro-batches hold them == the order of rows / hashes
            got = []
            for p in b.packed:
                assert p.input_ids.shape[0] <= micro and p.input_ids.shape[1] <= 40
                flat = p.input_ids.view(-1)
                got += [flat[s:s + n].tolist() for s, n in zip(p.starts.tolist(), p.lengths.tolist())]
            assert got == minilm_tok.encode_ids([texts[r] for r in b.rows.tolist()], max_length=40)
            assert b.hashes == [data.text_hash(texts[r]) for r in b.rows.tolist()]


def test_training_loss_and_gradients_same_packed_or_padded(loader_texts, minilm_tok, monkeypatch, tmp_path):
    """One stage-3 step's loss (eq. 1-4 over every head) and gradients from packed and from padded batches."""
    import data
    import losses
    monkeypatch.setenv("JASPER_CACHE_DIR", str(tmp_path))
    text = M.Qwen2Config(vocab_size=minilm_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    torch.manual_seed(0)
    student = M.JasperModel(M.JasperConfig(text=text, head_dims=(48, 32, 16), max_length=40))
    _perturb(student, 1)
    teacher_of = torch.nn.functional.normalize(torch.randn(400, 48, generator=torch.Generator().manual_seed(1)), dim=-1)
    res = {}
    for packing in (False, True):
        ld = data.TrainLoader(loader_texts, minilm_tok, global_batch=24, max_length=40, seed=2, micro_batch=4,
                              packing=packing)
        b = ld.batch_at(0, 1)
        outs = ([student(packed=p) for p in b.packed] if packing else
                [student(ids, mask) for ids, mask in b.chunks])
        vec = {D: torch.cat([o[D] for o in outs]) for D in (48, 32, 16)}
        loss, _ = losses.distill_loss(3, vec, teacher_of[b.rows], weights=(10.0, 200.0, 20.0))
        loss.backward()
        res[packing] = (loss.detach(), _grads(student))
        student.zero_grad()
    assert rel(res[True][0], res[False][0]) <= RTOL
    _compare_grads(res[False][1], res[True][1])
