"""Grading tests for hw07: the student's allocator and scheduler step against course_lib.engine on fresh random traces."""
import pytest

from course_lib.engine import BlockManager, SamplingParams, Scheduler, Sequence


def _random_ops(rng, student, n_ops=200):
    "The same random allocate/fork/grow/free trace on the student's allocator and the library's; compare after each op."
    num_blocks, block_size = int(rng.integers(4, 24)), int(rng.choice([1, 2, 4, 8]))
    mine, ref = student.BlockAllocator(num_blocks, block_size), BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    tables = []                                                         # [(student table, library table, tokens)]
    for _ in range(n_ops):
        op = rng.choice(["new", "grow", "fork", "free"], p=[0.3, 0.35, 0.15, 0.2])
        if op == "new" or not tables:
            n = int(rng.integers(1, 3 * block_size + 1))
            a, b = [], []
            ok_a, ok_b = mine.grow(a, 0, n), ref.prepare_append(b, 0, n)
            assert ok_a == ok_b, f"grow([], 0, {n}) returned {ok_a}; the library says {ok_b}"
            if ok_b: tables.append((a, b, n))
        else:
            i = int(rng.integers(len(tables)))
            a, b, n = tables[i]
            if op == "grow":
                extra = int(rng.integers(1, 2 * block_size + 1))
                ok_a, ok_b = mine.grow(a, n, n + extra), ref.prepare_append(b, n, n + extra)
                assert ok_a == ok_b, f"grow(table, {n}, {n + extra}) returned {ok_a}; the library says {ok_b}"
                if ok_b: tables[i] = (a, b, n + extra)
            elif op == "fork": tables.append((mine.fork(a), ref.fork(b), n))
            else:
                mine.free(a); ref.free_table(b); tables.pop(i)
                assert a == [], "free must empty the table in place"
        for a, b, _ in tables: assert a == b, f"block table {a}, the library's {b}"
        assert mine.ref_counts == ref.ref_counts and mine.num_free == ref.num_free
        assert mine.copies == ref.pending_copies, f"copy-on-write pairs {mine.copies}, the library's {ref.pending_copies}"
    for a, b, _ in tables: mine.free(a); ref.free_table(b)
    assert mine.num_free == num_blocks and all(c == 0 for c in mine.ref_counts), "blocks leaked"


@pytest.mark.question("q1 BlockAllocator", points=1)
def test_allocator_by_hand(student):
    a = student.BlockAllocator(4, 4)
    assert a.blocks_for(0) == 0 and a.blocks_for(4) == 1 and a.blocks_for(5) == 2
    assert a.take() == 0 and a.take() == 1 and a.num_free == 2
    a.release(0)
    assert a.num_free == 3 and a.take() == 2                            # freed blocks go to the back
    t = [a.take()]                                                      # the object lives in your notebook: use its methods
    assert t == [3]
    child = a.fork(t)
    assert child == [3] and a.ref_counts[3] == 2
    a.free(t)
    assert t == [] and a.ref_counts[3] == 1


@pytest.mark.question("q1 BlockAllocator", points=2)
def test_allocate_fork_free_random(student, rng):
    "Traces without copy-on-write: tables only grow from block boundaries."
    for _ in range(30):
        num_blocks, bs = int(rng.integers(4, 20)), int(rng.choice([2, 4]))
        mine, ref = student.BlockAllocator(num_blocks, bs), BlockManager(num_blocks, bs, enable_prefix_caching=False)
        held = []
        for _ in range(60):
            if held and rng.random() < 0.4:
                i = int(rng.integers(len(held))); a, b = held.pop(i); mine.free(a); ref.free_table(b)
            elif held and rng.random() < 0.3:
                a, b = held[int(rng.integers(len(held)))]; held.append((mine.fork(a), ref.fork(b)))
            else:
                n = int(rng.integers(1, 4)) * bs
                a, b = [], []
                if mine.grow(a, 0, n) != ref.prepare_append(b, 0, n): pytest.fail(f"grow([], 0, {n}) disagrees with the library")
                if b: held.append((a, b))
            assert mine.ref_counts == ref.ref_counts and [a for a, _ in held] == [b for _, b in held]
        for a, b in held: mine.free(a); ref.free_table(b)
        assert mine.num_free == num_blocks


@pytest.mark.question("q2 grow", points=3)
def test_grow_with_copy_on_write_random(student, rng):
    for _ in range(30): _random_ops(rng, student)


def _simulate(trace, num_blocks, block_size, budget, max_seqs):
    "The library's scheduler on a trace of (arrival step, prompt length, output length, id): every step's (id, n, table), free blocks left."
    sched = Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching=False), max_seqs, budget)
    pending, log, step = list(trace), [], 0
    while pending or sched.waiting or sched.running:
        while pending and pending[0][0] <= step:
            _, n_prompt, n_out, i = pending.pop(0)
            sched.waiting.append(Sequence(i, list(range(n_prompt)), SamplingParams(max_tokens=n_out)))
        batch = sched.schedule()
        log.append([(s.seq_id, n, list(s.block_table)) for s, n in batch])
        for seq, n in batch:                                            # what the engine does after the forward pass
            seq.num_computed += n
            if seq.num_computed == len(seq):
                seq.output_ids.append(0)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    sched.bm.free_table(seq.block_table); sched.running.remove(seq)
        step += 1
        assert step < 3000, "the library livelocks"
    return log, sched.bm.num_free


@pytest.mark.question("q3 schedule", points=1)
def test_schedule_by_hand(student):
    # your notebook's `simulate` runs your allocator and `schedule` step by step (objects cannot cross to the grader)
    log, _ = student.simulate([(0, 12, 1, 0), (0, 3, 1, 1), (0, 5, 1, 2)], 16, 4, 8, 4)
    assert [[(i, n) for i, n, _ in step] for step in log[:3]] == [[(0, 8)], [(0, 4), (1, 3)], [(2, 5)]]   # by hand: 1 token of seq 2 would end inside a block


@pytest.mark.question("q3 schedule", points=3)
def test_schedule_equals_library_on_random_traces(student, rng):
    for _ in range(25):
        num_blocks, bs = int(rng.integers(6, 30)), int(rng.choice([2, 4, 8]))
        budget, max_seqs = int(rng.choice([4, 8, 32])), int(rng.integers(1, 6))
        trace, t = [], 0
        for i in range(int(rng.integers(1, 8))):
            t += int(rng.integers(0, 4))
            n_prompt = int(rng.integers(1, 20)); n_out = int(rng.integers(1, 10))
            if -(-(n_prompt + n_out) // bs) <= num_blocks: trace.append((t, n_prompt, n_out, i))
        want, _ = _simulate(trace, num_blocks, bs, budget, max_seqs)
        got, num_free = student.simulate(trace, num_blocks, bs, budget, max_seqs)
        got = [[tuple(x) for x in step] for step in got]
        for step, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"step {step}: scheduled (seq, n, table) {g}, the library {w} (trace {trace}, {num_blocks} blocks of {bs})"
        assert len(got) == len(want)
        assert num_free == num_blocks, "blocks leaked"
