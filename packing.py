"""Packed sequences: no FLOPs on padding. The texts of a batch are laid end to end in rows of a token budget; every
text attends only to its own tokens (block-diagonal attention, bidirectional or causal as the body is), positions
restart at 0 in every text, and pooling (mean, CLS, last token, mean without the first k tokens) is per text.

model.py (Qwen2 / Qwen3 / Mistral bodies, the Jasper student), teachers.py (BERT and decoder sentence-transformers
teachers, stella, NV-Embed) and data.py (TrainLoader) use it; the padded path (one text per row) stays the readable
reference, and tests/test_packing.py checks that both give the same vectors and gradients. Attention goes through
torch's SDPA with a dense (R, 1, L, L) block-diagonal bool mask: measured on this project's CPU (torch 2.13), flex
attention has no CPU backward and its compiled forward was 2.7-3x slower than SDPA at these shapes, and SDPA on
jagged nested tensors failed on the CPU (`aten::stride does not exist`); with rows no longer than max_length the
dense mask costs little. Figures and the choice: docs/model.md "Packing".

The other way to spend little on padding, for an input set known up front, sits here too: `length_sorted_batches`
(inputs sorted longest first, cut into batches; the teachers' encode) and `length_sorted_encode` over it
(JasperModel.encode).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from checkpoints import progress


def _first_fit_decreasing(lengths: Sequence[int], order: list[int], budget: int) -> tuple[list[list[int]], list[int]]:
    """Texts in `order` (longest first), each into the first row with room for it, else a new row."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = lengths[i]
        for r, f in enumerate(fill):
            if f + n <= budget:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    return rows, fill


