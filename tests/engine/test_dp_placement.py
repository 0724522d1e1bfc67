"""Where the DP front end places requests (no processes): the least-loaded rank, KV use and
then the lowest rank breaking ties; a request sharing whole prompt blocks with one placed
recently follows it unless that rank is more than `slack` sequences busier; finished
requests give their load back."""
from deepserve.engine.placement import RankPlacement

IDLE = [0.0, 0.0, 0.0]


def test_least_loaded_then_kv_use_then_lowest_rank():
    p = RankPlacement(3, block_size=4)
    assert [p.choose([i, 1, 2], 1, IDLE) for i in range(3)] == [0, 1, 2]   # shorter than a block: no prefix
    assert p.choose([9, 9], 2, [0.5, 0.1, 0.3]) == 1                        # equal loads: least KV use
    assert p.load == [1, 3, 1]
    p.finished(1, 3)
    assert p.choose([7], 1, IDLE) == 1


def test_shared_prefix_follows_its_rank_within_the_slack():
    p = RankPlacement(2, block_size=4, slack=1)
    system = [5, 6, 7, 8, 9, 10, 11, 12]                  # two whole blocks
    assert p.choose(system + [1], 1, [0.0, 0.0]) == 0
    assert p.choose([3, 3, 3, 3, 3], 1, [0.0, 0.0]) == 1  # other prefix: least loaded
    assert p.choose(system + [2, 2], 1, [0.0, 0.0]) == 0  # same prefix: rank 0 (load 1 vs 1)
    assert p.choose(system[:4] + [0] * 4, 1, [0.0, 0.0]) == 0   # first block only still matches
    # rank 0 now has 3 sequences against 1: more than the slack of 1, the prefix stays unused
    assert p.choose(system, 1, [0.0, 0.0]) == 1
    assert p.load == [3, 2]


def test_prefix_memory_is_bounded():
    p = RankPlacement(2, block_size=2, remember=3)
    p.choose([1, 2, 3, 4, 5, 6], 1, [0.0, 0.0])           # three blocks remembered on rank 0
    p.choose([7, 8, 9, 10], 1, [0.0, 0.0])                # two more on rank 1: the oldest two go
    assert len(p._prefix) == 3
    # [1, 2, 3, 4]'s blocks are forgotten: equal loads, so the lower KV use decides
    assert p.choose([1, 2, 3, 4], 1, [0.5, 0.0]) == 1
    assert p.choose([1, 2, 3, 4, 5, 6], 1, [0.0, 0.5]) == 1   # rank 1 now holds [1, 2, 3, 4]
