"""The autoscaling simulation (benchmarks/autoscale.py) on inputs whose answers are known: the HPA algorithm as the
Kubernetes documentation states it, and traces where the right number of replicas is obvious."""

from __future__ import annotations

from benchmarks.autoscale import shipped_targets
from benchmarks.cluster_sim import Autoscaler, Behavior, ReplicaModel, hpa_desired, simulate


def test_hpa_formula_on_the_documentations_examples():
    # "currentMetricValue 200m, desired 100m: the number of replicas will be doubled"
    assert hpa_desired(2, 0.200, 0.100) == 4
    # "currentMetricValue 50m, desired 100m: the number of replicas will be halved"
    assert hpa_desired(4, 0.050, 0.100) == 2
    # Within the 10 % tolerance: no change.
    assert hpa_desired(3, 0.105, 0.100) == 3 and hpa_desired(3, 0.095, 0.100) == 3
    # AverageValue of a total (KEDA's metricType AverageValue): ceil(total / target), whatever runs now.
    assert hpa_desired(2, 10.0, 4.0, per_pod_average=True) == 3
    assert hpa_desired(5, 10.0, 4.0, per_pod_average=True) == 3
    assert hpa_desired(3, 0.0, 4.0, per_pod_average=True) == 1  # never below one from a metric


def test_behavior_caps_scale_up_and_holds_scale_down():
    scaler = Autoscaler(1, 16, Behavior(up_percent=100, up_pods=4, down_percent=50, down_period_s=60, down_window_s=300))
    assert scaler.decide(0, 2, [20]) == 6  # max(+100 % = 4, +4 pods = 6)
    assert scaler.decide(15, 6, [20]) == 12  # +100 % = 12
    # Load gone: the 300 s window holds the highest recent recommendation, and never scales up from it.
    assert scaler.decide(30, 12, [1]) == 12
    assert scaler.decide(320, 12, [1]) == 6  # window passed: −50 % per minute at most
    assert scaler.decide(340, 6, [1]) == 6  # within the minute of the last step down
    assert scaler.decide(400, 6, [1]) == 3


def _model() -> ReplicaModel:
    # 4 images in 0.1 s of engine time, 5 ms decode per image on each of 2 cores: 4 / 0.11 s = 36 img/s per replica.
    return ReplicaModel(batch_seconds={1: 0.03, 4: 0.1, 8: 0.2}, decode_s=0.005, overhead_s=0.0, max_batch=4)


def _run(rule: str, *, low: float, peak: float, spike: float = 1.0, minutes: float = 10.0) -> dict:
    shipped = shipped_targets()
    targets = {k: shipped[k] for k in ("queue_depth", "queue_wait_p90_s", "engine_busy")} | {"cpu_utilization": 0.7}
    return simulate(_model(), rule, targets, minutes=minutes, low=low, peak=peak, spike=spike, spike_at_s=240, spike_s=120,
                    start_s=30, poll_s=15, slo_s=1.0, minimum=1, maximum=16, behavior=shipped["behavior"])


def test_constant_light_load_never_scales():
    model = _model()
    assert abs(model.capacity - 4 / 0.11) < 1e-9
    for rule in ("queue", "cpu"):
        r = _run(rule, low=5.0, peak=5.0)  # 15 % of one replica: every rule should hold one
        assert r["max_replicas"] == 1, rule
        assert r["refused"] == 0 and r["fraction_of_time_over_slo"] == 0.0, rule
        assert 0.95 * 5 * 600 < r["requests"] < 1.05 * 5 * 600


def test_constant_heavy_load_gets_the_replicas_it_needs_and_no_more():
    # 80 req/s is 2.2 replicas' worth. From one replica the queue explodes and the rule jumps high; once the 300 s
    # window has passed it settles where engine busy is near its 0.6 target: 80 × 0.1 / 4 = 2 engine-s/s → 4 replicas.
    r = _run("queue", low=80.0, peak=80.0, minutes=20)
    settled = [row["replicas"] for row in r["series"] if row["t_s"] >= 600]
    assert set(settled) <= {4, 5}, settled
    assert r["fraction_over_slo_outside_spike_first_minute"] < 0.1


def test_a_burst_is_served_after_the_pods_start():
    r = _run("queue", low=20.0, peak=20.0, spike=5.0, minutes=10)
    assert r["max_replicas"] >= 4
    after = [row for row in r["series"] if 240 + 90 <= row["t_s"] < 360]  # pods ready 30 s after a 15 s poll, + drain
    assert all(row["p99_s"] is not None and row["p99_s"] < 1.0 and row["refused"] == 0 for row in after), after
