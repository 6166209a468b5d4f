"""PassPlanner: a strength group's rows go into the llama_decode passes with the least measured time."""

from server.engine.llamacpp_passes import PassPlanner


def test_unmeasured_sizes_are_tried_whole_then_as_single_rows():
    p = PassPlanner(8)
    assert p.sizes(1) == [1]
    assert p.sizes(2) == [2]  # never measured: the whole group once
    p.record(2, 0.195)
    assert p.sizes(2) == [1, 1]  # 1-row passes never measured: tried once
    p.record(1, 0.055)


def test_splits_follow_the_measured_costs():
    p = PassPlanner(8, explore_every=10**6)
    for n, s in ((1, 0.055), (2, 0.195), (4, 0.280), (8, 0.350)):
        p.record(n, s)
    assert p.sizes(2) == [1, 1]  # 0.110 s against 0.195 s
    assert p.sizes(4) == [1, 1, 1, 1]  # 0.220 against 0.280
    assert p.sizes(8) == [8]  # 0.350 against 0.440
    assert p.split(list("abcd")) == [["a"], ["b"], ["c"], ["d"]]
    for _ in range(10):  # a running mean: fast 2-row passes bring its figure below 2 x 0.055
        p.record(2, 0.080)
    assert p.cost[2] < 0.11 and p.sizes(4) == [2, 2]


def test_the_whole_group_is_retried_now_and_then():
    p = PassPlanner(8, explore_every=3)
    p.record(1, 0.01)
    p.record(4, 1.0)  # measured while the machine was busy
    assert [p.sizes(4) for _ in range(3)] == [[1, 1, 1, 1], [1, 1, 1, 1], [4]]
