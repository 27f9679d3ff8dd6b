"""Paged KV cache: ref-counted blocks, block tables, and a paged-attention torch runner.

Why blocks: SMC-SD resamples particles every few rounds. With one contiguous cache per row,
a resample copies the whole history of every particle that dies. With a block table, a
duplicated particle simply points at its ancestor's blocks: every *full* block is shared
through a reference count, and only the *partial last block* (the one the row will write
into next) is copied, so each row keeps exclusive ownership of the block it writes. The
same idea is what the reference engine does with its ref-counted token slots.

Three layers, each usable alone:

- `BlockAllocator`: a free stack of block ids and a reference count per block. Raises on a
  double free, on an increment of a free block, and when it runs out of blocks.
- `BlockTables`: one row per particle, `table[row, i]` = the block holding tokens
  `[i * tokens_per_block, (i + 1) * tokens_per_block)` of that row (`-1`: none), plus the
  number of tokens each row holds. Its operations (`add_rows`, `fork`, `reorder`, `reserve`,
  `advance`, `rollback`, `keep`) keep the ref counts exact and return the physical block copies the
  caller must apply (`BlockCopies`). The same tables drive the CPU runner below and the
  TensorRT-LLM runner (`runners/tensorrt.py`), which passes them to the attention plugin as
  `kv_cache_block_offsets`.
- `PagedRunner`: the `Runner` interface for Llama-architecture transformers models on any
  torch device, with the K/V of every layer in one block pool and attention computed by
  gathering each row's blocks through its table. It exists to exercise the in-flight
  reorder end to end on CPU, and it is a real backend too. Its pool is layer-major,
  `[num_layers, 2, kv_heads, num_blocks, tokens_per_block, head_dim]`, so one `index_select`
  per layer gathers a row's keys; TensorRT-LLM's pool is block-major (see runners/tensorrt.py).
  The block tables and their copies are the same for both.

Invariants (checked by `BlockTables.check`): the ref count of a block equals the number of
table entries pointing at it; free blocks have count 0 and appear once on the free stack;
each row has exactly `ceil(length / tokens_per_block)` blocks; a row's partial last block has
count 1 (so writing into it never changes another row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import compat
from ..resampling import CopyPlan

_EMPTY = -1
BLOCK_DIM = 3  # the block axis of PagedRunner's pool [layers, 2, kv_heads, blocks, tokens_per_block, head_dim]


def _ceil_div(a: torch.Tensor | int, b: int):
    return (a + b - 1) // b


@dataclass(frozen=True)
class BlockCopies:
    """Physical copies `pool[dst[i]] <- pool[src[i]]` a table operation needs.

    `dst` blocks are freshly allocated and never appear in `src`, so all copies can be
    applied at once (`pool.index_copy_(dim, dst, pool.index_select(dim, src))`).
    """

    src: torch.Tensor
    dst: torch.Tensor

    def __len__(self) -> int:
        return int(self.dst.numel())

    @staticmethod
    def empty() -> "BlockCopies":
        none = torch.empty(0, dtype=torch.long)
        return BlockCopies(none, none)

    def apply(self, pool: torch.Tensor, dim: int = 0) -> None:
        """Copy whole blocks (every layer, K and V) inside a pool whose block axis is `dim`."""
        if len(self) == 0:
            return
        src = self.src.to(pool.device)
        dst = self.dst.to(pool.device)
        pool.index_copy_(dim, dst, pool.index_select(dim, src))


class BlockAllocator:
    """Block ids `0 .. num_blocks-1`, a free stack and a reference count per block."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least one block.")
        self.num_blocks = int(num_blocks)
        self.ref_counts = torch.zeros(self.num_blocks, dtype=torch.int32)
        # Free stack, top at the end; popping from the top hands out low ids first.
        self._free = torch.arange(self.num_blocks - 1, -1, -1, dtype=torch.long)
        self._num_free = self.num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def free_blocks(self) -> torch.Tensor:
        return self._free[: self._num_free].clone()

    def grow(self, extra: int) -> None:
        """Add `extra` fresh blocks (ids `num_blocks ..`), for pools that can grow."""
        if extra <= 0:
            return
        new_ids = torch.arange(self.num_blocks + extra - 1, self.num_blocks - 1, -1, dtype=torch.long)
        free = torch.cat([new_ids, self._free[: self._num_free]])  # old free blocks stay on top
        self._free = torch.cat([free, torch.empty(self.num_blocks - self._num_free, dtype=torch.long)])
        self._num_free += extra
        self.ref_counts = torch.cat([self.ref_counts, torch.zeros(extra, dtype=torch.int32)])
        self.num_blocks += extra

    def allocate(self, n: int) -> torch.Tensor:
        """`n` free blocks, each with reference count 1."""
        n = int(n)
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        if n > self._num_free:
            raise RuntimeError(
                f"KV cache out of blocks: {n} needed, {self._num_free} of {self.num_blocks} free. "
                "Give the runner more blocks (num_blocks), or fewer prompts x particles or a shorter "
                "max_new_tokens."
            )
        top = self._num_free
        blocks = self._free[top - n : top].flip(0).clone()
        self._num_free = top - n
        self.ref_counts[blocks] = 1
        return blocks

    def incref(self, blocks: torch.Tensor) -> None:
        """One more reference per occurrence (repeats count several times)."""
        if blocks.numel() == 0:
            return
        if bool((self.ref_counts[blocks] <= 0).any()):
            bad = blocks[self.ref_counts[blocks] <= 0].unique().tolist()
            raise RuntimeError(f"Block table corrupted: new reference to free block(s) {bad}.")
        self.ref_counts.index_add_(0, blocks, torch.ones_like(blocks, dtype=torch.int32))

    def decref(self, blocks: torch.Tensor) -> torch.Tensor:
        """One reference less per occurrence; blocks that reach 0 go back on the free stack.
        Returns the freed blocks. Raises (before changing anything) on a double free."""
        if blocks.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        unique, counts = blocks.unique(return_counts=True)
        if bool((self.ref_counts[unique] < counts).any()):
            bad = unique[self.ref_counts[unique] < counts].tolist()
            raise RuntimeError(f"Block table corrupted: double free of block(s) {bad}.")
        self.ref_counts[unique] -= counts.to(torch.int32)
        freed = unique[self.ref_counts[unique] == 0]
        n = freed.numel()
        self._free[self._num_free : self._num_free + n] = freed
        self._num_free += n
        return freed


