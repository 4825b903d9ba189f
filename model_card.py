"""The model card: README.md of every export folder (hub front matter, what the model is, how to use it, its scores).

JasperModel.save_pretrained (so train.py's OUT/final and `python export.py export`) writes it with the folder;
`python eval.py --model FOLDER ... --update-card` adds the results table and the model-index metadata.

- Front matter: huggingface_hub's `ModelCardData` (the class mteb's own `generate_model_card` fills): library_name
  sentence-transformers, pipeline_tag sentence-similarity, tags, base_model and license / language when known.
- What the model is, from what the folder knows (config.json: the body's config and our `jasper` block; modules.json:
  the default head) and, for train.py's OUT/final, from the run folder: OUT/config.json (stage, steps, batch, lr,
  teachers, texts), followed back through each stage's --init (OUT/final of the stage before) to the first init.
- The scores: mteb's own conversion of a task result to hub metadata (`TaskResult.from_task_results(...)
  .get_hf_eval_results()`, the EvalResult rows huggingface_hub turns into `model-index`), so the metadata is what
  mteb would publish for the same scores; the model-index holds the folder's default head (what
  SentenceTransformer(FOLDER) returns), the table every evaluated head.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from checkpoints import CheckpointError, atomic_write, dense_dir, read_json, standard_heads

RESULTS_HEADING = "## Evaluation results"
TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "matryoshka", "distillation", "jasper"]
PAPER = "https://arxiv.org/abs/2412.19048"


# ---------------------------------------------------------------------------------------------------------------------
# What the export knows
# ---------------------------------------------------------------------------------------------------------------------
def _run_config(folder: Path) -> dict | None:
    """train.py's OUT/config.json for an export at OUT/final (a dict with `stage`), else None."""
    f = folder.parent / "config.json"
    if folder.name != "final" or not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and "stage" in cfg else None


def _stages(folder: Path) -> list[dict]:
    """The run configs of every stage that led to `folder`, first stage first (each stage's --init is the OUT/final
    of the one before; the chain ends at a folder that is no train.py export)."""
    chain, f = [], folder
    while len(chain) < 8 and (cfg := _run_config(f)) is not None:
        chain.insert(0, cfg)
        f = Path(str(cfg.get("init") or "")).expanduser()
        if not str(cfg.get("init") or ""):
            break
    return chain


