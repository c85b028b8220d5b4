"""The training loops' clock and log line: prepare.step_midpoint ends a run at the step end nearest to TIME_BUDGET
(within half a step, either way) and gives every step the learning-rate progress of its middle; ProgressLine writes
one line per training step to a file, throttles evaluation's, and keeps a terminal's line to one row. The real
scripts' runs are checked against the same rule in their smoke tests (conftest.check_step_log)."""

import os
import random

import pytest

import prepare


def simulate(budget, durations):
    """The training scripts' loop with given step durations (the first step compiles and is not timed):
    (training_seconds, the learning-rate progress of every step)."""
    training_time, step, step_times, progress, durations = 0.0, 0, [], [], iter(durations)
    while (midpoint := prepare.step_midpoint(training_time, step_times)) < budget:
        progress.append(midpoint / budget)
        step_time = next(durations)
        if step > 0:
            training_time += step_time
            step_times.append(step_time)
        step += 1
    return training_time, progress


def test_the_issue_example_ends_within_half_a_step():
    """3.7 s steps on a 60 s budget: the old rule (stop once training_time >= budget) ended at 62.9 s."""
    training_seconds, progress = simulate(60, [3.7] * 100)
    assert training_seconds == pytest.approx(59.2)  # 16 timed steps; 17 would end 2.9 s past the budget
    assert abs(training_seconds - 60) <= 3.7 / 2


@pytest.mark.parametrize("budget", [3, 20, 60, 300])
@pytest.mark.parametrize("step_time", [0.013, 0.13, 0.7, 1.0, 1.5])
def test_steady_steps_end_within_half_a_step_of_the_budget(budget, step_time):
    training_seconds, progress = simulate(budget, [5.0] + [step_time] * 100_000)  # a slow first (compiling) step
    assert abs(training_seconds - budget) <= step_time / 2 + 1e-9
    assert all(0 <= p < 1 for p in progress) and progress == sorted(progress)
    assert progress[-1] >= 1 - step_time / budget - 1e-9  # the last step runs in the last step's worth of the schedule


def test_one_slow_step_does_not_end_the_run_early():
    """The prediction is a median: a single hiccup (here 6 s among 1 s steps) does not stop the run a step early,
    as a mean of the last five would."""
    training_seconds, _ = simulate(20, [1.0] * 10 + [6.0] + [1.0] * 100)
    assert training_seconds == pytest.approx(20)


def test_noisy_steps_stop_by_the_rule():
    """With jittery step times the decision is the rule's: the last step started while its predicted middle was before
    the budget, and the next one's would not be."""
    rng = random.Random(0)
    for _ in range(200):
        durations = [rng.uniform(0.5, 1.5) for _ in range(200)]
        training_seconds, progress = simulate(30, durations)
        timed = durations[1 : len(progress)]  # the timed steps that ran
        assert sum(timed) == pytest.approx(training_seconds)
        assert prepare.step_midpoint(sum(timed[:-1]), timed[:-1]) < 30 <= prepare.step_midpoint(training_seconds, timed)


def test_training_logs_every_step_evaluation_is_throttled(capsys):
    training, evaluation = prepare.ProgressLine(interval=0), prepare.ProgressLine()  # as the scripts make them
    for i in range(5):
        training.update(f"step {i}")
        evaluation.update(f"eval {i}", force=i == 4)
    training.close()
    evaluation.close()
    lines = capsys.readouterr().out.splitlines()  # captured: not a terminal, as run.log
    assert [line for line in lines if line.startswith("step")] == [f"step {i}" for i in range(5)]
    assert [line for line in lines if line.startswith("eval")] == ["eval 0", "eval 4"]  # the first, then forced


def test_terminal_line_is_rewritten_in_place_and_cut_to_the_width(capsys, monkeypatch):
    monkeypatch.setattr(prepare.shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    line = prepare.ProgressLine(interval=0)
    line.tty = True
    line.update("x" * 100)
    line.update("short")
    line.close()
    assert capsys.readouterr().out == "\r" + "x" * 39 + "\r" + "short".ljust(39) + "\n"
