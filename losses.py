"""The three distillation losses of Jasper & Stella (arXiv 2412.19048, sec. 2.2, eq. 1-4) and their combination per
training stage (sec. 2.3-2.5).  Pure torch + triton; no other project module is imported.

Notation.  A batch of m texts; the student gives S (m, d), the teacher T (m, D), rows L2-normalised (d may differ
from D).  Pair p = (i, j), i < j, in row-major order (the order of torch.triu_indices and of the authors'
`torch.triu(ones, diagonal=1).bool()` mask); P = m (m - 1) / 2 pairs with student similarity x_p = <S_i, S_j> and
teacher similarity y_p = <T_i, T_j>.  "a above b" (a > b) means the teacher ranks pair a above pair b.

  eq. 1  L_cos   = 1/m sum_i (1 - <S_i, T_i>)                     dL/dS_i = -T_i / m
  eq. 2  L_sim   = 1/m^2 sum_{i,j} (<S_i,S_j> - <T_i,T_j>)^2       dL/dS   = 4/m^2 (S S^T - T T^T) S
  eq. 3  L_resim = 1/N sum_{a > b} max(0, x_b - x_a + margin),     N = C(P, 2)
         dL/dx_c = 1/N ( #{a > c : x_c - x_a + margin > 0}  -  #{b < c : x_b - x_c + margin > 0} )
         and back to the vectors: dL/dS = (G + G^T) S with G (m, m) holding dL/dx_p at (i, j), i < j.
  eq. 4  L       = lambda1 L_cos + lambda2 L_sim + lambda3 L_resim,   lambda = (10, 200, 20), margin = 0.015.

Ties in the teacher (y_a == y_b, e.g. duplicate texts in a batch).  The paper's sum runs over t_a > t_b only, so tied
pairs of pairs contribute nothing (`ties="skip"`, the default).  The authors' code (NLPJCL/RAG-Retrieval,
rag_retrieval/train/embedding/model_distill.py, `pair_inbatch_triplet_loss` + `get_score_diff`) labels every pair of
pairs (a, b), a < b in pair order, with `where(y_b - y_a < 0, 1, -1)` and takes `relu(label * (x_b - x_a) + margin)
.mean()` over all C(P, 2) of them: a tie gets label -1, i.e. the pair that comes LATER in row-major pair order is
treated as ranked above.  `ties="authors"` reproduces that exactly: it is the strict order (y_a, a) > (y_b, b).
Both modes normalise by N = C(P, 2) (the authors' `.mean()`; the paper's 1/N).  With m = 2 (P = 1) there is no pair of
pairs: we return 0 (the authors' `.mean()` of an empty tensor would be NaN).

The authors materialise the P x P difference matrix (about 17e9 entries at m = 512).  Here nothing P x P is ever
allocated: the (m, m) Gram matrices come from torch, the pair vectors x, y (P,) go to one of three exact engines
that return the loss AND dL/dx in one pass, and autograd's matmul takes dL/dx back to S:
  * "sort"    (CPU default, GPU beyond m = 488): O(P log^2 P) time, O(P) memory, exact (fp64 sums, integer counts);
  * "triton"  (GPU default up to m = 488) fused Triton kernel, O(P^2) compare-and-add work in O(P) memory,
              deterministic (no atomics);
  * "chunked" the kernel's sum in plain torch, O(P x block) memory (a readable mirror of it).
`resim_loss_reference` is the materialising version (for tests and benchmarks only).

Differences from the authors' code, all deliberate: ties are skipped by default (flag above); the Gram matrices are
computed in fp32 even for bf16 inputs; losses are taken per head with separate FC heads (the paper) rather than on
Matryoshka prefixes of one vector (their MRL code); see `distill_loss` for how heads are combined.  The prefixes are
available too (`prefix_heads`, `distill_loss(prefix_dims=...)`, train.py --mrl-prefix), to test the paper's claim.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the fused kernel needs triton; on the CPU it only runs under TRITON_INTERPRET=1 (set before import)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a runtime dependency, but keep the torch paths usable without it
    triton = None
    tl = None

TIES = ("skip", "authors")
IMPLS = ("auto", "sort", "triton", "chunked", "reference")
HEAD_NAMES = ("fc1", "fc2", "fc3", "fc4")  # sec. 2.3: FC1..FC4 = 12288, 1024, 512, 256


# =====================================================================================================================
# eq. 1 and eq. 2
# =====================================================================================================================
def _check_pair(s: Tensor, t: Tensor, same_dim: bool, fn: str) -> None:
    if s.dim() != 2 or t.dim() != 2:
        raise ValueError(f"losses.{fn}: expected (m, d) student and (m, D) teacher, got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"losses.{fn}: student is on {s.device} but teacher is on {t.device} (move the teacher "
                         f"vectors to the student's device)")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"losses.{fn}: student has {s.shape[0]} rows, teacher {t.shape[0]} (they must be the same "
                         f"texts in the same order)")
    if same_dim and s.shape[1] != t.shape[1]:
        raise ValueError(f"losses.{fn}: cosine loss needs equal widths, student {s.shape[1]} vs teacher {t.shape[1]}")


def cosine_loss(s: Tensor, t: Tensor) -> Tensor:
    """eq. 1: mean over the batch of 1 - <s_i, t_i> for L2-normalised rows (the authors average, the paper sums).

    s (m, d), t (m, d) -> scalar fp32.  Gradient: dL/ds_i = -t_i / m.  Rows are assumed normalised (the model's heads
    normalise); the authors' F.cosine_embedding_loss renormalises, which gives the same value and, behind the
    model's own normalisation, the same gradient (the tangent projection is idempotent).
    """
    _check_pair(s, t, True, "cosine_loss")
    return (1.0 - (s.float() * t.detach().float()).sum(dim=-1)).mean()


def similarity_loss(s: Tensor, t: Tensor) -> Tensor:
    """eq. 2: MSE between the (m, m) student and teacher similarity matrices, diagonal included (as the authors).

    s (m, d), t (m, D) -> scalar fp32.  Gradient: dL/ds = 4/m^2 (s s^T - t t^T) s (symmetric residual, both factors).
    """
    _check_pair(s, t, False, "similarity_loss")
    sf, tf = s.float(), t.detach().float()
    return F.mse_loss(sf @ sf.T, tf @ tf.T)  # (m, m) vs (m, m), mean over m^2 entries


# =====================================================================================================================
# eq. 3: pair vectors
# =====================================================================================================================
def pair_sims(v: Tensor) -> Tensor:
    """(m, d) -> (P,) similarities <v_i, v_j> of the pairs i < j in row-major order, computed in fp32.

    The Gram matrix (m, m) is one fp32 matmul; autograd takes dL/dx (P,) back through it as (G + G^T) v.
    """
    vf = v.float()
    g = vf @ vf.T                                                      # (m, m)
    iu = torch.triu_indices(v.shape[0], v.shape[0], offset=1, device=v.device)  # (2, P)
    return g[iu[0], iu[1]]                                             # (P,)


def _n_pairs_of_pairs(P: int) -> int:
    return P * (P - 1) // 2


# ---------------------------------------------------------------------------------------------------------------------
# Reference (materialising, the authors' formulation).  Tests and benchmarks only: O(P^2) memory.
# ---------------------------------------------------------------------------------------------------------------------
def resim_loss_reference(s: Tensor, t: Tensor, margin: float = 0.015, ties: str = "skip") -> Tensor:
    """eq. 3 written as the authors do, materialising the (P, P) matrix of pair-of-pair differences.

    diff[a, b] = x_b - x_a; label[a, b] = +1 where y_a > y_b (a above b), -1 where y_a < y_b; the hinge
    relu(label * diff + margin) is averaged over the C(P, 2) entries a < b.  Ties: "authors" labels them -1 (the later
    pair counts as above); "skip" drops them from the sum (still counted in N).  Gradients come from autograd.
    """
    _check_pair(s, t, False, "resim_loss_reference")
    if ties not in TIES:
        raise ValueError(f"losses.resim_loss_reference: ties must be one of {TIES}, got {ties!r}")
    x = pair_sims(s)                       # (P,)
    y = pair_sims(t.detach())              # (P,)
    P = x.shape[0]
    if P < 2:
        return x.sum() * 0.0
    dx = x[None, :] - x[:, None]           # (P, P)  dx[a, b] = x_b - x_a
    dy = y[None, :] - y[:, None]           # (P, P)  dy[a, b] = y_b - y_a
    upper = torch.ones(P, P, dtype=torch.bool, device=x.device).triu(1)
    label = torch.where(dy < 0, 1.0, -1.0)                     # authors: ties -> -1
    hinge = F.relu(dx * label + margin)
    if ties == "skip":
        hinge = hinge * (dy != 0)                              # the paper: only t_a > t_b (either orientation)
    return hinge[upper].sum() / _n_pairs_of_pairs(P)


# ---------------------------------------------------------------------------------------------------------------------
# Exact O(P log^2 P) engine: dominance counting over the teacher order with a dyadic decomposition.
# ---------------------------------------------------------------------------------------------------------------------
def _teacher_order(y: Tensor, ties: str) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher order of the pairs, shared by the sort engine and the kernel.

    pos2pair (P,): the stable ascending sort of y (position -> pair index).  Per position, the pairs ranked below
    it are the positions [0, k1) and the pairs ranked above it [k2, P):
      authors: k1 = pos, k2 = pos + 1 (a strict order, ties broken by pair index);
      skip:    k1 = first position of the tie group, k2 = one past its last (tied pairs are not ordered)."""
    y_sorted, pos2pair = torch.sort(y, stable=True)          # (P,), (P,)
    if ties == "authors":
        k1 = torch.arange(y.shape[0], device=y.device)
        return pos2pair, k1, k1 + 1
    return (pos2pair, torch.searchsorted(y_sorted, y_sorted, right=False),
            torch.searchsorted(y_sorted, y_sorted, right=True))


