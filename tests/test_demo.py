"""The demo (issue 9): a shortened `python demo.py` end to end on the real shared text and the real all-MiniLM-L6-v2
teacher: data.py build -> teacher cache -> stages 1-3 through train.train() -> eval.py.

The full demo (~1,500 steps, ~70k texts) is the README's command; here the same code path runs on 2,000 texts
for 100 steps and must beat the untrained student of the same shape (same init: copied teacher embeddings,
identity residual branches) on STSBenchmark dev by a clear margin.
"""
from __future__ import annotations

import json

import pytest
import torch

import demo as DM
import model as M
import teachers as T
from checkpoints import read_safetensors
from teacher_cache import TeacherCache


def test_demo_student_init_is_a_bag_of_teacher_embeddings():
    """Identity residual branches (o_proj/down_proj = 0) + copied LN(word + type_0) embeddings: the untrained body
    returns RMSNorm of the copied embedding of each token, whatever its neighbours."""
    tdir = T.minilm_path()
    s = DM.make_demo_student(tdir, max_length=32)
    assert isinstance(s.model, M.Qwen2Encoder) and len(s.model.layers) == 4 and s.config.head_dims == (384, 256,
                                                                                                         128, 64)
    st = read_safetensors(tdir)
    pre = "bert." if any(k.startswith("bert.embeddings.") for k in st) else ""
    word = st[pre + "embeddings.word_embeddings.weight"]
    ref = torch.nn.functional.layer_norm(word + st[pre + "embeddings.token_type_embeddings.weight"][0], (384,),
                                         st[pre + "embeddings.LayerNorm.weight"], st[pre + "embeddings.LayerNorm.bias"],
                                         eps=1e-12)
    torch.testing.assert_close(s.model.embed_tokens.weight, ref, rtol=1e-5, atol=1e-6)
    ids, mask = s.tokenizer(["a man is playing a guitar .", "tiny"])
    with torch.no_grad():
        h = s.model(ids, mask)  # (2, T, 384)
    e = s.model.embed_tokens(ids)
    want = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(h[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_demo_student_and_schedule_options():
    """--student (issue 27) and --schedule (issue 25): the demo's own flags, split off before train.py's flags. Each
    student brings its schedule (qwen2: stage 3 from step 1; minilm-3, a student that starts as an embedder: the
    paper's stages) and its own defaults; --schedule and train.py flags still override them."""
    assert DM.split_student(["--steps", "5"]) == ("qwen2", "direct", ["--steps", "5"])
    student, schedule, rest = DM.split_student(["--student", "minilm-3", "--lr", "1e-4"])
    assert (student, schedule, rest) == ("minilm-3", "paper", ["--lr", "1e-4"])
    cfg = DM.parse_args(rest, student, schedule)
    assert (cfg.steps, cfg.lr) == (1800, 1e-4)  # the paper schedule's 1,500 x 1.2 (a cheaper step)
    assert DM.parse_args([], "qwen2").steps == DM.DEMO_SCHEDULES["direct"]["steps"]
    assert DM.split_student(["--schedule", "paper"])[:2] == ("qwen2", "paper")
    assert DM.parse_args([], "qwen2", "paper").steps == 1500
    assert DM.parse_args(["--steps", "7"], "qwen2", "paper").steps == 7
    for argv in (["--student", "bert-base"], ["--schedule", "stella"]):
        with pytest.raises(SystemExit):
            DM.split_student(argv)


def test_stage_steps_add_up_and_skip_empty_stages():
    """--steps split over the stages: skipped stages get 0, the others at least 1, and the sum is --steps."""
    for total in (1, 2, 3, 8, 100, 1500, 1001):
        for share in ((0.07, 0.60, 0.33), (0.0, 0.0, 1.0), (0.0, 0.5, 0.5), (0.02, 0.05, 0.93)):
            steps = DM.stage_steps(total, share)
            assert [n == 0 for n in steps] == [s == 0 for s in share], (total, share, steps)
            if total >= sum(1 for s in share if s):
                assert sum(steps) == total and all(n >= 1 for n, s in zip(steps, share) if s), (total, share, steps)
    assert DM.stage_steps(1500, (0.07, 0.60, 0.33)) == [105, 900, 495]  # the paper schedule as measured before
    assert DM.stage_steps(1000, (0.0, 0.0, 1.0)) == [0, 0, 1000]


@pytest.mark.slow
def test_demo_shortened_end_to_end(tmp_path, data_dir, capsys):
    out = tmp_path / "demo"
    cfg = DM.parse_args(["--out", str(out), "--eval-data", str(data_dir), "--steps", "100", "--log-every", "50"])
    assert (cfg.max_length, cfg.batch, cfg.lr, cfg.dtype) == (32, 64, 5e-4, "bf16")  # the demo's values
    rep = DM.run_demo(cfg, n_texts=2000, tasks=("STSBenchmark",), split="dev")
    printed = capsys.readouterr().out

    # the real pipeline ran: texts, a verified cache over exactly those rows, the default schedule, the export
    assert rep["n_texts"] == 2000
    cache = TeacherCache(out / "cache")
    cache.check(n_rows=2000, dim=384)
    cache.verify_texts(out / "data" / "texts.jsonl")
    assert rep["schedule"] == "direct" and rep["steps"] == [0, 0, 100]  # the default: stage 3 from step 1
    assert not (out / "stage1").exists() and not (out / "stage2").exists()
    for k, n in zip((1, 2, 3), rep["steps"]):
        if not n:
            continue
        recs = [json.loads(ln) for ln in (out / f"stage{k}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, n + 1))
        # stage 3 trains FC1's prefixes (--mrl-prefix, the Qwen2 student's default), not separate heads FC2-4
        assert "fc1[:64].resim" in recs[-1] and "fc4.resim" not in recs[-1]
        assert (out / f"stage{k}" / "final" / "model.safetensors").is_file()
    assert (out / "loss_curves.png").stat().st_size > 10_000 and (out / "score_vs_dim.png").stat().st_size > 10_000
    assert "| STSBenchmark | 64 |" in printed and "stage 3 only: 100 steps" in printed

    # the student learnt: clearly above the untrained student of the same shape at every head, close-ish to teacher
    r = rep["results"]
    for d in (384, 256, 128, 64):
        assert r["student"]["STSBenchmark"][d] > r["untrained"]["STSBenchmark"][d] + 0.05, r
    assert r["teacher"]["STSBenchmark"][384] == pytest.approx(0.8672, abs=2e-3)  # all-MiniLM-L6-v2 dev (sanity)
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["student"]["STSBenchmark"]["384"] == r["student"]["STSBenchmark"][384]

    # the demo's student is a model people can load: sentence-transformers at every head == JasperModel.encode
    st = pytest.importorskip("sentence_transformers")
    import checkpoints as C
    import model as M
    final = out / "stage3" / "final"
    ours = M.JasperModel.from_pretrained(final)
    texts = ["A man is playing a guitar.", "A woman slices an onion into thin rings for the soup.", "tiny"]
    assert C.check_standard_folder(final) == 384 and ours.prompts == {}  # WordPiece, no instructions
    for D in (384, 256, 128, 64):
        C.set_default_head(final, D)
        got = st.SentenceTransformer(str(final), device="cpu").encode(texts, convert_to_tensor=True)
        assert (got - ours.encode(texts, dim=D)).abs().max().item() <= 1e-6, D


def test_demo_plots_draw_eval_every_heads_across_stages(tmp_path):
    """With --eval-every, loss_curves.png gets a third panel: one STSBenchmark-dev line per head over the stages
    back to back (steps offset by the earlier stages). Synthetic metrics; the matplotlib calls are real."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = [384, 256]
    stage_dirs = []
    for k, n in enumerate((2, 4, 3), start=1):
        sd = tmp_path / f"stage{k}"
        sd.mkdir()
        rows = [{"step": s, "loss": 1.0 / s, "fc1.cos": 0.5 / s} for s in range(1, n + 1)]
        rows[-1]["eval"] = {"heldout_cos": 0.5, "stsb_dev": {str(d): 0.1 * k + d / 1e4 for d in dims}}
        if k == 2:
            rows[1]["eval"] = {"error": "RuntimeError: x"}  # a failed evaluation is not drawn
        (sd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stage_dirs.append(sd)
    drawn = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        drawn.setdefault("axes", [ax for ax in fig.axes])
        return real_savefig(fig, *a, **k)
    results = {"student": {"STS12": {d: 0.5 for d in dims}}, "teacher": {"STS12": {d: 0.6 for d in dims}}}
    try:
        plt.Figure.savefig = spy
        paths = DM._demo_plots(tmp_path, stage_dirs, results, dims, "test")
    finally:
        plt.Figure.savefig = real_savefig
    assert [p.name for p in paths][:1] == ["loss_curves.png"] and paths[0].read_bytes()[:4] == b"\x89PNG"
    ax = drawn["axes"][2]
    assert ax.get_title() == "STSBenchmark dev during training"
    lines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label().startswith("head")}
    assert sorted(lines) == ["head 256", "head 384"]
    x, y = lines["head 384"].get_data()
    assert list(x) == [2, 2 + 4, 2 + 4 + 3] and list(y) == pytest.approx([0.1384, 0.2384, 0.3384])
