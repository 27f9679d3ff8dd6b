"""Paged KV: the block allocator, block tables under random resampling, and the paged torch
runner against full recomputes (prefill, K+1 extends, reorders, drops, SMC-SD end to end)."""

import pytest
import torch

from hf_smcsd.resampling import copy_plan, resample
from hf_smcsd.runners import EagerRunner, Runner
from hf_smcsd.runners.paged import BlockAllocator, BlockCopies, BlockTables, PagedRunner
from hf_smcsd.smc import SMCSettings, smc_sample

from conftest import left_pad, random_resample

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


# ------------------------------------------------------------------ allocator


def test_allocator_counts_and_errors():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(3)
    assert sorted(blocks.tolist()) == [0, 1, 2] and alloc.num_free == 1
    alloc.incref(torch.tensor([1, 1]))
    assert alloc.ref_counts.tolist() == [1, 3, 1, 0]
    assert alloc.decref(torch.tensor([1, 1, 0])).tolist() == [0]  # block 0 reached zero
    assert alloc.num_free == 2
    with pytest.raises(RuntimeError, match="double free"):
        alloc.decref(torch.tensor([0]))
    assert alloc.ref_counts.tolist() == [0, 1, 1, 0]  # a refused decref changes nothing
    with pytest.raises(RuntimeError, match="free block"):
        alloc.incref(torch.tensor([3]))
    with pytest.raises(RuntimeError, match="out of blocks: 3 needed, 2 of 4 free"):
        alloc.allocate(3)
    alloc.grow(2)
    assert alloc.num_free == 4 and alloc.num_blocks == 6
    assert alloc.allocate(4).unique().numel() == 4


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    alloc = BlockAllocator(32)
    tables = BlockTables(alloc, tokens_per_block=4)
    tables.add_rows(torch.tensor([10, 8]))  # 3 blocks (2 full + partial), 2 full blocks
    copies = tables.fork(3)
    tables.check()
    assert tables.lengths.tolist() == [10, 10, 10, 8, 8, 8]
    first = tables.table[0, :3]
    for row in (1, 2):  # full blocks shared, partial block private
        assert torch.equal(tables.table[row, :2], first[:2]) and tables.table[row, 2] != first[2]
    assert torch.equal(tables.table[3, :2], tables.table[5, :2])  # no partial block: nothing copied
    assert alloc.ref_counts[first[:2]].tolist() == [3, 3]
    assert copies.src.tolist() == [int(first[2])] * 2 and len(copies) == 2
    assert alloc.num_used == 3 + 2 + 2  # not 6 rows x 3 blocks


def test_reorder_and_keep_release_blocks():
    alloc = BlockAllocator(64)
    tables = BlockTables(alloc, tokens_per_block=4)
    tables.add_rows(torch.tensor([6]))
    tables.fork(4)
    tables.reserve(3)
    tables.advance(3)  # 9 tokens: 2 full blocks + 1 partial each
    tables.check()
    copies = tables.reorder(torch.tensor([1, 2]), torch.tensor([3, 3]))
    tables.check()
    assert len(copies) == 2 and set(copies.src.tolist()) == {int(tables.table[3, 2])}
    tables.keep(torch.tensor([0, 3]))
    tables.check()
    tables.clear()
    assert alloc.num_free == alloc.num_blocks and int(alloc.ref_counts.sum()) == 0


def test_rollback_releases_blocks_and_copies_a_shared_partial_block():
    alloc = BlockAllocator(64)
    tables = BlockTables(alloc, tokens_per_block=4)
    tables.add_rows(torch.tensor([8]))  # two full blocks
    tables.fork(3)  # three rows share both
    tables.reserve(5)
    tables.advance(5)  # 13 tokens: blocks 0, 1 shared; 2, 3 private per row
    tables.check()
    shared = tables.table[0, :2].tolist()
    used = alloc.num_used
    copies = tables.rollback(torch.tensor([0, 5, 7]))  # row 1 back to 8 (full), row 2 back to 6 (inside shared block 1)
    tables.check()
    assert tables.lengths.tolist() == [13, 8, 6]
    assert alloc.num_used == used - 2 - 2 + 1  # rows 1 and 2 each give back 2 blocks, row 2 copies block 1
    assert copies.src.tolist() == [shared[1]] and tables.table[2, 1] != shared[1]
    assert tables.table[1, :2].tolist() == shared and int(tables.table[1, 2]) == -1
    assert alloc.ref_counts[shared].tolist() == [3, 2]
    with pytest.raises(ValueError, match="0..length"):
        tables.rollback(torch.tensor([0, 9, 0]))


