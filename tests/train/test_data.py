from medvistagym.env.task import AnswerType, ImageRef, Task
from medvistagym.train.data import TaskStream


def _tasks(n):
    return [Task(f"t{i}", "d", "train", (ImageRef(path="x.png"),), "q?", "yes", AnswerType.CLOSED) for i in range(n)]


def test_epochs_cover_every_task_once_in_a_seeded_order():
    stream = TaskStream(_tasks(10), seed=3)
    first = [t.id for t in stream.step(0, 10)[0]]
    second = [t.id for t in stream.step(1, 10)[0]]
    assert sorted(first) == sorted(second) == sorted(f"t{i}" for i in range(10))
    assert first != second  # a fresh shuffle per epoch
    assert [t.id for t in TaskStream(_tasks(10), seed=3).step(0, 10)[0]] == first


def test_steps_are_addressable_so_a_resumed_run_neither_repeats_nor_skips():
    a, b = TaskStream(_tasks(7), seed=0), TaskStream(_tasks(7), seed=0)
    run = [a.step(s, 3) for s in range(5)]
    resumed = [b.step(s, 3) for s in range(2, 5)]  # a fresh stream, as after a restart
    assert [ids for _, ids in run[2:]] == [ids for _, ids in resumed]
    assert [[t.id for t in ts] for ts, _ in run[2:]] == [[t.id for t in ts] for ts, _ in resumed]
    ids = [i for _, step_ids in run for i in step_ids]
    assert len(ids) == len(set(ids)) == 15