class BlockTables:
    """Per-row block tables over a `BlockAllocator` (see the module docstring)."""

    def __init__(self, allocator: BlockAllocator, tokens_per_block: int, max_blocks_per_row: int | None = None,
                 grow: bool = False):
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block={tokens_per_block}: use a positive block size (16, 32 or 64).")
        self.allocator = allocator
        self.tokens_per_block = int(tokens_per_block)
        self.max_blocks_per_row = max_blocks_per_row
        self.grow = grow  # allocate more blocks instead of failing (the CPU pool grows with them)
        self.table = torch.full((0, 1), _EMPTY, dtype=torch.long)
        self.lengths = torch.zeros(0, dtype=torch.long)

    # ----------------------------------------------------------------- helpers
    @property
    def num_rows(self) -> int:
        return int(self.lengths.numel())

    def num_blocks_of(self, lengths: torch.Tensor) -> torch.Tensor:
        return _ceil_div(lengths, self.tokens_per_block)

    def _allocate(self, n: int) -> torch.Tensor:
        if self.grow and n > self.allocator.num_free:
            self.allocator.grow(max(n - self.allocator.num_free, self.allocator.num_blocks))
        return self.allocator.allocate(n)

    def _widen(self, width: int) -> None:
        if self.max_blocks_per_row is not None and width > self.max_blocks_per_row:
            raise RuntimeError(
                f"A row needs {width} KV blocks of {self.tokens_per_block} tokens but at most "
                f"{self.max_blocks_per_row} fit (the engine's max_seq_len). Rebuild the engines with a larger "
                "--max-input-len / --max-output-len, or ask for fewer max_new_tokens."
            )
        if width > self.table.shape[1]:
            pad = torch.full((self.table.shape[0], width - self.table.shape[1]), _EMPTY, dtype=torch.long)
            self.table = torch.cat([self.table, pad], dim=1)

    def _valid(self, table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(table.shape[1])
        return columns < self.num_blocks_of(lengths).unsqueeze(1)

    def _share_full_blocks(self, src: torch.Tensor) -> torch.Tensor:
        """Table rows for new copies of rows `src` (repeats allowed) that share their full
        blocks (reference counts raised). Their partial last block is still the source's:
        `_copy_partials` replaces it. The two are separate steps so that a caller can release
        old blocks in between (after the increments, before the allocations)."""
        rows = self.table[src].clone()
        full = self.lengths[src] // self.tokens_per_block
        columns = torch.arange(rows.shape[1])
        self.allocator.incref(rows[columns < full.unsqueeze(1)])
        return rows

    def _copy_partials(self, rows: torch.Tensor, src: torch.Tensor) -> BlockCopies:
        """Give `rows` (from `_share_full_blocks(src)`) fresh partial last blocks; returns the copies."""
        lengths = self.lengths[src]
        partial = (lengths % self.tokens_per_block) != 0
        if not bool(partial.any()):
            return BlockCopies.empty()
        which = partial.nonzero().squeeze(1)
        column = (lengths // self.tokens_per_block)[which]
        old = self.table[src[which], column]
        new = self._allocate(which.numel())
        rows[which, column] = new
        return BlockCopies(src=old, dst=new)

    # -------------------------------------------------------------- operations
    def add_rows(self, lengths: torch.Tensor) -> None:
        """Append rows holding `lengths` tokens each (blocks allocated, contents unwritten)."""
        lengths = lengths.to(torch.long).cpu()
        counts = self.num_blocks_of(lengths)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        self._widen(width)
        rows = torch.full((lengths.numel(), self.table.shape[1]), _EMPTY, dtype=torch.long)
        mask = torch.arange(rows.shape[1]) < counts.unsqueeze(1)
        rows[mask] = self._allocate(int(counts.sum()))
        self.table = torch.cat([self.table, rows])
        self.lengths = torch.cat([self.lengths, lengths])

    def fork(self, repeats: int) -> BlockCopies:
        """Row i becomes rows `i*repeats .. i*repeats+repeats-1` (group-major): the first keeps
        its blocks, the others share its full blocks and get copies of its partial block."""
        if repeats < 1:
            raise ValueError(f"repeats={repeats}: use at least 1.")
        if repeats == 1 or self.num_rows == 0:
            return BlockCopies.empty()
        n = self.num_rows
        src = torch.arange(n).repeat_interleave(repeats)
        first = torch.arange(n * repeats) % repeats == 0
        extra_src = src[~first]
        rows = self._share_full_blocks(extra_src)
        copies = self._copy_partials(rows, extra_src)
        table = self.table[src].clone()
        table[~first] = rows
        self.table, self.lengths = table, self.lengths[src]
        return copies

    def reorder(self, dest: torch.Tensor, src: torch.Tensor) -> BlockCopies:
        """Rows `dest` become copies of rows `src` (`dest` unique and disjoint from `src`)."""
        dest, src = dest.to(torch.long).cpu(), src.to(torch.long).cpu()
        if dest.numel() == 0:
            return BlockCopies.empty()
        rows = self._share_full_blocks(src)  # 1. share the sources' full blocks
        old = self.table[dest]
        self.allocator.decref(old[self._valid(old, self.lengths[dest])])  # 2. release the dead rows
        copies = self._copy_partials(rows, src)  # 3. private copies of the partial blocks
        self.table[dest] = rows
        self.lengths[dest] = self.lengths[src]
        return copies

    def reserve(self, new_tokens: torch.Tensor | int) -> None:
        """Allocate the blocks rows need to append `new_tokens` (per row, or one int) tokens."""
        if isinstance(new_tokens, int):
            new_tokens = torch.full_like(self.lengths, new_tokens)
        new_tokens = new_tokens.to(torch.long).cpu()
        have = self.num_blocks_of(self.lengths)
        need = self.num_blocks_of(self.lengths + new_tokens)
        if self.num_rows == 0 or bool((need == have).all()):
            return
        self._widen(int(need.max()))
        columns = torch.arange(self.table.shape[1])
        mask = (columns >= have.unsqueeze(1)) & (columns < need.unsqueeze(1))
        self.table[mask] = self._allocate(int(mask.sum()))

    def slots(self, new_tokens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the next tokens go. Rows append `new_tokens[r]` tokens, right-aligned in a
        `width`-wide step (left padding first). Returns `(blocks, offsets, valid)`, each
        `[rows, width]`; padded entries have `valid` False. Call `reserve` first."""
        new_tokens = new_tokens.to(torch.long).cpu()
        step = torch.arange(width)
        position = self.lengths.unsqueeze(1) + step - (width - new_tokens).unsqueeze(1)
        valid = position >= self.lengths.unsqueeze(1)
        safe = position.clamp(min=0)
        blocks = self.table.gather(1, (safe // self.tokens_per_block).clamp(max=self.table.shape[1] - 1))
        return torch.where(valid, blocks, _EMPTY), safe % self.tokens_per_block, valid

    def advance(self, new_tokens: torch.Tensor | int) -> None:
        self.lengths = self.lengths + new_tokens

    def rollback(self, drop: torch.Tensor | int) -> BlockCopies:
        """Rows forget their last `drop[r]` tokens (per row, or one int).

        Blocks past a row's new length go back to the allocator (one reference less each).
        A row whose new last block is partial must own it before it writes there again: if
        another row also points at that block, the row gets a fresh copy (copy-on-write, as
        `reorder` does). When every reference to such a block comes from rows that are
        rolled back onto it, the first of them keeps it and only the others copy.
        Returns the copies to apply."""
        if isinstance(drop, int):
            drop = torch.full_like(self.lengths, drop)
        drop = drop.to(torch.long).cpu()
        if drop.shape != self.lengths.shape:
            raise ValueError(f"rollback: drop has shape {tuple(drop.shape)}, the tables hold {self.num_rows} rows.")
        if bool((drop < 0).any()) or bool((drop > self.lengths).any()):
            raise ValueError(
                f"rollback: drop={drop.tolist()} must lie in 0..length per row (lengths {self.lengths.tolist()}).")
        if not bool(drop.any()):
            return BlockCopies.empty()
        new_lengths = self.lengths - drop
        columns = torch.arange(self.table.shape[1])
        have = self.num_blocks_of(self.lengths).unsqueeze(1)
        keep = self.num_blocks_of(new_lengths).unsqueeze(1)
        released = (columns >= keep) & (columns < have)
        self.allocator.decref(self.table[released])
        self.table[released] = _EMPTY
        self.lengths = new_lengths
        return self._own_partial_last_blocks(drop > 0)

    def _own_partial_last_blocks(self, rows: torch.Tensor) -> BlockCopies:
        """Copy-on-write for `rows` (a mask) whose partial last block other rows also use."""
        partial = rows & ((self.lengths % self.tokens_per_block) != 0)
        if not bool(partial.any()):
            return BlockCopies.empty()
        which = partial.nonzero().squeeze(1)
        column = self.lengths[which] // self.tokens_per_block
        last = self.table[which, column]
        shared = self.allocator.ref_counts[last] > 1
        # Rows that all land on one block which nobody else uses: the first one keeps it.
        blocks, inverse, claims = last.unique(return_inverse=True, return_counts=True)
        exclusive = self.allocator.ref_counts[blocks] == claims
        order = torch.arange(last.numel())
        first = torch.full((blocks.numel(),), last.numel(), dtype=torch.long).scatter_reduce(
            0, inverse, order, reduce="amin")
        keeper = exclusive[inverse] & (first[inverse] == order)
        copy = shared & ~keeper
        if not bool(copy.any()):
            return BlockCopies.empty()
        which, column, old = which[copy], column[copy], last[copy]
        new = self._allocate(which.numel())  # before releasing `old`: a copy's source is never its destination
        self.table[which, column] = new
        self.allocator.decref(old)
        return BlockCopies(src=old, dst=new)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (in that order); the blocks of the others are released."""
        rows = rows.to(torch.long).cpu()
        dropped = torch.ones(self.num_rows, dtype=torch.bool)
        dropped[rows] = False
        if bool(dropped.any()):
            gone = self.table[dropped]
            self.allocator.decref(gone[self._valid(gone, self.lengths[dropped])])
        self.table, self.lengths = self.table[rows], self.lengths[rows]

    def clear(self) -> None:
        self.keep(torch.empty(0, dtype=torch.long))
        self.table = torch.full((0, 1), _EMPTY, dtype=torch.long)

    # -------------------------------------------------------------- checking
    def check(self) -> None:
        """Raise AssertionError if any invariant of the module docstring is broken."""
        alloc = self.allocator
        valid = self._valid(self.table, self.lengths)
        used = self.table[valid]
        assert bool((self.table[~valid] == _EMPTY).all()), "entries past a row's length must be empty"
        assert bool((used >= 0).all()) and bool((used < alloc.num_blocks).all()), "a row points at no block"
        counts = torch.bincount(used, minlength=alloc.num_blocks).to(torch.int32)
        assert torch.equal(counts, alloc.ref_counts), "reference counts differ from table entries"
        free = alloc.free_blocks()
        assert free.unique().numel() == free.numel(), "a block is on the free stack twice"
        assert bool((alloc.ref_counts[free] == 0).all()), "a referenced block is on the free stack"
        assert int((alloc.ref_counts > 0).sum()) + free.numel() == alloc.num_blocks, "a block leaked"
        partial = (self.lengths % self.tokens_per_block) != 0
        if bool(partial.any()):
            last = self.table[partial, self.lengths[partial] // self.tokens_per_block]
            assert bool((alloc.ref_counts[last] == 1).all()), "a partial last block is shared"


# ============================================================== the paged runner


class PagedRunner:
    """`Runner` for Llama-architecture transformers models with a paged, shared KV cache.

    Prompts are prefilled once; the N particles of a prompt then share the prompt's full
    blocks, and a resample copies only partial last blocks. Attention reads K/V through the
    block tables. Works on any torch device; tested on CPU with Llama models.

    `tokens_per_block`: block size in tokens. `num_blocks`: initial pool size; with `grow`
    (the default) the pool grows when it runs out, otherwise running out raises.
    """

    def __init__(self, model, tokens_per_block: int = 16, num_blocks: int = 256, grow: bool = True):
        _check_llama_like(model)
        self.model = model
        config = model.config
        attention = model.model.layers[0].self_attn
        self.num_layers = len(model.model.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.vocab_size = compat.output_vocab_size(model)
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.tokens_per_block = tokens_per_block
        self.allocator = BlockAllocator(num_blocks)
        self.tables = BlockTables(self.allocator, tokens_per_block, grow=grow)
        self.pool = self._new_pool(num_blocks)
        self.prompt_lengths = torch.zeros(0, dtype=torch.long)  # per row: rollback never cuts into the prompt

    def _new_pool(self, num_blocks: int) -> torch.Tensor:
        shape = (self.num_layers, 2, self.num_kv_heads, num_blocks, self.tokens_per_block, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _sync_pool(self) -> None:
        """The allocator may have grown; grow the pool to match."""
        extra = self.allocator.num_blocks - self.pool.shape[BLOCK_DIM]
        if extra > 0:
            self.pool = torch.cat([self.pool, self._new_pool(extra)], dim=BLOCK_DIM)

    # ------------------------------------------------------------- interface
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, particles: int) -> torch.Tensor:
        out_device = input_ids.device
        mask = attention_mask.to(torch.long).cpu()
        width = mask.shape[1]
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask has a prompt with no tokens; every prompt needs at least one.")
        left_padded = torch.arange(width) >= (width - lengths).unsqueeze(1)
        if not torch.equal(mask.bool(), left_padded):
            raise ValueError(
                "PagedRunner needs left-padded prompts (real tokens at the end of each row): tokenize with "
                "padding_side='left'."
            )
        self.tables.clear()
        self.tables.add_rows(torch.zeros_like(lengths))
        logits = self._forward(input_ids.to(self.device), lengths, keep=1)[:, -1]
        self._apply(self.tables.fork(particles))
        self.prompt_lengths = lengths.repeat_interleave(particles)
        return logits.to(out_device)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, k = tokens.shape
        new = torch.full((rows,), k, dtype=torch.long)
        return self._forward(tokens.to(self.device), new, keep=k).to(tokens.device)

    def reorder(self, plan: CopyPlan) -> None:
        if len(plan) == 0:
            return
        self._apply(self.tables.reorder(plan.dest, plan.src))
        self.prompt_lengths[plan.dest.cpu()] = self.prompt_lengths[plan.src.cpu()]

    def expand(self, copies: int) -> None:
        """Every row becomes `copies` consecutive rows sharing its full blocks (as after the
        prefill)."""
        self._apply(self.tables.fork(copies))
        self.prompt_lengths = self.prompt_lengths.repeat_interleave(copies)

    def keep(self, rows: torch.Tensor) -> None:
        self.tables.keep(rows)
        self.prompt_lengths = self.prompt_lengths[rows.cpu()]

    def rollback(self, drop: torch.Tensor) -> None:
        drop = check_rollback(drop, self.tables.lengths, self.prompt_lengths)
        self._apply(self.tables.rollback(drop))

    # ------------------------------------------------------------- internals
    def _apply(self, copies: BlockCopies) -> None:
        self._sync_pool()
        copies.apply(self.pool, dim=BLOCK_DIM)

    def _forward(self, tokens: torch.Tensor, new_tokens: torch.Tensor, keep: int) -> torch.Tensor:
        """Append the last `new_tokens[r]` tokens of row r of `tokens` `[rows, width]` (left
        padding before them) and return float32 logits of the last `keep` positions."""
        rows, width = tokens.shape
        tables, tpb = self.tables, self.tokens_per_block
        past = tables.lengths.clone()
        tables.reserve(new_tokens)
        self._sync_pool()
        blocks, offsets, valid = tables.slots(new_tokens, width)
        positions = past.unsqueeze(1) + torch.arange(width) - (width - new_tokens).unsqueeze(1)  # pads < past
        fresh = bool((past == 0).all())  # a prefill: attend to the new keys only, no gather
        if fresh and bool(valid.all()):
            attend, causal = None, True
        else:
            causal = False
            if fresh:  # left-padded prompts: causal, and never a padding key
                key_positions = positions
            else:
                num_blocks = int(tables.num_blocks_of(past + new_tokens).max())
                flat_table = tables.table[:, :num_blocks].clamp(min=0).flatten().to(self.device)
                key_positions = torch.arange(num_blocks * tpb).expand(rows, -1)
            # A query at position p sees its row's keys at positions 0..p; pad queries see key 0.
            attend = (key_positions.unsqueeze(1) <= positions.clamp(min=0).unsqueeze(2)) & (key_positions >= 0).unsqueeze(1)
            attend[..., 0] |= ~valid
            attend = attend.unsqueeze(1).to(self.device)
        write_blocks = blocks[valid].to(self.device)
        write_offsets = offsets[valid].to(self.device)
        valid_d = valid.to(self.device)

        model = self.model.model
        hidden = model.embed_tokens(tokens)
        cos, sin = model.rotary_emb(hidden, positions.clamp(min=0).to(self.device))
        for index, layer in enumerate(model.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(rows, width, self.num_heads, self.head_dim)
            k = attention.k_proj(x).view(rows, width, self.num_kv_heads, self.head_dim)
            v = attention.v_proj(x).view(rows, width, self.num_kv_heads, self.head_dim)
            if getattr(attention, "q_norm", None) is not None:  # Qwen3-style per-head norms
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [rows, heads, width, dim]
            q, k = _rotate(q, k, cos, sin)
            for kv, new in ((0, k), (1, v)):  # write the new K/V into their blocks
                target = self.pool[index, kv].permute(1, 2, 0, 3)  # [blocks, tpb, kv_heads, dim], a view
                target[write_blocks, write_offsets] = new.transpose(1, 2)[valid_d].to(self.pool.dtype)
            if fresh:
                keys, values = k, v
            else:  # every row's keys through its block table: one gather per layer and K/V
                length = flat_table.numel() // rows * tpb
                keys, values = (
                    self.pool[index, kv].index_select(1, flat_table)
                    .view(self.num_kv_heads, rows, length, self.head_dim).transpose(0, 1).to(q.dtype)
                    for kv in (0, 1)
                )
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=attend, is_causal=causal, scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out = attention.o_proj(out.transpose(1, 2).reshape(rows, width, self.num_heads * self.head_dim))
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = model.norm(hidden[:, -keep:])
        logits = self.model.lm_head(hidden).float()
        tables.advance(new_tokens)
        return logits


def check_rollback(drop: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """`drop` as a CPU long tensor, or a ValueError saying which rows ask for too much."""
    drop = torch.as_tensor(drop).to(torch.long).cpu().reshape(-1)
    if drop.numel() != lengths.numel():
        raise ValueError(f"rollback(drop): drop has {drop.numel()} entries but the runner holds {lengths.numel()} rows.")
    received = lengths - prompt_lengths
    bad = (drop < 0) | (drop > received)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1).tolist()[:8]
        raise ValueError(
            f"rollback(drop): rows {rows} ask to drop {drop[rows].tolist()} tokens but received "
            f"{received[rows].tolist()} since prefill; drop must lie in 0..tokens received (the prompt stays).")
    return drop


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding exactly as transformers' Llama applies it (`rotate_half` convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _check_llama_like(model) -> None:
    from ..distributed import refuse_tp

    refuse_tp(model, "PagedRunner")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("embed_tokens", "norm", "rotary_emb")
    if layers is None or any(getattr(inner, name, None) is None for name in needed) or getattr(model, "lm_head", None) is None:
        raise ValueError(
            f"PagedRunner supports Llama-architecture causal LMs (model.model.layers, embed_tokens, norm, "
            f"rotary_emb, lm_head); {type(model).__name__} does not have that layout. Use the eager runner "
            "(the default) for other models."
        )
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window attention, which PagedRunner does not implement; "
            "use the eager runner."
        )
    layer = layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
        if getattr(layer, name, None) is None:
            raise ValueError(f"PagedRunner: decoder layer has no `{name}`; use the eager runner for this model.")
