"""The export folder's command line: convert a checkpoint to it, switch its default head, verify it.

One concern: turning folders that already exist on disk into the export folder of docs/checkpoints.md ("The export
folder": our files that are at the same time a standard transformers / sentence-transformers model) and checking one.

    python export.py export SRC OUT [--default-head D]   # an older export, a released Jasper or a stella folder
    python export.py set-head PATH D                     # the head sentence-transformers returns (modules.json)
    python export.py check PATH                          # layout, the silent traps, every head's weights
    python export.py init-student --from DIR --layers 0,2,4 --out OUT [--heads 384,256,128,64]
                                                         # a student cut from chosen layers of a BERT / Qwen folder
    python export.py onnx PATH [--no-int8]               # PATH/onnx/model.onnx + its int8 copy (onnx_export.py)

(Until this file existed they were `python model.py ...`; model.py now answers that with this file's command line.)
Why a file of its own: model.py is the student a reader came for (the body, the heads, the
tokenizer; nanoGPT's model.py), and the files' layout is checkpoints.py's; what is left, picking the right loader
for a folder and the CLI around it, needs both, so it sits above them. Writing the folder itself is
JasperModel.save_pretrained -> checkpoints.save_export; the checks are checkpoints.check_standard_folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from checkpoints import (CheckpointError, check_standard_folder, checkpoint_keys, read_json, read_st_layout,
                         resolve_checkpoint, set_default_head, stella_dense_folders)
from model import JasperModel
from model_card import write_card


def export_folder(src: str | os.PathLike, out: str | os.PathLike, default_head: int | None = None) -> Path:
    """Convert an export (this layout or the one before), a released Jasper folder or a stella folder to the export
    folder at `out` (may equal `src`). A stella folder keeps every `2_Dense_{D}` head exactly, its own default head
    (modules.json) and its own prompts beside the standard ones; the rest default to the largest head."""
    src = resolve_checkpoint(src)
    cfg = read_json(src / "config.json")
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src / 'tokenizer.json'}: file not found (the export folder needs the tokenizer)")
    # our export (a `jasper` block), the one before it (model_type jasper) or the released Jasper (text_config)
    if "jasper" in cfg or "text_config" in cfg or "jasper" in str(cfg.get("model_type", "")):
        model = JasperModel.from_pretrained(src)
    else:
        dense = stella_dense_folders(src)  # {D: 2_Dense_{D} folder}
        if not dense:
            raise CheckpointError(f"{src}: neither an export of this project or a released Jasper (config.json "
                                  f"with a jasper block or text_config) nor a stella folder (no 2_Dense_* folder)")
        # every stella head kept as it is (largest first: FC1 is the largest head, as in a student)
        model = JasperModel.from_stella(src, head_dims=sorted(dense, reverse=True))
        if default_head is None and (src / "modules.json").is_file():
            # stella's own modules.json names the Dense it returns: keep that the default, not our largest head
            for m in read_json(src / "modules.json"):
                if str(m.get("type", "")).endswith("Dense"):
                    default_head = int(read_json(src / m["path"] / "config.json")["out_features"])
    # written into a temporary sibling and renamed over `out` when complete, so out == src is safe
    out = model.save_pretrained(out, default_head=default_head)
    if src.resolve() != out.resolve() and (src.parent / "config.json").is_file() and src.name == "final":
        write_card(out, origin=src)  # a copy of train.py's OUT/final: its card still tells the run's stages
    return out


def init_student(src: str | os.PathLike, layers: Sequence[int], out: str | os.PathLike,
                 heads: Sequence[int] | None = None, seed: int = 0) -> JasperModel:
    """An initial student from chosen `layers` of a folder, written as an export (a valid train.py --init):
      - a BERT-family folder (sentence-transformers or plain HF): its embeddings, the chosen encoder layers, its
        tokenizer, pooling and prompts; heads `heads` (default: FC1 = the folder's own vector width, the teacher's
        when cutting from the teacher), identity rows where the folder has no Dense (JasperModel.from_bert);
      - an export of this project or a released Jasper: the body's chosen layers and fresh heads of its own dims
        (text only);
      - a Qwen-family body folder (stella, Qwen3-Embedding, a Qwen2/Qwen3 LM): JasperModel.from_stella's heads.
    Which layers to keep: docs/model.md "A student cut from a teacher"."""
    path = resolve_checkpoint(src)
    if any(k.startswith("vector_linear_") for k in checkpoint_keys(path)):  # our export / a released Jasper
        model = JasperModel.from_pretrained(path, vision=False)
        if heads and tuple(heads) != model.config.head_dims:
            raise CheckpointError(f"{path}: --heads {list(heads)} differ from its heads {list(model.config.head_dims)}"
                                  f"; cut it with its own heads (train.py --heads shapes the heads of a body init)")
        model.keep_layers(layers)
        model.init_report = model._init_heads({}, seed)  # fresh heads: the old ones read the uncut body
    elif read_json(read_st_layout(path).body_dir / "config.json").get("model_type") == "bert":
        model = JasperModel.from_bert(path, head_dims=heads, layers=layers, seed=seed)
    else:
        model = JasperModel.from_stella(path, **({"head_dims": tuple(heads)} if heads else {}), seed=seed)
        model.keep_layers(layers)
    model.save_pretrained(out)
    return model


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def main(argv: Sequence[str] | None = None, prog: str = "export.py") -> int:
    """The three commands; a CheckpointError or bad value is one line on stderr (no traceback) and exit code 2."""
    ap = argparse.ArgumentParser(prog=prog, description="The export folder: convert, switch head, verify, ONNX.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="convert an export, a released Jasper or a stella folder to the export folder")
    ex.add_argument("src")
    ex.add_argument("out", help="absent, empty or a previous export (may be SRC itself)")
    ex.add_argument("--default-head", type=int, default=None,
                    help="head sentence-transformers returns (default: stella's own, else the largest)")
    sh = sub.add_parser("set-head", help="make head D the one sentence-transformers returns (rewrites modules.json)")
    sh.add_argument("path")
    sh.add_argument("dim", type=int)
    ck = sub.add_parser("check", help="verify the standard side of an export (layout, traps, heads)")
    ck.add_argument("path")
    ini = sub.add_parser("init-student", help="write an initial student from chosen layers of a BERT-family or "
                                              "Qwen-family folder (a train.py --init)")
    ini.add_argument("--from", dest="src", required=True, help="the folder to cut (e.g. the teacher)")
    ini.add_argument("--layers", type=_int_list, required=True,
                     help="0-based layers to keep, strictly increasing, e.g. 0,2,4 (docs/model.md)")
    ini.add_argument("--out", required=True, help="absent, empty or a previous export")
    ini.add_argument("--heads", type=_int_list, default=None,
                     help="head dims FC1,FC2,...; FC1 = the teacher's width (default: the folder's own width, then "
                          "three halving Matryoshka heads; an export keeps its own)")
    ini.add_argument("--seed", type=int, default=0, help="seed of the fresh heads")
    ox = sub.add_parser("onnx", help="ONNX body for sentence-transformers' onnx backend / onnxruntime "
                        "(onnx/model.onnx + the dynamic int8 copy; onnx_export.py)")
    ox.add_argument("path")
    ox.add_argument("--no-int8", action="store_true", help="skip the dynamically quantised int8 copy")
    a = ap.parse_args(argv)  # a bad flag: argparse's usage line and exit code 2, like the errors below
    try:
        if a.cmd == "export":
            out = export_folder(a.src, a.out, a.default_head)
            # the folder just written is checked as a stranger would read it; its default head is what it reports
            print(f"{out}: export folder, default head {check_standard_folder(out)}")
        elif a.cmd == "init-student":
            m = init_student(a.src, a.layers, a.out, a.heads, a.seed)
            print(f"{a.out}: student of {m.config.text.num_hidden_layers} layers {a.layers} of {a.src}, heads "
                  f"{list(m.config.head_dims)} ({', '.join(f'{d}: {h}' for d, h in m.init_report.items())}), "
                  f"default head {check_standard_folder(a.out)}")
        elif a.cmd == "set-head":
            set_default_head(a.path, a.dim)  # modules.json and the card change: every head is already there
            print(f"{a.path}: default head {a.dim}")
        elif a.cmd == "onnx":
            from onnx_export import export_onnx  # torch.onnx + onnxruntime load only for this command
            out = export_onnx(a.path, quantize=not a.no_int8)
            print(f"{out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
        else:  # check; weights=True: every 2_Dense_{D} must equal vector_linear_{D} of model.safetensors
            print(f"{a.path}: ok, default head {check_standard_folder(a.path, weights=True)}")
    except (CheckpointError, ValueError) as e:
        print(f"{prog} {a.cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
