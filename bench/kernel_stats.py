"""Compile every Triton kernel variant losses.py can launch on CUDA, for CUDA targets, on a machine WITHOUT a GPU;
print registers, spills, shared memory and SASS instructions per (a, b) element.

    .venv/bin/python bench/kernel_stats.py                      # sm_90 and sm_80, m = 3, 90, 128, 512, 1024
    .venv/bin/python bench/kernel_stats.py --targets 90 --json out.json

How.  The triton wheel ships ptxas and cuobjdump, and triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))
runs the full pipeline (ttir -> ttgir -> llir -> ptx -> cubin) without a device or driver.  To compile exactly what
the code launches, this script calls losses._resim_triton itself on CPU stand-in tensors with the CUDA tiles
(losses.CUDA_TILES) and a recorder in place of the kernel: every launch (grid, arguments, constexprs, num_warps) is
captured, then specialised the way JITFunction.run does (dtype and 16-byte divisibility of each argument) and
compiled.  Tie modes, input dtypes and batch sizes that give the same specialisation compile once.

Figures.  registers / spills / stack: `ptxas -v` on the PTX with triton's own flags.  SASS per element: the
instructions of the main loop (the largest backward branch in the cuobjdump listing) divided by the (a, b) elements
one thread handles per iteration, BLOCK_A * BLOCK_B / (32 num_warps); SHFL and BAR.SYNC inside the loop are counted
too (the kernel is meant to have none).  Grid: programs per launch at each m, vs the 132 SMs of an H100/H200.

TRITON_INTERPRET must be unset for real JITFunctions: this script drops it before triton is imported, so run it as
its own process (tests/test_kernel_compile.py does, with --json).  Exit status 1 if any variant fails to compile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton is imported anywhere
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kernel_stats_triton_"))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGETS = {90: "sm_90a (H100/H200)", 80: "sm_80 (A100)"}
N_SM = 132  # H100 SXM / H200


# ---------------------------------------------------------------------------------------------------------------------
# the launches the code makes
# ---------------------------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def recorded_launches(sizes: list[int]) -> list[dict]:
    """Every launch losses._resim_triton makes on CUDA for batches m in `sizes`, dtypes fp32/bf16, both tie modes."""
    import losses
    real, real_avail = losses._resim_kernel, losses.triton_available
    rec = _Recorder(real)
    out = []
    losses._resim_kernel = rec
    losses.triton_available = lambda device: True  # CPU stand-ins take the launch path without the interpreter
    try:
        for m in sizes:
            P = m * (m - 1) // 2
            for dtype in (torch.float32, torch.bfloat16):
                for ties in losses.TIES:
                    n0 = len(rec.launches)
                    # CPU stand-ins: the binder only reads dtype and data_ptr() % 16; the host-side partial sums
                    # after the (recorded, not run) launch read uninitialised memory, which is fine here
                    losses._resim_triton(torch.randn(P).to(dtype), torch.randn(P), 0.015, ties,
                                         tiles=losses.CUDA_TILES)
                    for grid, args, kwargs in rec.launches[n0:]:
                        out.append(dict(m=m, P=P, dtype=str(dtype).split(".")[-1], ties=ties, grid=grid,
                                        args=args, kwargs=kwargs))
    finally:
        losses._resim_kernel, losses.triton_available = real, real_avail
    return out


# ---------------------------------------------------------------------------------------------------------------------
# compile + inspect
# ---------------------------------------------------------------------------------------------------------------------
def compile_launch(kernel, cc: int, args, kwargs):
    """JITFunction.run's specialisation (binder + _pack_args) for target sm_cc, then triton.compiler.compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (cc, tuple(signature.values()), tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
           tuple(sorted((str(k), str(v)) for k, v in attrs.items())), str(options))
    return key, lambda: triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                       options=options.__dict__)