def _teachers(cfg: dict) -> list[str]:
    """Teacher names (and dims) from --teacher specs or the teacher cache's manifest.json."""
    if cfg.get("teacher"):
        return [str(t) for t in cfg["teacher"]]
    man = Path(str(cfg.get("teacher_cache") or "")) / "manifest.json"
    if cfg.get("teacher_cache") and man.is_file():
        try:
            return [f"{t['name']} ({t['dim']}-d)" for t in json.loads(man.read_text())["teachers"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return [str(cfg["teacher_cache"])] if cfg.get("teacher_cache") else []


def _front_matter(readme: Path) -> dict:
    if not readme.is_file():
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8", errors="replace"), flags=re.S)
    try:
        data = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id(spec: str) -> str | None:
    """A hub id for base_model: the id itself, or the org/name of a hub cache snapshot path."""
    m = re.search(r"models--([\w.-]+)--([\w.-]+)", spec)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return spec if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).exists() else None


def _n_params(folder: Path) -> int | None:
    from safetensors import safe_open
    n = 0
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                n += math.prod(sf.get_slice(k).get_shape())  # a scalar's shape [] gives 1
    return n or None


def card_facts(folder: str | os.PathLike, origin: str | os.PathLike | None = None) -> dict:
    """Everything the card says about the export in `folder`; `origin` is where the folder will live (an atomic
    export fills a temporary sibling first: its run folder is origin's parent)."""
    folder = Path(folder)
    where = Path(origin) if origin is not None else folder
    cfg = read_json(folder / "config.json")
    jasper = cfg.get("jasper") if isinstance(cfg.get("jasper"), dict) else {}
    heads = standard_heads(folder)
    if not heads:
        raise CheckpointError(f"{folder}: no 2_Dense_* head folder: not an export folder with its tokenizer")
    modules = read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    dense = [m["path"] for m in modules if str(m.get("type", "")).endswith("Dense")]
    default = int(dense[0].rsplit("_", 1)[1]) if dense else heads[0]
    sbert = read_json(folder / "sentence_bert_config.json") if (folder / "sentence_bert_config.json").is_file() else {}
    st_cfg = (read_json(folder / "config_sentence_transformers.json")
              if (folder / "config_sentence_transformers.json").is_file() else {})
    stages = _stages(where)
    root = str(stages[0].get("init") or "") if stages else ""
    base_card = _front_matter(Path(root).expanduser() / "README.md") if root else {}
    return {
        "name": where.resolve().parent.name + "-" + where.name if where.name == "final" else where.name,
        "body": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size", "is_causal")},
        "n_params": _n_params(folder), "dtype": cfg.get("dtype"), "heads": heads, "default_head": default,
        "max_length": sbert.get("max_seq_length", jasper.get("max_length")),
        "tokenizer_args": sbert.get("tokenizer_args") or {},
        "vision": jasper.get("vision_config") is not None,
        "prompts": sorted((st_cfg.get("prompts") or {}).keys()),
        "stages": stages, "teachers": _teachers(stages[-1]) if stages else [],
        "base_model": _hub_id(root) if root else None, "init": root or None,
        "license": base_card.get("license"), "language": base_card.get("language") or ["en"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------------
def _card_data(f: dict) -> ModelCardData:
    tags = TAGS + (["image-feature-extraction"] if f["vision"] else [])
    return ModelCardData(library_name="sentence-transformers", pipeline_tag="sentence-similarity", tags=tags,
                         base_model=f["base_model"], license=f["license"], language=f["language"])


def _what(f: dict) -> str:
    b = f["body"]
    heads = ", ".join(f"{D}{' (default)' if D == f['default_head'] else ''}" for D in f["heads"])
    rows = [("student body", f"{b['model_type']}: {b['num_hidden_layers']} layers, hidden {b['hidden_size']}, "
                             f"{b['num_attention_heads']} heads ({b['num_key_value_heads']} kv), "
                             f"vocab {b['vocab_size']}"
                             f", bidirectional attention" + (f", {f['n_params']:,} parameters" if f["n_params"] else "")
                             + (f", {f['dtype']} weights" if f["dtype"] else "")),
            ("embedding", f"mean over every token (instruction included) -> Dense head -> L2 normalise; Matryoshka "
                          f"heads {heads}: each its own `2_Dense_{{D}}` folder"),
            ("max sequence length", str(f["max_length"])),
            ("vision tower", "yes (image tokens in the text, stage 4)" if f["vision"] else "no (text only)")]
    if f["stages"]:
        st = f["stages"]
        rows.append(("teachers", ", ".join(f["teachers"]) or "-"))
        rows.append(("training", "; ".join(
            f"stage {c['stage']}: {c.get('steps')} steps, global batch {c.get('batch')}, peak lr {c.get('lr')}"
            for c in st) + f" (sec. 3.1 of the paper; losses eq. 1-4, weights {st[-1].get('loss_weights')})"))
        rows.append(("data", str(st[-1].get("texts") or st[-1].get("images") or "-")))
        rows.append(("initialised from", f"`{f['init']}`"))
    if f["prompts"]:
        rows.append(("prompts", ", ".join(f"`{p}`" for p in f["prompts"])))
    return "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def _usage(f: dict) -> str:
    D, other = f["default_head"], f["heads"][-1]
    tok_kw = ", ".join(f"{k}={v!r}" for k, v in f["tokenizer_args"].items())
    # a model stored with prompts is used with them; one trained without instructions (the demo's) without
    prompted = "query" in f["prompts"]
    query = "Instruct: Given a web search query, retrieve relevant passages that answer the query\\nQuery: " \
        if prompted else ""
    how = ('; queries with an instruction: prompt_name="query"', ', prompt_name="query"') if prompted else ("", "")
    return f"""### sentence-transformers

```python
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Dense

model = SentenceTransformer("PATH")  # head {D}{how[0]}
emb = model.encode(["A man is playing a guitar."]{how[1]})
# another Matryoshka head ({", ".join(map(str, f["heads"]))}): swap the Dense module
# (or rewrite modules.json: `python export.py set-head PATH {other}`)
model[2] = Dense.load("PATH/{dense_dir(other)}")
```

`truncate_dim` would cut head {D}'s vector instead; the trained heads are separate projections (sec. 2.3) and score
better at their size.

### transformers

```python
import torch, torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH"{", " + tok_kw if tok_kw else ""})
body = AutoModel.from_pretrained("PATH")  # config.json says is_causal: false (bidirectional)
head = load_file("PATH/{dense_dir(D)}/model.safetensors")
batch = tok(["{query}what is distillation?"], padding=True, truncation=True,
            max_length={f["max_length"]}, return_tensors="pt")
with torch.no_grad():
    h = body(**batch).last_hidden_state                                   # (B, T, H)
m = batch["attention_mask"].unsqueeze(-1).float()
pooled = (h * m).sum(1) / m.sum(1)                                        # mean over real tokens
emb = F.normalize(pooled @ head["linear.weight"].T + head["linear.bias"], dim=-1)  # (B, {D})
```

### mteb

```python
import mteb
import eval_mteb  # this project's eval_mteb.py: local folders need a registered ModelMeta

name = eval_mteb.register("PATH")
model = mteb.get_model(name, embed_dim={D})
results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))
```

### ONNX Runtime

`python export.py onnx PATH` writes `onnx/model.onnx` and `onnx/model_qint8_avx512_vnni.onnx`;
`onnx_export.OnnxEncoder("PATH")` encodes through onnxruntime without torch models."""


def render(f: dict, results_md: str | None = None, card_data: ModelCardData | None = None) -> str:
    data = card_data or _card_data(f)
    parts = [f"# {f['name']}",
             f"A text embedding model distilled from teacher embedders with the multi-teacher recipe of Jasper and "
             f"Stella ([arXiv 2412.19048]({PAPER})). Replace `PATH` below with this folder or its hub id.",
             "## Model", _what(f), "## Usage", _usage(f)]
    if results_md:
        parts += [RESULTS_HEADING, results_md]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"


def write_card(folder: str | os.PathLike, origin: str | os.PathLike | None = None) -> Path:
    """README.md of the export in `folder` (atomic: the old card or the new one, never a short file)."""
    out = Path(folder) / "README.md"
    atomic_write(out, render(card_facts(folder, origin)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Scores (eval.py --update-card)
# ---------------------------------------------------------------------------------------------------------------------
def mteb_eval_results(report: dict, head: int, heads: list[int]) -> list:
    """huggingface_hub EvalResults of head `head` from eval.py's report, through mteb's TaskResult conversion
    (the one mteb uses for a results folder). "native" is the encoder's default output: the largest head."""
    from mteb.results import TaskResult
    import eval_mteb as EM
    key = str(head) if str(head) in report["dims_keys"] else ("native" if head == max(heads) and
                                                               "native" in report["dims_keys"] else None)
    if key is None:
        return []
    out = []
    for t, per in report["results"].items():
        r = per[key]
        # the mteb engine keeps mteb's per-subset scores; the built-in one has a single "default" subset
        subsets = (r["scores"] if report["engine"] == "mteb"
                   else {"default": {**r["scores"], "main_score": r["main_score"]}})
        tr = TaskResult.from_task_results(EM.get_mteb_task(t), {r["split"]: subsets}, evaluation_time=r["time_s"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated for the hub's newer benchmark files; model-index reads it
            out += tr.get_hf_eval_results()
    return out


def update_card(folder: str | os.PathLike, report: dict, table: str) -> Path:
    """Write eval.py's scores into the card of `folder`: the results table (every head) under RESULTS_HEADING
    (replacing an earlier one) and the model-index of the default head. A missing card is written first."""
    folder = Path(folder)
    readme = folder / "README.md"
    f = card_facts(folder)
    card = ModelCard(readme.read_text(encoding="utf-8")) if readme.is_file() else ModelCard(render(f))
    report = {**report, "dims_keys": [str(d) for d in report["dims"]]}
    evals = mteb_eval_results(report, f["default_head"], f["heads"])
    card.data.eval_results = evals or None
    card.data.model_name = report.get("model") if evals else None
    note = (f"Head {f['default_head']} (the default, what SentenceTransformer returns) is in the model-index "
            f"metadata." if evals else f"The default head {f['default_head']} was not evaluated: no model-index.")
    section = (f"{RESULTS_HEADING}\n\neval.py, engine {report['engine']}, instructions {report['instructions']} "
               f"(scores from mteb's evaluators; model-index from mteb's TaskResult conversion). {note}\n\n{table}\n")
    text = card.text
    i = text.find(RESULTS_HEADING)
    text = (text[:i] if i >= 0 else text.rstrip() + "\n\n") + section
    atomic_write(readme, f"---\n{card.data.to_yaml()}\n---\n{text if text.startswith(chr(10)) else chr(10) + text}")
    return readme