def _resim_sort(x: Tensor, y: Tensor, margin: float, ties: str) -> tuple[Tensor, Tensor]:
    """Loss sum (fp64 scalar) and per-pair count gradient (fp64 (P,)), both NOT yet divided by N.

    Order the pairs by the teacher: position pos(a) in a stable ascending sort of y (ties -> pair index), so
      authors: a above b  <=>  pos(a) > pos(b)
      skip:    a above b  <=>  y_a > y_b  <=>  pos(b) < start(a) (first position of a's tie group).
    The pairs ranked below a are therefore a prefix [0, k1(a)) of the positions, and the pairs above c the suffix
    [k2(c), P) (authors: k1 = pos, k2 = pos + 1; skip: k1 = start, k2 = end of the tie group).
    The hinge terms need, for each a, over b in its prefix:  cnt1(a) = #{x_b > x_a - margin} and sum1(a) = sum of
    those x_b; for each c, over a in its suffix: cnt2(c) = #{x_a < x_c + margin}.  Then
      sum_{a > b} relu(x_b - x_a + margin) = sum_a sum1(a) + cnt1(a) (margin - x_a)
      N dL/dx_c = cnt2(c) - cnt1(c).
    Values are replaced by their rank in a global sort of x (thresholds become integer ranks via searchsorted), and a
    prefix [0, k) is the union of the dyadic blocks [(k >> j) - 1] * 2^j of size 2^j for each bit j set in k.  Per
    level j the positions are sorted by the unique int64 key block * P + rank, so every block's ranks are sorted and
    one flat searchsorted answers all queries.  log2(P) levels x one sort each: O(P log^2 P) time, O(P) memory.
    """
    P = x.shape[0]
    dev = x.device
    xd = x.double()
    marg = float(torch.tensor(margin, dtype=torch.float32))  # the margin as an fp32 reference sees it (all engines)
    # teacher order; from here on every per-pair array is indexed by position (queries then hit the dyadic blocks in
    # increasing order, which keeps the binary searches cache-friendly), and mapped back to pairs at the end
    pos2pair, k1, k2 = _teacher_order(y, ties)
    arangeP = torch.arange(P, device=dev)
    # student values as ranks
    x_pos = xd[pos2pair]                                     # (P,) student value at each position
    x_sorted, rank2pos = torch.sort(x_pos)
    rank_pos = torch.empty_like(rank2pos)
    rank_pos[rank2pos] = arangeP                             # (P,) rank of x at each position
    q1 = torch.searchsorted(x_sorted, x_pos - marg, right=True)   # x_b > x_a - margin  <=>  rank_b >= q1(a)
    q2 = torch.searchsorted(x_sorted, x_pos + marg, right=False)  # x_a < x_c + margin  <=>  rank_a < q2(c)

    cnt1 = torch.zeros(P, dtype=torch.int64, device=dev)
    sum1 = torch.zeros(P, dtype=torch.float64, device=dev)
    cntp = torch.zeros(P, dtype=torch.int64, device=dev)     # #{prefix [0, k2): rank >= q2}
    for j in range(max(P.bit_length(), 1)):
        key = ((arangeP >> j) * P + rank_pos)                # (P,) unique; sorted = blocks in order, ranks sorted
        if j == 0:
            skey, order = key, arangeP
        else:
            skey, order = torch.sort(key)
        csum = torch.cat([xd.new_zeros(1), torch.cumsum(x_pos[order], 0)])  # (P+1,) fp64 prefix sums
        for k, q, want_sum, cnt, acc in ((k1, q1, True, cnt1, sum1), (k2, q2, False, cntp, None)):
            sel = ((k >> j) & 1).bool()
            blk = ((k >> j) - 1).clamp(min=0)
            lo = torch.searchsorted(skey, blk * P + q)      # first element of block blk with rank >= q
            hi = (blk + 1) << j                               # end of block blk (a full block below k)
            cnt += torch.where(sel, hi - lo, 0)
            if want_sum:
                hi_c = hi.clamp(max=P)
                acc += torch.where(sel, csum[hi_c] - csum[lo], 0.0)
    cnt2 = q2 - (k2 - cntp)                                  # #{suffix [k2, P): rank < q2}
    loss_sum = (sum1 + cnt1.double() * (marg - x_pos)).sum()
    grad = torch.empty(P, dtype=torch.float64, device=dev)
    grad[pos2pair] = (cnt2 - cnt1).double()                  # back to pair order
    return loss_sum, grad


