"""threads.py's ThreadChooser: which ggml thread count runs the next step, from the steps' times."""

import pytest

from lamp_runtime.llamacpp.threads import ThreadChooser, rows_bucket, thread_candidates


def run(chooser: ThreadChooser, seconds_of, steps: int, rows: int = 1) -> list[int]:
    """`steps` decode steps of `rows` rows; `seconds_of(threads)` is the host's answer."""
    used = []
    for _ in range(steps):
        threads = chooser.choose(rows)
        chooser.record(threads, rows, seconds_of(threads))
        used.append(threads)
    return used


def test_candidates_are_the_cores_then_half_then_one():
    assert thread_candidates(2, adaptive=True) == (2, 1)
    assert thread_candidates(16, adaptive=True) == (16, 8, 1)
    assert thread_candidates(1, adaptive=True) == (1,)
    assert thread_candidates(8, adaptive=False) == (8,)


def test_rows_are_bucketed_by_powers_of_two():
    assert [rows_bucket(r) for r in (1, 2, 3, 4, 7, 8, 16)] == [1, 2, 2, 3, 3, 4, 5]


def test_an_idle_host_keeps_every_core_and_explores_ever_more_rarely():
    chooser = ThreadChooser((2, 1), explore_every=4, max_explore_every=64)
    used = run(chooser, {2: 0.008, 1: 0.014}.get, 400)
    assert used[:2] == [2, 1]  # each count tried once
    assert chooser.current == 2 and chooser.switches == 0
    explorations = [i for i, t in enumerate(used) if t == 1]
    gaps = [b - a for a, b in zip(explorations, explorations[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == 64  # back-off doubles up to the cap
    assert used.count(1) <= 10  # of 400 steps


def test_a_busy_host_moves_to_fewer_threads_and_back_when_it_quiets():
    chooser = ThreadChooser((2, 1), explore_every=4, max_explore_every=16)
    run(chooser, {2: 0.008, 1: 0.014}.get, 50)
    assert chooser.current == 2
    busy = run(chooser, {2: 0.200, 1: 0.020}.get, 50)  # spin barriers with a descheduled thread
    assert chooser.current == 1 and busy[-20:].count(1) >= 18
    run(chooser, {2: 0.008, 1: 0.014}.get, 60)  # an exploration finds the cores fast again
    assert chooser.current == 2
    assert chooser.switches == 2


def test_each_batch_size_learns_its_own_winner():
    chooser = ThreadChooser((2, 1), explore_every=4)
    run(chooser, {2: 0.010, 1: 0.012}.get, 20, rows=1)
    run(chooser, {2: 0.030, 1: 0.025}.get, 20, rows=16)
    assert chooser.choose(16) in (1, 2)
    seconds = chooser.seconds()
    assert seconds["rows<2,threads=2"] < seconds["rows<2,threads=1"]
    assert seconds["rows<32,threads=1"] < seconds["rows<32,threads=2"]


def test_the_cores_count_stays_unless_another_is_clearly_faster():
    """Within `margin` (0.9) of the cores' time the cores' count keeps the steps: a quiet host's
    batch-1 decode where one thread comes within a few percent does not flap to it."""
    close = ThreadChooser((2, 1), explore_every=4)
    used = run(close, {2: 0.0040, 1: 0.0038}.get, 100)
    assert used[-10:] == [2] * 10 and close.switches == 0
    clear = ThreadChooser((2, 1), explore_every=4)
    used = run(clear, {2: 0.0040, 1: 0.0034}.get, 100)
    assert used[-10:].count(1) >= 9 and clear.current == 1  # what prefills then run with


def test_one_stalled_step_does_not_hand_the_steps_to_fewer_threads():
    chooser = ThreadChooser((2, 1), explore_every=4)
    run(chooser, {2: 0.0035, 1: 0.0045}.get, 40)
    stalls = iter([0.025])  # one 2-thread step descheduled by the host, then the usual time
    used = run(chooser, lambda t: next(stalls, 0.0035) if t == 2 else 0.0045, 40)
    assert used[-10:] == [2] * 10 and chooser.switches == 0 and chooser.current == 2


def test_a_fixed_count_is_never_explored():
    chooser = ThreadChooser((4,))
    assert run(chooser, lambda t: 1.0, 10) == [4] * 10 and not chooser.adaptive


@pytest.mark.parametrize("candidates,every,cap,margin,window", [
    ((), 4, 8, 0.9, 5), ((2, 0), 4, 8, 0.9, 5), ((2, 1), 0, 8, 0.9, 5), ((2, 1), 16, 8, 0.9, 5),
    ((2, 1), 4, 8, 0.0, 5), ((2, 1), 4, 8, 1.5, 5), ((2, 1), 4, 8, 0.9, 0)])
def test_bad_settings_are_refused_by_name(candidates, every, cap, margin, window):
    with pytest.raises(ValueError, match="thread candidates|explore_every|margin|window"):
        ThreadChooser(candidates, explore_every=every, max_explore_every=cap, margin=margin, window=window)