def plan_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Which texts share a row (indices into `lengths`), deterministic (ties by index).

    As few rows as first-fit decreasing needs at `budget` tokens; then the shortest row length that still holds the
    texts in that many rows (binary search over the budget), so rows end level and a small share (16 texts of a
    rank under torchrun) does not leave one long row beside short ones. A text longer than `budget` gets its own
    row of its own length (callers truncate before packing, so that only happens when they ask for it).
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    rows, fill = _first_fit_decreasing(lengths, order, max(budget, longest))
    k = len(rows)
    lo, hi = max(longest, -(-sum(lengths) // k)), max(fill)
    while lo < hi:  # smallest row length <= max(fill) at which FFD still needs only k rows
        mid = (lo + hi) // 2
        r2, f2 = _first_fit_decreasing(lengths, order, mid)
        if len(r2) <= k:
            rows, hi = r2, max(f2)
        else:
            lo = mid + 1
    return rows


def split_even(items: Sequence, n: int) -> list[list]:
    """`items` in order, cut into n consecutive groups whose sizes differ by at most one (larger first); a group is
    empty only when there are fewer items than groups."""
    q, extra = divmod(len(items), n)
    cuts = [0]
    for k in range(n):
        cuts.append(cuts[-1] + q + (k < extra))
    return [list(items[a:b]) for a, b in zip(cuts, cuts[1:])]


def plan_step(lengths: Sequence[int], world_size: int, micro_batch: int,
              budget: int | None = None) -> list[list[list[list[int]]]]:
    """The layout of ONE global batch over the ranks, computed the same on every rank from the global batch alone:
    plan[r][k] = the rows of rank r's k-th forward, a row = the texts (indices into `lengths`) that share it.

    The invariant it exists for (docs/train.md, "Every rank runs the same collectives"): every rank gets the SAME
    number of forwards, ceil(ceil(rows / world_size) / micro_batch), whatever its texts. Under FSDP2 each forward
    all-gathers every block's parameters and its backward reduce-scatters them, so ranks that ran different numbers
    of forwards would pair one rank's collective with another's (gloo: a size-mismatch crash; NCCL: a hang or,
    worse, tensors silently mixed). A forward with no text left for it (fewer rows than forwards on a rank) is
    returned as an empty list: the trainer runs it on a one-token dummy input and drops its output.

    Rows: budget=None (padded batches) -> one text per row, longest first; budget=L (packing) -> plan_rows over the
    WHOLE global batch, then rows with several texts are split in two until there are at least world_size rows
    (so every rank gets work when the batch allows). Rows are dealt longest first in snake order (ranks 0..W-1,
    then W-1..0, ...), so every rank holds ceil or floor of rows / W rows and about the same number of tokens: one
    rank drawing all the long texts no longer makes the others wait. A rank's rows go to its forwards in
    consecutive, near-equal groups of at most micro_batch rows. Only which rank computes which text depends on the
    world size; the losses see the whole gathered global batch (eq. 1-3 are invariant to its order).
    """
    if world_size < 1 or micro_batch < 1:
        raise ValueError(f"world_size {world_size} and micro_batch {micro_batch} must be >= 1")
    if budget is None:
        rows = [[i] for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))]
    else:
        rows = plan_rows(lengths, budget)
        while len(rows) < world_size and any(len(r) > 1 for r in rows):
            k = max(range(len(rows)), key=lambda j: (len(rows[j]), -j))  # the row of most texts (first on ties)
            half = len(rows[k]) // 2
            rows[k:k + 1] = [rows[k][:half], rows[k][half:]]
    tokens = [sum(lengths[i] for i in row) for row in rows]
    order = sorted(range(len(rows)), key=lambda k: (-tokens[k], rows[k][0]))  # longest row first, ties by text
    per_rank: list[list[list[int]]] = [[] for _ in range(world_size)]
    for j, k in enumerate(order):
        lap, pos = divmod(j, world_size)
        per_rank[pos if lap % 2 == 0 else world_size - 1 - pos].append(rows[k])  # snake: 0..W-1, W-1..0, ...
    n_forwards = max(1, -(-max(len(p) for p in per_rank) // micro_batch))
    return [split_even(p, n_forwards) for p in per_rank]


@dataclass
class Packed:
    """N texts packed into R rows of L tokens (see plan_rows). Text i's tokens are input_ids.view(-1)[starts[i]:
    starts[i] + lengths[i]]; outputs of a packed forward come back per text, in the order 0..N-1 the texts were
    given in (not the row order)."""
    input_ids: Tensor     # (R, L) the texts laid end to end; pad_id after the last text of a row
    position_ids: Tensor  # (R, L) position of each token within its own text: 0, 1, ... restarting per text; 0 on pad
    seq_ids: Tensor       # (R, L) which text (0..N-1) each token belongs to; -1 on padding
    starts: Tensor        # (N,) flat index r * L + p of each text's first token
    lengths: Tensor       # (N,) tokens per text
    slots: Tensor         # (N,) rank of each text within its row (0 = first text of the row)

    @classmethod
    def from_ids(cls, ids: Sequence[Sequence[int]], budget: int, pad_id: int = 0,
                 rows: list[list[int]] | None = None) -> "Packed":
        """Pack token-id lists into rows of at most `budget` tokens (a longer text gets a row of its own length).
        `rows` (indices into ids, e.g. from plan_rows) fixes the layout instead of planning it here."""
        lengths = [len(x) for x in ids]
        rows = plan_rows(lengths, budget) if rows is None else rows
        if sorted(i for r in rows for i in r) != list(range(len(ids))):
            raise ValueError(f"rows must use every one of the {len(ids)} texts exactly once")
        L = max([sum(lengths[i] for i in r) for r in rows] + [1])
        R = max(len(rows), 1)
        input_ids = torch.full((R, L), pad_id, dtype=torch.long)
        position_ids = torch.zeros((R, L), dtype=torch.long)
        seq_ids = torch.full((R, L), -1, dtype=torch.long)
        starts = torch.zeros(len(ids), dtype=torch.long)
        slots = torch.zeros(len(ids), dtype=torch.long)
        for r, row in enumerate(rows):
            p = 0
            for s, i in enumerate(row):
                n = lengths[i]
                input_ids[r, p:p + n] = torch.as_tensor(ids[i], dtype=torch.long)
                position_ids[r, p:p + n] = torch.arange(n)
                seq_ids[r, p:p + n] = i
                starts[i], slots[i] = r * L + p, s
                p += n
        return cls(input_ids, position_ids, seq_ids, starts, torch.tensor(lengths, dtype=torch.long), slots)

    @property
    def n_texts(self) -> int:
        return self.lengths.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real tokens (padding efficiency = n_tokens / numel)."""
        return int(self.lengths.sum())

    def numel(self) -> int:
        """Token slots the model computes on, padding included."""
        return self.input_ids.numel()

    def to(self, device) -> "Packed":
        return Packed(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def attention_mask(self, causal: bool) -> Tensor:
        """(R, 1, L, L) bool for SDPA, True = may attend: the same text (block-diagonal), and for a causal body
        also not a later position. Padding positions attend to padding only: finite values that nothing reads."""
        seq = self.seq_ids
        mask = seq[:, :, None] == seq[:, None, :]                                   # (R, L, L)
        if causal:
            L = seq.shape[1]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        return mask[:, None]                                                        # (R, 1, L, L)

    def unpack(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(R, L, H) packed states -> ((N, T, H) one text per row, right-padded with zeros; (N, T) int mask), T = the
        longest text: hands a packed forward's states to any padded pooling (teachers.py's sentence-transformers
        modes) at the cost of one gather, after the body has run without padding."""
        R, L, H = hidden.shape
        T = max(int(self.lengths.max()), 1) if self.n_texts else 1
        pos = torch.arange(T, device=hidden.device)                                 # (T,)
        mask = pos[None, :] < self.lengths[:, None]                                 # (N, T)
        idx = (self.starts[:, None] + pos[None, :]).clamp(max=R * L - 1)            # (N, T) flat token index
        out = hidden.reshape(R * L, H)[idx].masked_fill(~mask[..., None], 0)        # (N, T, H)
        return out, mask.long()

    def pool(self, hidden: Tensor, mode: str = "mean", skip_first: int = 0) -> Tensor:
        """Per-text pooling of a packed forward's (R, L, H) states -> (N, H) fp32, texts in order 0..N-1.

        mean: the average over each text's tokens, leaving out its first `skip_first` tokens (NV-Embed's
        instruction tokens), as mean_pool does on padded rows; a text with no token left gives zeros.
        cls / last: the first / last token of each text.
        The mean is one batched matmul per row, W (R, S, L) @ hidden (R, L, H), with W[r, s, p] = 1 / count when
        token p of row r belongs to the row's s-th text: deterministic on every device (no scatter-add atomics),
        and its gradient is W^T @ grad, the same 1 / count spread back over the text's tokens.
        """
        R, L, H = hidden.shape
        flat = hidden.reshape(R * L, H)
        if mode == "cls":
            return flat[self.starts].float()
        if mode == "last":
            return flat[self.starts + (self.lengths - 1).clamp(min=0)].float()
        if mode != "mean":
            raise ValueError(f"pooling mode {mode!r}: expected 'mean', 'cls' or 'last'")
        real = self.seq_ids >= 0                                                    # (R, L)
        seq = self.seq_ids.clamp(min=0)
        keep = real & (self.position_ids >= skip_first)
        count = (self.lengths - skip_first).clamp(min=1).to(torch.float32)          # (N,)
        w = keep.to(torch.float32) / count[seq]                                     # (R, L)
        S = int(self.slots.max()) + 1 if self.n_texts else 1
        slot = torch.where(real, self.slots[seq], -1)                               # (R, L)
        W = (slot[:, None, :] == torch.arange(S, device=slot.device)[None, :, None]) * w[:, None, :]  # (R, S, L)
        per_slot = torch.bmm(W, hidden.float())                                     # (R, S, H)
        return per_slot[self.starts // L, self.slots]                               # (N, H)


# ---------------------------------------------------------------------------------------------------------------------
# Without packing: length-sorted padded batches (JasperModel.encode, text and image+text), so each batch pads only to
# its own longest input. The simpler of the two ways to keep padding small when a whole input set is known up front.
# ---------------------------------------------------------------------------------------------------------------------
def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Input indices longest first (stable: equal lengths keep their order), cut into batches of batch_size: each
    batch pads to its own longest, and a memory problem shows on the first batch rather than the last."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def length_sorted_encode(lengths: Sequence[int], dims: Sequence[int], batch_size: int,
                         batch: Callable[[list[int]], dict[int, Tensor]], desc: str, unit: str,
                         enabled: bool) -> dict[int, Tensor]:
    """{D: (N, D) fp32 on the CPU} in input order, from `batch(indices) -> {D: (b, D)}` run over
    length_sorted_batches. Progress with rate and ETA."""
    out = {D: torch.empty(len(lengths), D, dtype=torch.float32) for D in dims}
    prog = progress(total=len(lengths), desc=desc, unit=unit, enabled=enabled)
    for idx in length_sorted_batches(lengths, batch_size):
        vec = batch(idx)                                                              # {D: (b, D)}
        for D in dims:
            out[D][torch.tensor(idx)] = vec[D].float().cpu()                         # back to input order
        prog.update(len(idx))
    prog.close()
    return out