def test_rollback_onto_a_block_only_the_rolled_back_rows_share_keeps_it_once():
    alloc = BlockAllocator(64)
    tables = BlockTables(alloc, tokens_per_block=4)
    tables.add_rows(torch.tensor([8]))
    tables.fork(2)
    copies = tables.rollback(torch.tensor([2, 2]))  # both rows end inside block 1, which only they use
    tables.check()
    assert len(copies) == 1  # the first row keeps block 1, the second copies it
    assert tables.table[0, 1] != tables.table[1, 1] and tables.table[0, 0] == tables.table[1, 0]


def test_tables_refuse_rows_longer_than_the_engine():
    tables = BlockTables(BlockAllocator(16), tokens_per_block=4, max_blocks_per_row=2)
    tables.add_rows(torch.tensor([7]))
    with pytest.raises(RuntimeError, match="at most 2 fit .*--max-output-len"):
        tables.reserve(2)


def test_thousands_of_random_resamples_keep_contents_and_counts_exact():
    """Resamples, writes, rollbacks and drops in random order. A shadow pool of token ids, written through `slots` and copied with the returned
    `BlockCopies`, must read back each row's own history after every operation; the ref counts
    must match the tables; at the end every block is free again."""
    gen = torch.Generator().manual_seed(0)
    tpb, n = 4, 6
    alloc = BlockAllocator(8)
    tables = BlockTables(alloc, tpb, grow=True)
    shadow = torch.full((alloc.num_blocks, tpb), -1, dtype=torch.long)
    history: list[list[int]] = []
    next_token = [0]

    def sync(copies):
        nonlocal shadow
        if alloc.num_blocks > shadow.shape[0]:
            shadow = torch.cat([shadow, torch.full((alloc.num_blocks - shadow.shape[0], tpb), -1, dtype=torch.long)])
        copies.apply(shadow)

    def write(width):
        new = torch.full((tables.num_rows,), width, dtype=torch.long)
        tables.reserve(new)
        sync(BlockCopies.empty())  # the shadow pool grows with the allocator
        blocks, offsets, valid = tables.slots(new, width)
        tokens = torch.arange(next_token[0], next_token[0] + tables.num_rows * width).view(-1, width)
        next_token[0] += tokens.numel()
        shadow[blocks[valid], offsets[valid]] = tokens[valid]
        tables.advance(new)
        for row in range(tables.num_rows):
            history[row] += tokens[row].tolist()

    def read(row):
        length = int(tables.lengths[row])
        blocks = tables.table[row, : (length + tpb - 1) // tpb]
        return shadow[blocks].flatten()[:length].tolist()

    def start(groups):
        tables.clear()
        history.clear()
        tables.add_rows(torch.zeros(groups, dtype=torch.long))
        history.extend([] for _ in range(groups))
        write(int(torch.randint(1, 9, (1,), generator=gen)))
        sync(tables.fork(n))
        expanded = []
        for h in history:
            expanded += [list(h) for _ in range(n)]
        history[:] = expanded

    operations = 0
    torch.manual_seed(0)  # resample() draws from the global generator
    start(3)
    while operations < 2500:
        choice = int(torch.randint(0, 10, (1,), generator=gen))
        if choice < 5:  # resample: a real copy plan from random weights
            groups = tables.num_rows // n
            weights = torch.rand(groups, n, generator=gen) ** 4
            plan = copy_plan(resample(weights / weights.sum(1, keepdim=True)))
            sync(tables.reorder(plan.dest, plan.src))
            for d, s in zip(plan.dest.tolist(), plan.src.tolist()):
                history[d] = list(history[s])
        elif choice < 8:
            write(int(torch.randint(1, 6, (1,), generator=gen)))
        elif choice < 9:  # rows forget a random tail of what they were given (exact mode's rollback)
            drop = (torch.rand(tables.num_rows, generator=gen) * (tables.lengths + 1)).long()
            sync(tables.rollback(drop))
            for row, d in enumerate(drop.tolist()):
                history[row] = history[row][: len(history[row]) - d]
        elif tables.num_rows > n:  # a group ends and leaves the batch
            gone = int(torch.randint(0, tables.num_rows // n, (1,), generator=gen))
            keep = torch.tensor([r for r in range(tables.num_rows) if r // n != gone])
            tables.keep(keep)
            history[:] = [history[r] for r in keep.tolist()]
        else:
            start(int(torch.randint(1, 4, (1,), generator=gen)))
        tables.check()
        if operations % 50 == 0 or operations > 2490:
            assert all(read(row) == history[row] for row in range(tables.num_rows))
        operations += 1
    tables.clear()
    assert alloc.num_free == alloc.num_blocks and int(alloc.ref_counts.sum()) == 0


# ------------------------------------------------------------------ the paged runner


def test_paged_runner_satisfies_interface(pair):
    assert isinstance(PagedRunner(pair[0]), Runner)


def test_prefill_and_k_plus_one_extend_equal_recompute(pair):
    model = pair[0]
    n = 3
    ids, mask = left_pad(PROMPTS)
    runner = PagedRunner(model, tokens_per_block=4, num_blocks=2)  # small blocks, a pool that must grow
    first = runner.prefill(ids, mask, n)
    new = torch.randint(0, 40, (len(PROMPTS) * n, 5), generator=torch.Generator().manual_seed(0))
    logits = runner.extend(new)
    assert first.shape == (3, 40) and logits.shape == (9, 5, 40) and logits.dtype == torch.float32
    for row in range(9):
        prompt = PROMPTS[row // n]
        expected = fresh_logits(model, prompt + new[row].tolist())
        torch.testing.assert_close(first[row // n], expected[len(prompt) - 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[row], expected[len(prompt):], atol=1e-4, rtol=1e-4)
    runner.tables.check()


def test_random_resamples_then_extend_equal_recompute(pair):
    """Several rounds of random resampling plans and variable-width extends (crossing block
    boundaries); every row's logits are those of its own history."""
    gen = torch.Generator().manual_seed(1)
    for model in pair:
        n = 4
        ids, mask = left_pad(PROMPTS[:2])
        runner = PagedRunner(model, tokens_per_block=4)
        runner.prefill(ids, mask, n)
        history = [list(PROMPTS[row // n]) for row in range(2 * n)]
        for width in (3, 1, 5, 2):
            step = torch.randint(0, 40, (2 * n, width), generator=gen)
            runner.extend(step)
            for row in range(2 * n):
                history[row] += step[row].tolist()
            random_resample(runner, history, 2, n, gen, seed=width)
        last = torch.randint(0, 40, (2 * n, 2), generator=gen)
        logits = runner.extend(last)
        for row in range(2 * n):
            expected = fresh_logits(model, history[row] + last[row].tolist())[-2:]
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


def random_runner_walk(runner, model, steps, seed, prompts=PROMPTS, n=3, widths=(1, 2, 4), check_every=1):
    """Random prefill / extend / reorder / keep / rollback on `runner`, each extend's logits
    against a full recompute of every row's own history; the block tables' invariants after
    every step. Rows differ in length after a rollback: extends must place each row's
    tokens right after its own last kept token."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def start():
        groups = int(torch.randint(1, len(prompts) + 1, (1,), generator=gen))
        chosen = prompts[:groups]
        ids, mask = left_pad(chosen)
        logits = runner.prefill(ids, mask, n)
        for row, prompt in enumerate(chosen):
            torch.testing.assert_close(logits[row], fresh_logits(model, prompt)[-1], atol=1e-4, rtol=1e-4)
        return [list(chosen[row // n]) for row in range(groups * n)], [len(chosen[row // n]) for row in range(groups * n)]

    history, prompt_lengths = start()
    counts = dict(extend=0, reorder=0, keep=0, rollback=0, prefill=1)
    for step in range(steps):
        rows = len(history)
        choice = int(torch.randint(0, 10, (1,), generator=gen))
        if choice < 4:
            width = widths[int(torch.randint(0, len(widths), (1,), generator=gen))]
            tokens = torch.randint(0, 40, (rows, width), generator=gen)
            logits = runner.extend(tokens)
            for row in range(rows):
                history[row] += tokens[row].tolist()
                if step % check_every == 0:
                    expected = fresh_logits(model, history[row])[-width:]
                    torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
            counts["extend"] += 1
        elif choice < 6:
            received = torch.tensor([len(h) - p for h, p in zip(history, prompt_lengths)])
            drop = (torch.rand(rows, generator=gen) * (received + 1)).long()
            runner.rollback(drop)
            for row, d in enumerate(drop.tolist()):
                history[row] = history[row][: len(history[row]) - d]
            counts["rollback"] += 1
        elif choice < 8:
            random_resample(runner, history, rows // n, n, gen, seed=step)
            counts["reorder"] += 1
        elif choice < 9 and rows > n:
            gone = int(torch.randint(0, rows // n, (1,), generator=gen))
            keep = torch.tensor([r for r in range(rows) if r // n != gone])
            runner.keep(keep)
            history = [history[r] for r in keep.tolist()]
            prompt_lengths = [prompt_lengths[r] for r in keep.tolist()]
            counts["keep"] += 1
        else:
            history, prompt_lengths = start()
            counts["prefill"] += 1
        runner.tables.check()
        assert runner.tables.lengths.tolist() == [len(h) for h in history]
    return counts


def test_random_prefill_extend_reorder_keep_rollback_equal_recompute(pair):
    counts = random_runner_walk(PagedRunner(pair[0], tokens_per_block=4, num_blocks=4), pair[0], steps=60, seed=3)
    assert min(counts.values()) >= 2  # every operation ran


def test_rollback_then_extend_equal_recompute(pair):
    """A rollback that lands inside a block the particles share (the prompt's last block):
    each row must get its own copy before writing, and the others must not see the writes."""
    model = pair[0]
    runner = PagedRunner(model, tokens_per_block=4)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10]])  # 6 tokens: block 0 full (shared), block 1 partial
    runner.prefill(ids, mask, 3)
    runner.extend(torch.tensor([[11, 12, 13]] * 3))  # 9 tokens: block 1 now full and copied per row
    runner.reorder(copy_plan(torch.tensor([[0, 0, 0]])))  # rows 1, 2 share row 0's full blocks
    runner.rollback(torch.tensor([3, 2, 0]))  # rows 0, 1 end inside the shared block 1
    runner.tables.check()
    logits = runner.extend(torch.tensor([[20, 21], [22, 23], [24, 25]]))
    histories = [[5, 6, 7, 8, 9, 10, 20, 21], [5, 6, 7, 8, 9, 10, 11, 22, 23], [5, 6, 7, 8, 9, 10, 11, 12, 13, 24, 25]]
    for row, history in enumerate(histories):
        torch.testing.assert_close(logits[row], fresh_logits(model, history)[-2:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="rows \\[0\\] ask to drop \\[3\\] tokens but received \\[2\\]"):
        runner.rollback(torch.tensor([3, 0, 0]))


def test_keep_drops_rows_and_their_blocks(pair):
    model = pair[0]
    ids, mask = left_pad(PROMPTS)
    runner = PagedRunner(model, tokens_per_block=4)
    runner.prefill(ids, mask, 2)
    runner.extend(torch.arange(6).view(6, 1) + 15)
    used = runner.allocator.num_used
    runner.keep(torch.tensor([2, 3]))
    runner.tables.check()
    assert runner.allocator.num_used < used
    logits = runner.extend(torch.tensor([[30], [31]]))
    for i, row in enumerate((2, 3)):
        expected = fresh_logits(model, PROMPTS[1] + [15 + row, 30 + i])[-1]
        torch.testing.assert_close(logits[i, 0], expected, atol=1e-4, rtol=1e-4)


def test_prompt_kv_is_stored_once_for_all_particles(pair):
    prompt = list(range(1, 38))  # 37 tokens: 9 full blocks of 4 + 1 partial
    runner = PagedRunner(pair[0], tokens_per_block=4)
    ids, mask = left_pad([prompt])
    runner.prefill(ids, mask, 8)
    assert runner.allocator.num_used == 10 + 7  # one copy of the prompt, 7 copies of its partial block
    assert runner.pool.shape[:3] + runner.pool.shape[4:] == (2, 2, 2, 4, 12)  # [layers, K/V, kv_heads, ., tpb, dim]


def test_right_padded_prompts_are_refused(pair):
    runner = PagedRunner(pair[0])
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="padding_side='left'"):
        runner.prefill(ids, torch.tensor([[1, 1, 0]]), 2)


def test_non_llama_models_are_refused():
    with pytest.raises(ValueError, match="Llama-architecture"):
        PagedRunner(torch.nn.Linear(2, 2))


def test_smc_sample_with_paged_runners_matches_eager(pair):
    """The same SMC-SD run (same seed) through paged and eager runners: identical tokens and
    resampling decisions, weights equal to float32 rounding."""
    target, draft = pair
    ids, mask = left_pad(PROMPTS)
    settings = SMCSettings(particles=6, gamma=3, max_new_tokens=14, temperature=0.9, resample_threshold=0.9,
                           eos_token_ids=[3], pad_token_id=0)
    results = []
    for make in (lambda m: PagedRunner(m, tokens_per_block=4), EagerRunner):
        torch.manual_seed(7)
        results.append(smc_sample(make(target), make(draft), ids, mask, settings))
    paged, eager = results
    assert int(paged.num_resamples.sum()) > 0  # the reorder path ran
    assert torch.equal(paged.tokens, eager.tokens) and torch.equal(paged.lengths, eager.lengths)
    assert torch.equal(paged.num_resamples, eager.num_resamples)
    torch.testing.assert_close(paged.log_weights, eager.log_weights, atol=1e-4, rtol=1e-4)