def ptxas_stats(ptx: str, cc: int) -> dict:
    """The bundled `ptxas -v` on the PTX with triton's flags: registers, stack, spill stores/loads (bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    st = dict(regs=None, stack=None, spill_st=None, spill_ld=None)
    if m := re.search(r"Used (\d+) registers", log):
        st["regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        st["stack"], st["spill_st"], st["spill_ld"] = map(int, m.groups())
    if st["regs"] is None or st["spill_st"] is None:
        raise RuntimeError(f"could not parse ptxas -v output: {log.strip()[:500]}")
    return st


def loop_stats(cubin: bytes) -> dict:
    """SASS of the largest loop (backward branch) from the bundled cuobjdump: instructions, SHFL, BAR, STL/LDL."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        raw = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True).stdout
    ins = []  # (address, opcode, text)
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", raw):
        text = m.group(2).strip()
        op = re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0].split(".")[0]
        ins.append((int(m.group(1), 16), op, text))
    best: list[str] = []
    for addr, op, text in ins:
        if op == "BRA" and (t := re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text)) and int(t.group(1), 16) < addr:
            lo = int(t.group(1), 16)
            body = [o for a_, o, _ in ins if lo <= a_ <= addr]
            best = body if len(body) > len(best) else best
    if not best:
        raise RuntimeError("no loop found in the SASS listing")
    return dict(loop=len(best), shfl=best.count("SHFL"), bar=best.count("BAR"), stl=best.count("STL"),
                ldl=best.count("LDL"))


def collect(targets: list[int], sizes: list[int]) -> dict:
    import losses
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    launches = recorded_launches(sizes)
    kernel = losses._resim_kernel
    variants: dict = {}  # specialisation key -> record
    for cc in targets:
        for ln in launches:
            kw = dict(ln["kwargs"])
            key, build = compile_launch(kernel, cc, ln["args"], kw)
            v = variants.get(key)
            if v is None:
                v = variants[key] = dict(target=cc, launches=[], block_a=kw["BLOCK_A"], block_b=kw["BLOCK_B"],
                                         num_warps=kw.get("num_warps", 4), signature=list(key[1]))
                t0 = time.perf_counter()
                try:
                    k = build()
                    if not k.asm.get("cubin"):
                        raise RuntimeError("pipeline finished without a cubin")
                    v.update(ptxas_stats(k.asm["ptx"], cc))
                    v["shared"] = k.metadata.shared
                    v.update(loop_stats(k.asm["cubin"]))
                    v["per_thread_elems"] = v["block_a"] * v["block_b"] // (32 * v["num_warps"])
                    v["sass_per_elem"] = v["loop"] / v["per_thread_elems"]
                except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
                    v["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
                v["compile_s"] = time.perf_counter() - t0
            v["launches"].append(dict(m=ln["m"], P=ln["P"], dtype=ln["dtype"], ties=ln["ties"],
                                      grid=list(ln["grid"]), programs=ln["grid"][0] * ln["grid"][1]))
    return dict(triton=triton.__version__, torch=torch.__version__, ptxas=get_ptxas(90).version,
                tiles=list(losses.CUDA_TILES), variants=list(variants.values()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="90,80", help="CUDA compute capabilities (default 90,80)")
    ap.add_argument("--sizes", default="3,90,128,512,1024",
                    help="batch sizes m whose launches are compiled (m = 2 has no pair of pairs: no launch)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    try:
        res = collect([int(t) for t in a.targets.split(",")], [int(s) for s in a.sizes.split(",")])
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("SETUP FAIL: could not record or compile the launches")
        return 2
    print(f"# losses._resim_kernel, tiles (BLOCK_A, BLOCK_B, num_warps) = {tuple(res['tiles'])}; triton "
          f"{res['triton']}, bundled ptxas {res['ptxas']}; compiled here without a GPU")
    print("| target | x dtype | P % 16 == 0 | regs/thread | spill st/ld B | stack B | shared B | loop SASS | "
          "elems/thread | SASS per (a, b) | SHFL/BAR in loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for v in res["variants"]:
        dt = v["signature"][0]
        div = "yes" if any(ln["P"] % 16 == 0 for ln in v["launches"]) else "no"
        if "error" in v:
            failed += 1
            print(f"| sm_{v['target']} | {dt} | {div} | FAIL: {v['error'].splitlines()[-1][:120]} |")
            continue
        print(f"| sm_{v['target']} | {dt} | {div} | {v['regs']} | {v['spill_st']}/{v['spill_ld']} | {v['stack']} | "
              f"{v['shared']} | {v['loop']} | {v['per_thread_elems']} | {v['sass_per_elem']:.1f} | "
              f"{v['shfl']}/{v['bar']} |")
    grids = {}
    for v in res["variants"]:
        for ln in v["launches"]:
            grids[ln["m"]] = (ln["P"], ln["grid"], ln["programs"])
    print("\n| m | P | grid (a blocks, b chunks) | programs | vs 132 SMs |")
    print("|---|---|---|---|---|")
    for m in sorted(grids):
        P, grid, n = grids[m]
        print(f"| {m} | {P:,} | {tuple(grid)} | {n:,} | {n / N_SM:.1f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