# ---------------------------------------------------------------------------------------------------------------------
# Chunked torch engine (the Triton kernel's algorithm, in torch): O(P x block) memory.
# ---------------------------------------------------------------------------------------------------------------------
def _above_below(ya: Tensor, yb: Tensor, ia: Tensor, ib: Tensor, authors: bool) -> tuple[Tensor, Tensor]:
    """(A, B) masks: a above b, a below b, in the teacher order of the chosen tie mode."""
    above = ya[:, None] > yb[None, :]
    below = ya[:, None] < yb[None, :]
    if authors:  # ties: the later pair (larger index) counts as above, as the authors' label -1
        tie = ya[:, None] == yb[None, :]
        above = above | (tie & (ia[:, None] > ib[None, :]))
        below = below | (tie & (ia[:, None] < ib[None, :]))
    return above, below


def _resim_chunked(x: Tensor, y: Tensor, margin: float, ties: str, block: int | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Loss sum (fp64) and count gradient (fp64 (P,)), not divided by N.  Each block of rows `a` visits every `b`:
    the hinge relu(x_b - x_a + margin) where a above b adds to the loss and -1 to grad_a when active; the hinge
    relu(x_a - x_b + margin) where a below b adds +1 to grad_a when active.  Each ordered pair is counted once."""
    P = x.shape[0]
    xf, yf = x.float(), y.float()
    marg = float(torch.tensor(margin, dtype=torch.float32))
    if block is None:
        block = max(1, min(P, (1 << 22) // max(P, 1)))      # ~4M elements per (block, P) temporary
    idx = torch.arange(P, device=x.device)
    loss_rows = torch.empty(P, dtype=torch.float64, device=x.device)
    grad = torch.empty(P, dtype=torch.float64, device=x.device)
    for a0 in range(0, P, block):
        a1 = min(P, a0 + block)
        xa, ya, ia = xf[a0:a1], yf[a0:a1], idx[a0:a1]
        above, below = _above_below(ya, yf, ia, idx, ties == "authors")  # (A, P)
        h_ab = (xf[None, :] - xa[:, None]) + marg            # (A, P) hinge when a above b
        act_ab = above & (h_ab > 0)
        act_ba = below & ((xa[:, None] - xf[None, :]) + marg > 0)  # hinge when a below b
        loss_rows[a0:a1] = torch.where(act_ab, h_ab, 0.0).sum(1, dtype=torch.float64)
        grad[a0:a1] = act_ba.sum(1, dtype=torch.float64) - act_ab.sum(1, dtype=torch.float64)
    return loss_rows.sum(), grad


# ---------------------------------------------------------------------------------------------------------------------
# Fused Triton kernel (forward and backward in one pass)
# ---------------------------------------------------------------------------------------------------------------------
def _teacher_keys(y: Tensor, ties: str) -> Tensor:
    """(P,) int32 key per pair such that  a above b  <=>  key_a > key_b  (and a below b <=> key_a < key_b).

    The sort engine's teacher order in pair order: authors: key = pos(a) (a strict order, ties broken by pair index);
    skip: key = first position of a's tie group, so tied pairs get equal keys and compare neither way.  The kernel
    then needs one integer compare per orientation instead of the float compares plus the tie logic."""
    pos2pair, k1, _ = _teacher_order(y, ties)
    key = torch.empty(y.shape[0], dtype=torch.int32, device=y.device)
    key[pos2pair] = k1.to(torch.int32)
    return key


if triton is not None:
    @triton.jit
    def _resim_kernel(x_ptr, key_ptr, loss_ptr, grad_ptr, P, chunk, margin,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        """Program (i, s) owns the BLOCK_A pairs a of block i and the pairs b of chunk s, [s*chunk, (s+1)*chunk).

        Math (eq. 3, both orientations of every (a, b), with d = x_b - x_a and the teacher keys k of _teacher_keys):
          a above b (k_a > k_b):  h = d + margin;  loss_a += max(h, 0);  grad_a -= [h > 0]
          a below b (k_a < k_b):  the hinge of (b above a) is x_a - x_b + margin > 0 <=> d < margin;  grad_a += 1
        so each ordered pair of pairs enters the loss once (through its upper pair a), and
          sum_a loss_a = sum_{a > b} relu(x_b - x_a + margin),   grad_a = N dL/dx_a   (module docstring, eq. 3).
        fp32 rounding: sign(fl(margin - d)) = sign(margin - d), so `d < margin` is exactly the reference's
        `(x_a - x_b) + margin > 0`, and h is the reference's `(x_b - x_a) + margin`.

        Why it is lean: every (a, b) element accumulates into its own register (loss fp32, count int32) and the tile
        is reduced over b once, after the loop: no cross-lane shuffle or barrier inside the loop (~12 SASS
        instructions per element: 2 FADD, 2 FSETP, 2 ISETP, 1 FSEL + 1 FADD for the loss, ~4 for the count).
        Padded b lanes load x = NaN, which makes both hinge tests false: no per-element mask.
        Determinism: no atomics; program (i, s) writes row s of its own (n_split, P) partial sums, which the host
        sums in a fixed order.  Counts are exact integers; the loss partials are fp32 sums of <= chunk terms.
        """
        pid_a = tl.program_id(0)
        pid_s = tl.program_id(1)
        ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)                     # (BA,)
        ma = ia < P
        xa = tl.load(x_ptr + ia, mask=ma, other=0.0).to(tl.float32)[:, None]   # (BA, 1)
        ka = tl.load(key_ptr + ia, mask=ma, other=0)[:, None]                  # (BA, 1)
        loss_acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        grad_acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.int32)
        b_lo = pid_s * chunk
        b_hi = tl.minimum(b_lo + chunk, P)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            ib = b0 + tl.arange(0, BLOCK_B)                                  # (BB,)
            mb = ib < b_hi
            xb = tl.load(x_ptr + ib, mask=mb, other=float("nan")).to(tl.float32)[None, :]  # (1, BB)
            kb = tl.load(key_ptr + ib, mask=mb, other=0)[None, :]                        # (1, BB)
            d = xb - xa                                                      # (BA, BB)
            h = d + margin
            up = (ka > kb) & (h > 0.0)      # a above b, hinge active
            dn = (ka < kb) & (d < margin)   # a below b, hinge of (b above a) active
            loss_acc += tl.where(up, h, 0.0)
            grad_acc += tl.where(up, -1, tl.where(dn, 1, 0))
        row = pid_s * P + ia
        tl.store(loss_ptr + row, tl.sum(loss_acc, axis=1), mask=ma)
        tl.store(grad_ptr + row, tl.sum(grad_acc, axis=1), mask=ma)


# CUDA launch shape.  Tile (BLOCK_A, BLOCK_B) = (64, 64) with 8 warps: 16 (a, b) elements per thread (one b, 16
# rows a), i.e. 32 accumulator registers; the kernel compiles to 80 registers, no spills, ~12 SASS instructions per
# element on sm_80 and sm_90.  (64, 128) puts 32 elements in each thread and needs ~190 registers.
# tests/test_kernel_compile.py compiles every launch variant for both targets; bench/kernel_stats.py prints the figures.
CUDA_TILES = (64, 64, 8)           # BLOCK_A, BLOCK_B, num_warps
# Split the b range until the grid has at least this many programs: 4 per SM of an H100/H200 (132 SMs), so the last
# wave is short.  m = 128 (P = 8128) has only 127 blocks of a; it gets 5 chunks (635 programs), m = 90 gets 9 (567).
# The split depends on P and the tiles only, never on the device, so results are the same bits on every GPU.
TARGET_PROGRAMS = 4 * 132


def _resim_split(P: int, block_a: int, block_b: int) -> tuple[int, int]:
    """(n_split, chunk): the b range [0, P) cut into n_split chunks of `chunk` pairs (a multiple of block_b)."""
    n_a, n_b = triton.cdiv(P, block_a), triton.cdiv(P, block_b)
    per = triton.cdiv(n_b, min(n_b, max(1, triton.cdiv(TARGET_PROGRAMS, n_a))))   # b tiles per chunk
    chunk = per * block_b
    return triton.cdiv(P, chunk), chunk


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device | str) -> bool:
    """The kernel runs on CUDA devices, or anywhere under TRITON_INTERPRET=1 (set before triton is imported)."""
    return triton is not None and (torch.device(device).type == "cuda" or _interpreting())


def _resim_triton(x: Tensor, y: Tensor, margin: float, ties: str,
                  tiles: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Loss sum (fp64 scalar) and count gradient (fp64 (P,)), not divided by N, from the fused kernel.

    tiles = (BLOCK_A, BLOCK_B, num_warps); default CUDA_TILES on CUDA, one big tile under the interpreter (its
    programs run one after another in numpy, so few large tiles are fastest there)."""
    if not triton_available(x.device):
        raise RuntimeError("losses: impl='triton' needs a CUDA device or TRITON_INTERPRET=1 set before triton is "
                           f"imported (tensor on {x.device}, triton {'missing' if triton is None else 'present'})")
    if y.device != x.device:
        raise ValueError(f"losses: student pairs are on {x.device} but teacher pairs are on {y.device}")
    P = x.shape[0]
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.contiguous()  # the interpreter silently misreads strided inputs
    key = _teacher_keys(y, ties)                                           # (P,) int32
    if tiles is None:
        if x.device.type == "cuda":
            tiles = CUDA_TILES
        else:
            b = min(1024, triton.next_power_of_2(max(P, 16)))
            tiles = (b, b, 4)
    block_a, block_b, num_warps = tiles
    n_split, chunk = _resim_split(P, block_a, block_b)
    loss_part = torch.empty(n_split, P, dtype=torch.float32, device=x.device)   # row s: sums over chunk s
    grad_part = torch.empty(n_split, P, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(P, block_a), n_split)
    # launch on x's device, not on whatever device is current (a rank may hold tensors on cuda:k, k != current)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _resim_kernel[grid](x, key, loss_part, grad_part, P, chunk, float(torch.tensor(margin, dtype=torch.float32)),
                            BLOCK_A=block_a, BLOCK_B=block_b, num_warps=num_warps)
    # the second, deterministic step: fixed-order fp64 sums over the chunks (no atomics anywhere)
    return loss_part.double().sum(), grad_part.sum(0, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch + autograd
# ---------------------------------------------------------------------------------------------------------------------
# `auto` on CUDA, from a cost model (P = m (m - 1) / 2 pairs; to be replaced by what `bench/bench_losses.py --device
# cuda` measures, which prints this model next to the measured times):
#   kernel: P^2 (a, b) elements at ~12 SASS instructions each (bench/kernel_stats.py); an SM issues 4 warp
#           instructions (128 lanes) per clock, so an H100 SXM (132 SMs, 1.98 GHz) retires 132 x 128 / 12 x 1.98e9
#           = 2.8e12 elements/s at best; we count half of that:            T_kernel = P^2 / 1.4e12 s.
#   sort:   ceil(log2 P) levels; each is ~40 small torch ops (~6 us each while the GPU is launch-bound, 240 us) plus a
#           radix sort, gathers and searchsorted over P entries (~3 ns per entry):
#                                                                           T_sort = ceil(log2 P) (240e-6 + 3e-9 P) s.
#   m = 128 (P = 8,128):    kernel 0.05 ms, sort 3.4 ms;   m = 400 (P = 79,800):  4.5 ms vs 8.2 ms;
#   m = 512 (P = 130,816):  12.2 ms vs 10.8 ms;             equal at P ~ 119,000: the kernel up to m = 488.
KERNEL_ELEMS_PER_S = 1.4e12
SORT_LEVEL_S, SORT_ENTRY_S = 240e-6, 3e-9


def resim_cost_model(P: int) -> tuple[float, float]:
    """Estimated seconds (kernel, sort engine) for P pairs on an H100-class GPU: the model behind `auto`."""
    return P * P / KERNEL_ELEMS_PER_S, max(1, (P - 1).bit_length()) * (SORT_LEVEL_S + SORT_ENTRY_S * P)


def auto_engine(P: int, device_type: str) -> str:
    """The engine impl="auto" runs for P pairs on a device of this type ("cuda", "cpu", ...)."""
    if device_type == "cuda" and triton is not None:
        t_kernel, t_sort = resim_cost_model(P)
        return "triton" if t_kernel < t_sort else "sort"
    return "sort"  # elsewhere the kernel would only run interpreted


def _pick_impl(impl: str, x: Tensor) -> str:
    return auto_engine(x.shape[0], x.device.type) if impl == "auto" else impl


class _ResimPairs(torch.autograd.Function):
    """L_resim as a function of the pair vectors x (P,) (differentiable) and y (P,) (teacher, no gradient).

    forward computes the loss and dL/dx together (every engine gets the gradient for free in the same pass) and
    saves only dL/dx (P,); backward scales it by grad_output."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, margin: float, ties: str, impl: str) -> Tensor:
        P = x.shape[0]
        N = _n_pairs_of_pairs(P)
        if N == 0:
            ctx.x_dtype = x.dtype
            ctx.save_for_backward(torch.zeros_like(x, dtype=torch.float32))
            return x.new_zeros((), dtype=torch.float32)
        engine = {"sort": _resim_sort, "triton": _resim_triton, "chunked": _resim_chunked}[impl]
        loss_sum, grad = engine(x.detach(), y.detach(), margin, ties)
        ctx.x_dtype = x.dtype
        ctx.save_for_backward((grad / N).float())
        return (loss_sum / N).float()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (g,) = ctx.saved_tensors
        return (grad_out * g).to(ctx.x_dtype), None, None, None, None


def resim_pairs(x: Tensor, y: Tensor, margin: float = 0.015, ties: str = "skip", impl: str = "auto") -> Tensor:
    """eq. 3 on precomputed pair similarities: x (P,) student (differentiable), y (P,) teacher.  fp32 scalar."""
    if ties not in TIES:
        raise ValueError(f"losses.resim_pairs: ties must be one of {TIES}, got {ties!r}")
    if impl not in IMPLS or impl == "reference":
        raise ValueError(f"losses.resim_pairs: impl must be one of {IMPLS[:-1]}, got {impl!r}")
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"losses.resim_pairs: x and y must be (P,) vectors of one length, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"losses.resim_pairs: student pairs are on {x.device} but teacher pairs are on {y.device}")
    return _ResimPairs.apply(x, y.detach(), float(margin), ties, _pick_impl(impl, x))


def resim_loss(s: Tensor, t: Tensor, margin: float = 0.015, ties: str = "skip", impl: str = "auto") -> Tensor:
    """eq. 3, exact, without anything P x P.  s (m, d) student, t (m, D) teacher (L2-normalised rows) -> fp32 scalar.

    ties: "skip" (paper) or "authors" (their code's labelling, see the module docstring).
    impl: "auto" (sort engine on the CPU; on CUDA the Triton kernel up to m = 488, the sort engine beyond: see
    resim_cost_model), "sort", "triton", "chunked", or "reference" (materialising; memory O(P^2)).  Every engine
    computes the same function; gradients flow to s only (the loss is piecewise constant in t).
    """
    _check_pair(s, t, False, "resim_loss")
    if impl == "reference":
        return resim_loss_reference(s, t, margin, ties)
    x = pair_sims(s)             # (P,) differentiable
    y = pair_sims(t.detach())    # (P,)
    return resim_pairs(x, y, margin, ties, impl)


# =====================================================================================================================
# eq. 4 per stage
# =====================================================================================================================
def _heads_by_name(student: dict[int, Tensor]) -> list[tuple[str, Tensor]]:
    """FC1..FC4 in head_dims order (12288, 1024, 512, 256): the widest head is FC1."""
    if not student:
        raise ValueError("losses.distill_loss: no student heads given")
    dims = sorted(student, reverse=True)
    if len(dims) > len(HEAD_NAMES):
        raise ValueError(f"losses.distill_loss: at most {len(HEAD_NAMES)} heads, got dims {dims}")
    return [(HEAD_NAMES[i], student[d]) for i, d in enumerate(dims)]


MRL_TEACHERS = ("teacher", "self")  # stage 3: who teaches FC2-4 (sec. 2.4; "self" = the proposal at its end)


def prefix_heads(s1: Tensor, dims) -> list[tuple[str, Tensor]]:
    """Matryoshka prefixes of FC1 as stand-ins for separate heads: for each d in dims the first d coordinates of the
    (m, D1) FC1 rows, L2-renormalised -> [("fc1[:d]", (m, d)), ...].  The paper trains a separate FC layer per dim
    (sec. 2.3-2.4); the authors' MRL code and Matryoshka training (Kusupati et al. 2022) train prefixes of one
    vector instead.  A prefix IS a head: FC1's first d rows as weight and bias, then the head's normalisation, which is
    how train.py --mrl-prefix exports FC2-4."""
    D1 = s1.shape[-1]
    bad = [d for d in dims if not 0 < int(d) < D1]
    if bad:
        raise ValueError(f"losses.prefix_heads: prefix dims must be in (0, {D1}) (FC1's width), got {bad}")
    return [(f"fc1[:{int(d)}]", F.normalize(s1[:, :int(d)], p=2, dim=-1)) for d in sorted(dims, reverse=True)]


def distill_loss(stage: int, student: dict[int, Tensor], teacher: Tensor | dict[int, Tensor],
                 weights: tuple[float, float, float] = (10.0, 200.0, 20.0), margin: float = 0.015,
                 ties: str = "skip", impl: str = "auto", mrl_teacher: str = "teacher", prefix_dims=()
                 ) -> tuple[Tensor, dict[str, float]]:
    """The training objective of each stage (eq. 4 with lambda = weights).  Returns (total, parts), where parts holds
    the UNWEIGHTED losses as floats under "fc1.cos", "fc1.sim", "fc1.resim", "fc2.sim", ... plus "total".

    stage 1, 2: FC1 (m, 12288) vs the concatenated teacher (m, 12288): l1 cos + l2 sim + l3 resim (sec. 2.3).
    stage 3:    FC1 keeps all three losses; FC2-4 cannot use L_cos (widths differ) and use L_sim and L_resim against
                the same teacher similarities (sec. 2.4).  Combined like the authors' MRL code
                (model_distill.py: sim and triplet losses averaged over the reduced dims, cosine on the full vector):
                  total = l1 cos(FC1) + l2 mean_h sim(h) + l3 mean_h resim(h),  h over all heads given.
                mrl_teacher="self" (the proposal closing sec. 2.4, never measured by the authors): FC2-4's L_sim and
                L_resim targets are FC1's own vectors of this same forward pass, detached, instead of the teacher's;
                FC1 keeps its three losses against the teacher.  Same pass, not a frozen copy: the short heads
                follow the FC1 they will be compared with at the end of training (a frozen stage-2 copy would
                teach a geometry FC1 keeps moving away from), and it costs no second model or forward pass.
                Detaching stops these losses from pulling FC1 toward the short heads; they still train the shared
                body through the short heads' own path, as with the teacher as target.
                prefix_dims=(256, 128, 64) (train.py --mrl-prefix): `student` holds FC1 only and the short "heads"
                are FC1's first d coordinates, renormalised (prefix_heads), named "fc1[:d]"; the same formula
                applies with h over FC1 and its prefixes.  Their losses reach FC1 itself (the prefixes are FC1's
                coordinates), also under mrl_teacher="self", where only the target is detached.
    stage 4:    self-distillation of the image vectors toward the frozen caption vectors (sec. 2.5): `teacher` is a
                dict {dim: (m, dim)} of caption vectors per head; every head gets all three losses and
                  total = mean_h (l1 cos(h) + l2 sim(h) + l3 resim(h)).
    Teacher tensors never receive gradients.
    """
    l1, l2, l3 = weights
    if mrl_teacher not in MRL_TEACHERS:
        raise ValueError(f"losses.distill_loss: mrl_teacher must be one of {MRL_TEACHERS}, got {mrl_teacher!r}")
    if mrl_teacher == "self" and stage != 3:
        raise ValueError(f"losses.distill_loss: mrl_teacher='self' is a stage-3 setting (FC2-4 learn from FC1), "
                         f"not stage {stage}")
    heads = _heads_by_name(student)
    if prefix_dims:
        if stage != 3 or len(heads) != 1:
            raise ValueError(f"losses.distill_loss: prefix_dims is a stage-3 setting on FC1 alone (its prefixes "
                             f"replace FC2-4), got stage {stage} with heads {sorted(student, reverse=True)}")
        heads = heads + prefix_heads(heads[0][1], prefix_dims)
    parts: dict[str, Tensor] = {}

    def rs(s: Tensor, t: Tensor) -> Tensor:
        return resim_loss(s, t, margin=margin, ties=ties, impl=impl)

    if stage in (1, 2):
        name, s = heads[0]
        if not isinstance(teacher, Tensor):
            raise TypeError(f"losses.distill_loss: stage {stage} needs the (m, D) teacher matrix, got {type(teacher)}")
        parts[f"{name}.cos"] = cosine_loss(s, teacher)
        parts[f"{name}.sim"] = similarity_loss(s, teacher)
        parts[f"{name}.resim"] = rs(s, teacher)
        total = l1 * parts[f"{name}.cos"] + l2 * parts[f"{name}.sim"] + l3 * parts[f"{name}.resim"]
    elif stage == 3:
        if not isinstance(teacher, Tensor):
            raise TypeError(f"losses.distill_loss: stage 3 needs the (m, D) teacher matrix, got {type(teacher)}")
        name1, s1 = heads[0]
        y = pair_sims(teacher.detach())  # the teacher's pair similarities, shared by every head it teaches
        if mrl_teacher == "self":
            if len(heads) < 2:
                raise ValueError("losses.distill_loss: mrl_teacher='self' needs shorter heads than FC1 to teach, "
                                 f"got only {name1} ({s1.shape[-1]} dims)")
            own = s1.detach()            # (m, D1): FC1 of this forward pass, no gradient back into FC1
            y_own = pair_sims(own)       # (P,) its pair similarities, shared by FC2-4
        parts[f"{name1}.cos"] = cosine_loss(s1, teacher)
        for k, (name, s) in enumerate(heads):
            t, yt = (own, y_own) if (k > 0 and mrl_teacher == "self") else (teacher, y)
            parts[f"{name}.sim"] = similarity_loss(s, t)
            parts[f"{name}.resim"] = (rs(s, t) if impl == "reference"
                                      else resim_pairs(pair_sims(s), yt, margin, ties, impl))
        n = len(heads)
        total = (l1 * parts[f"{name1}.cos"] + l2 * sum(parts[f"{h}.sim"] for h, _ in heads) / n
                 + l3 * sum(parts[f"{h}.resim"] for h, _ in heads) / n)
    elif stage == 4:
        if not isinstance(teacher, dict):
            raise TypeError("losses.distill_loss: stage 4 needs a dict {dim: (m, dim) caption vectors}, got "
                            f"{type(teacher)}")
        per_head = []
        for name, s in heads:
            d = s.shape[-1]
            if d not in teacher:
                raise KeyError(f"losses.distill_loss: stage 4 caption vectors missing for head {name} (dim {d}); "
                               f"have {sorted(teacher)}")
            t = teacher[d]
            parts[f"{name}.cos"] = cosine_loss(s, t)
            parts[f"{name}.sim"] = similarity_loss(s, t)
            parts[f"{name}.resim"] = rs(s, t)
            per_head.append(l1 * parts[f"{name}.cos"] + l2 * parts[f"{name}.sim"] + l3 * parts[f"{name}.resim"])
        total = torch.stack(per_head).mean()
    else:
        raise ValueError(f"losses.distill_loss: stage must be 1, 2, 3 or 4, got {stage!r}")
    keys = list(parts)
    values = torch.stack([parts[k].detach().float() for k in keys] + [total.detach().float()]).tolist()  # one sync
    out = dict(zip(keys + ["total"], values))
    return total, out
