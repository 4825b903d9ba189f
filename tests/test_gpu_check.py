"""bench/gpu_check.py --dry-run: the GPU check's whole logic on the CPU at toy sizes (no GPU here).

It runs the kernel (interpreted) against the sort engine and the reference, times both engines, takes bf16 FSDP2
training steps of a toy student through train.py's own setup/shard/optimizer helpers in a one-process group, and
encodes with a toy teacher; then it writes the JSON and the markdown block.  This keeps the script working as the
project's API moves, so the one run on a GPU does not die on an import or a renamed helper.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "2"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out",
                          str(tmp_path / "gc")], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "gc.json").read_text())
    assert r["ok"] and r["dry"]
    assert [c["m"] for c in r["resim_check"]] == [2, 3, 9, 14]
    assert all(c["ok"] and c["triton_bitwise_repeat"] for c in r["resim_check"])
    assert any("loss_rel_triton_ref" in c for c in r["resim_check"])
    assert r["resim_check"][-1]["loss"] > 0
    tr = r["train"]
    assert tr["tokens_per_s"] > 0 and tr["steps"] == 2 and tr["last_loss"] > 0
    assert r["teacher"]["texts_per_s"] > 0
    pk = r["packing"]
    assert pk["efficiency"]["packed"] >= pk["efficiency"]["padded"] and pk["train"]["speedup"] > 0
    md = (tmp_path / "gc.md").read_text()
    assert "Correctness: all OK" in md and "tokens/s" in md
