"""The cost model: the timetable played with action costs (bench/timetable_model.py), held
to the formulas known for it and to this machine's committed runs (docs/benchmarks.md)."""
import json

import pytest

from conftest import ROOT
from hpcaux.bench.cost_model import measured_vs_predicted, projection
from hpcaux.bench.timetable_model import ActionCosts, step_time
from hpcaux.train.lp.schedule import Plan


def equal_stages(K: int, forward: float = 1.0, message: float = 0.0) -> ActionCosts:
    return ActionCosts((forward,) * K, (2 * forward,) * K, (0.0,) * K, (0.0,) * K, (message,) * (K - 1), 0.0,
                       (0.0,) * K)


@pytest.mark.parametrize("K,M", [(2, 1), (2, 4), (3, 2), (4, 4), (4, 8)])
def test_gpipe_takes_its_bubble(K, M):
    """GPipe with equal stages: (M + K - 1) forward ticks and as many backward ones a step."""
    t = step_time(Plan("gpipe", K, 40, M), equal_stages(K))
    assert t.steady_ms == pytest.approx((M + K - 1) * 3.0)
    assert all(w == pytest.approx((K - 1) * 3.0) for w in t.wait_ms)


@pytest.mark.parametrize("K,M", [(2, 1), (2, 4), (4, 1), (4, 4), (8, 2)])
def test_delayed_gradient_pipeline_has_no_bubble_but_fills_and_drains(K, M):
    t = step_time(Plan("chained", K, 40, M, "only", "fused"), equal_stages(K))
    assert t.steady_ms == pytest.approx(3.0 * M) and max(t.wait_ms) == pytest.approx(0.0)
    assert t.fill_drain_ms > 0 and t.step_ms == pytest.approx(t.steady_ms + t.fill_drain_ms / 40)
    slower_messages = step_time(Plan("chained", K, 40, M, "only", "fused"), equal_stages(K, message=0.5))
    assert slower_messages.fill_drain_ms > t.fill_drain_ms   # a message in flight only delays the fill


def test_a_slow_stage_sets_the_step_and_the_other_waits():
    costs = ActionCosts((2.0, 1.0), (4.0, 2.0), (0.0, 0.0), (0.0, 0.0), (0.0,), 0.0, (0.0, 0.0))
    t = step_time(Plan("chained", 2, 40, 4, "only", "fused"), costs)
    assert t.steady_ms == pytest.approx(4 * 6.0) and t.wait_ms == pytest.approx((0.0, 4 * 3.0))


def test_the_relay_runs_a_middle_stage_twice():
    """Relayed, a middle stage runs its forward and backward on the AuxNet's prediction and
    on the relayed real input: twice the AuxNet alone's step."""
    alone = step_time(Plan("auxnet", 4, 40), equal_stages(4)).steady_ms
    relay = step_time(Plan("exchange", 4, 40, 1, "beside", "fused", relay=True), equal_stages(4)).steady_ms
    assert alone == pytest.approx(3.0) and relay > 2 * alone


@pytest.mark.parametrize("bench,method", [("protocol_a_k2_seed0", "lp_default"), ("protocol_a_k2_seed1", "lp_default"),
                                          ("protocol_a_k2_seed2", "lp_default"), ("relay_resnet20_k4", "lp_pipeline_m4"),
                                          ("relay_resnet20_k4", "lp_relay"), ("k4_resnet20", "lp_al")])
def test_the_model_is_within_ten_percent_of_the_committed_runs(bench, method):
    """docs/benchmarks.md's claim: the K = 2 default and the K = 4 runs, from their files."""
    results = json.loads((ROOT / "docs" / "bench" / bench / "results.json").read_text())
    row, = [r for r in measured_vs_predicted(results) if r["method"] == method]
    assert abs(row["error"]) < 0.10, row
    assert max(abs(p - m) for p, m in zip(row["predicted_wait_ms"], row["measured_wait_ms"])) < 25, row


def test_projection_costs_an_imagenet_resnet_down_to_a_one_pixel_feature_map():
    """ResNet-18 at 32 px ends at 1x1 feature maps: the one-image MAC count must not trip
    BatchNorm (it did, in training mode, after protocol C's methods had all run)."""
    row, = projection(ks=(2,), models=(("resnet18", 10, 32, 8, 10),))["rows"]
    assert row["serial_ms"] > 0 and all(0 < row[m]["speedup"] < 2 for m in ("gpipe", "pipeline", "auxnet", "relay"))
    assert row["pipeline"]["microbatches"] == 4 and row["auxnet"]["microbatches"] == 1
