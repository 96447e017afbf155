"""Drift statistics: behaviour at 10^6 rows, agreement with exact scipy results, edge cases."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial import distance

from services.drift import statistics as ds

ROWS = 1_000_000
CATEGORIES = np.array(["red", "green", "blue", "cyan", "black"])
CATEGORY_MIX = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
SHIFTED_MIX = np.array([0.25, 0.25, 0.2, 0.2, 0.1])
SHIFTED = {"normal_0", "lognormal_1", "colour"}


def _draw(name: str, rng: np.random.Generator, size: int, shifted: bool = False) -> np.ndarray:
    """One column of the 20-feature table; `shifted` applies the feature's drift (only for SHIFTED names)."""
    family, _, number = name.rpartition("_")
    index = int(number) if number.isdigit() else 0
    if family == "normal":
        mean, std = 5.0 * index - 3.0, 1.0 + index
        return rng.normal(mean + (0.5 * std if shifted else 0.0), std, size)
    if family == "lognormal":
        return rng.lognormal(0.2 * index, 0.5 * (1.5 if shifted else 1.0) + 0.1 * index, size)
    if family == "uniform":
        return rng.uniform(-index, 2.0 + index, size)
    if name == "colour":
        return rng.choice(CATEGORIES, size=size, p=SHIFTED_MIX if shifted else CATEGORY_MIX)
    if name == "code":
        return rng.integers(0, 12, size)
    if name == "flag":
        return rng.random(size) < 0.3
    if name == "segment":
        return rng.choice(np.array(["a", "b", "c", None], dtype=object), size=size, p=[0.5, 0.3, 0.18, 0.02])
    raise AssertionError(name)


FEATURES = (
    [f"normal_{i}" for i in range(6)]
    + [f"lognormal_{i}" for i in range(5)]
    + [f"uniform_{i}" for i in range(5)]
    + ["colour", "code", "flag", "segment"]
)
KINDS: dict[str, ds.Kind] = {"code": "categorical"}


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    """Baseline, a same-distribution window and a window with 3 shifted features, 10^6 rows x 20 features."""
    rng = np.random.default_rng(20240611)
    baseline = {name: _draw(name, rng, ROWS) for name in FEATURES}
    same = {name: _draw(name, rng, ROWS) for name in FEATURES}
    shifted = dict(same)
    for name in SHIFTED:
        shifted[name] = _draw(name, rng, ROWS, shifted=True)
    summaries = {name: ds.summarize(values, KINDS.get(name)) for name, values in baseline.items()}
    return {"baseline": baseline, "same": same, "shifted": shifted, "summaries": summaries}


def _assert_plain_json(value: Any) -> None:
    """Only JSON types, and no NaN or infinity anywhere."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            _assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            _assert_plain_json(item)
    elif isinstance(value, float):
        assert math.isfinite(value)
    else:
        assert value is None or isinstance(value, str | int | bool), type(value)
    json.dumps(value, allow_nan=False)


# --------------------------------------------------------------------------------------------------------------------
# 10^6 rows x 20 features
# --------------------------------------------------------------------------------------------------------------------


def test_kinds_are_inferred(table: dict[str, Any]) -> None:
    kinds = {name: summary.kind for name, summary in table["summaries"].items()}
    assert {name for name, kind in kinds.items() if kind == "categorical"} == {"colour", "code", "flag", "segment"}
    assert table["summaries"]["segment"].missing_rate == pytest.approx(0.02, abs=0.002)


def test_no_shift_flags_nothing(table: dict[str, Any]) -> None:
    result = ds.check(table["summaries"], table["same"])
    assert not result.drift_detected
    assert result.drifted_features == ()
    assert result.drift_coefficient == 0.0
    for name, feature in result.features.items():
        assert not feature.drifted, name
        if feature.kind == "numeric":
            assert feature.wasserstein < 0.02 and feature.psi < 0.01, name
        else:
            assert feature.js_distance < 0.01, name
    _assert_plain_json(result.to_dict())


def test_three_shifted_features_are_exactly_the_flagged_ones(table: dict[str, Any]) -> None:
    result = ds.check(table["summaries"], table["shifted"])
    assert result.drift_detected
    assert set(result.drifted_features) == SHIFTED
    assert result.features["normal_0"].wasserstein == pytest.approx(0.5, abs=0.01)  # mean shift of 0.5 std
    assert result.features["colour"].js_distance > 0.1
    for name in SHIFTED:
        assert result.features[name].p_value_adjusted < 1e-12
    expected = sum(min(1.0, result.features[name].effect_ratio / 2) for name in SHIFTED) / len(FEATURES)
    assert result.drift_coefficient == pytest.approx(expected)
    assert 0 < result.drift_coefficient <= len(SHIFTED) / len(FEATURES)
    _assert_plain_json(result.to_dict())


def test_tiny_shift_is_significant_but_not_flagged(table: dict[str, Any]) -> None:
    """At 10^6 rows a 0.01-std shift has a tiny p-value; the effect-size rule keeps it from being flagged."""
    summary = table["summaries"]["normal_1"]
    window = table["same"]["normal_1"] + 0.01 * summary.numeric.std
    result = ds.compare(summary, window)
    assert result.p_value < 1e-3
    assert result.wasserstein == pytest.approx(0.01, abs=0.003)
    assert not result.effect_exceeded and not result.drifted


def test_round_trip_through_json_gives_identical_results(table: dict[str, Any]) -> None:
    stored = {name: json.loads(json.dumps(summary.to_dict())) for name, summary in table["summaries"].items()}
    restored = {name: ds.BaselineSummary.from_dict(data) for name, data in stored.items()}
    assert restored == table["summaries"]
    original = ds.check(table["summaries"], table["shifted"]).to_dict()
    again = ds.check(restored, table["shifted"]).to_dict()
    assert json.dumps(again) == json.dumps(original)


def test_check_leaves_the_window_untouched(table: dict[str, Any]) -> None:
    column = table["same"]["normal_2"]
    before = column.copy()
    ds.compare(table["summaries"]["normal_2"], column)
    np.testing.assert_array_equal(column, before)


# --------------------------------------------------------------------------------------------------------------------
# Agreement with exact results
# --------------------------------------------------------------------------------------------------------------------

EXACT_CASES = {
    "normal": (lambda r, s: r.normal(0, 1, s), lambda r, s: r.normal(0, 1, s)),
    "normal_shift": (lambda r, s: r.normal(0, 1, s), lambda r, s: r.normal(0.3, 1, s)),
    "normal_scale": (lambda r, s: r.normal(0, 1, s), lambda r, s: r.normal(0, 1.5, s)),
    "lognormal": (lambda r, s: r.lognormal(0, 1, s), lambda r, s: r.lognormal(0, 1, s)),
    "lognormal_shift": (lambda r, s: r.lognormal(0, 1, s), lambda r, s: r.lognormal(0.2, 1, s)),
    "uniform_wider": (lambda r, s: r.uniform(0, 1, s), lambda r, s: r.uniform(-0.5, 1.5, s)),
    "integers": (lambda r, s: r.poisson(3, s).astype(float), lambda r, s: r.poisson(3.5, s).astype(float)),
    "zero_inflated": (
        lambda r, s: np.where(r.random(s) < 0.3, 0.0, r.exponential(2, s)),
        lambda r, s: np.where(r.random(s) < 0.35, 0.0, r.exponential(2, s)),
    ),
    "narrow_window": (lambda r, s: r.normal(0, 1, s), lambda r, s: r.normal(0.5, 0.01, s)),
}
WASSERSTEIN_TOLERANCE = 5e-4  # in baseline std units
KS_TOLERANCE = 1e-3  # the sketch's resolution 1 / (m - 1)


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_sketch_agrees_with_exact_scipy(case: str) -> None:
    """N = 200,000 baseline values, n = 50,000 window values, default 1,001-point sketch."""
    rng = np.random.default_rng(sorted(EXACT_CASES).index(case))
    draw_baseline, draw_window = EXACT_CASES[case]
    baseline, window = draw_baseline(rng, 200_000), draw_window(rng, 50_000)
    summary = ds.summarize(baseline)
    result = ds.compare(summary, window)
    exact_w = stats.wasserstein_distance(baseline, window) / summary.numeric.std
    exact = stats.ks_2samp(baseline, window)
    assert abs(result.wasserstein - exact_w) <= WASSERSTEIN_TOLERANCE
    assert abs(result.ks_statistic - exact.statistic) <= KS_TOLERANCE
    n_effective = baseline.size * window.size / (baseline.size + window.size)
    exact_p = special.kolmogorov(math.sqrt(n_effective) * exact.statistic)
    assert abs(result.p_value - exact_p) <= 0.1
    if exact.pvalue > 1e-6 or result.p_value > 1e-6:
        assert (result.p_value < 0.05) == (exact.pvalue < 0.05)


def test_error_margins_hold_on_coarse_sketches() -> None:
    """The guaranteed margins (exact value within [estimate, estimate + slack]) on many small random cases."""
    rng = np.random.default_rng(99)
    for trial in range(300):
        n_base, n_window = rng.integers(1, 400, size=2)
        if trial % 3 == 0:
            baseline = rng.integers(0, 8, n_base).astype(float)
            window = rng.integers(-1, 9, n_window).astype(float)
        else:
            baseline = rng.normal(0, 1, n_base)
            window = rng.normal(rng.normal(0, 0.5), rng.uniform(0.2, 2), n_window)
        summary = ds.summarize(baseline, n_quantiles=int(rng.integers(2, 40)))
        metrics = ds._numeric_metrics(summary.numeric, window, 1e-4)
        exact_w = stats.wasserstein_distance(baseline, window) / summary.numeric.scale
        exact_d = stats.ks_2samp(baseline, window).statistic
        assert metrics.wasserstein - 1e-9 <= exact_w <= metrics.wasserstein + metrics.wasserstein_slack + 1e-9
        assert metrics.ks_statistic - 1e-12 <= exact_d <= metrics.ks_statistic + metrics.ks_slack + 1e-12


def test_ks_is_exact_when_the_baseline_fits_in_the_sketch() -> None:
    rng = np.random.default_rng(5)
    baseline, window = rng.normal(0, 1, 700), rng.normal(0.2, 1.2, 5_000)
    result = ds.compare(ds.summarize(baseline), window)
    assert result.ks_statistic == pytest.approx(stats.ks_2samp(baseline, window).statistic, abs=1e-12)


def test_psi_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(11)
    baseline, window = rng.normal(0, 1, 100_000), rng.normal(0.3, 1.1, 30_000)
    result = ds.compare(ds.summarize(baseline), window)
    ordered = np.sort(baseline)
    edges = ordered[np.rint(np.linspace(0, baseline.size - 1, 11)[1:-1]).astype(int)]
    expected = np.maximum(np.bincount(np.searchsorted(edges, baseline, side="right"), minlength=10) / 1e5, 1e-4)
    actual = np.maximum(np.bincount(np.searchsorted(edges, window, side="right"), minlength=10) / 3e4, 1e-4)
    assert result.psi == pytest.approx(float(np.sum((actual - expected) * np.log(actual / expected))), rel=1e-12)


def test_chi_square_and_js_match_scipy() -> None:
    rng = np.random.default_rng(3)
    baseline = rng.choice(CATEGORIES, size=50_000, p=CATEGORY_MIX)
    window = rng.choice(CATEGORIES, size=8_000, p=SHIFTED_MIX)
    summary = ds.summarize(baseline)
    result = ds.compare(summary, window)
    shares = dict(zip(summary.categorical.categories, summary.categorical.proportions, strict=True))
    observed = np.array([np.sum(window == c) for c in summary.categorical.categories])
    expected = np.array([shares[c] for c in summary.categorical.categories]) * window.size
    reference = stats.chisquare(observed, expected)
    assert result.chi2_statistic == pytest.approx(reference.statistic, rel=1e-9)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-6, abs=1e-300)
    assert result.chi2_dof == 4
    js = distance.jensenshannon(list(shares.values()), observed / window.size, base=2)
    assert result.js_distance == pytest.approx(js, rel=1e-9)
    assert result.drifted


# --------------------------------------------------------------------------------------------------------------------
# Categorical specifics
# --------------------------------------------------------------------------------------------------------------------


def test_new_category_is_reported_as_unseen() -> None:
    rng = np.random.default_rng(8)
    summary = ds.summarize(rng.choice(CATEGORIES, size=20_000, p=CATEGORY_MIX))
    window = rng.choice(np.append(CATEGORIES, "magenta"), size=10_000, p=[*(CATEGORY_MIX * 0.8), 0.2])
    result = ds.compare(summary, window)
    assert result.unseen_categories == ("magenta",)
    assert result.unseen_share == pytest.approx(np.mean(window == "magenta"))
    assert result.chi2_dof == 5  # the "other" bucket joins because the window has unseen values
    assert result.drifted and result.note == ""
    _assert_plain_json(result.to_dict())


def test_a_handful_of_unseen_values_is_no_drift() -> None:
    rng = np.random.default_rng(9)
    summary = ds.summarize(rng.choice(CATEGORIES, size=20_000, p=CATEGORY_MIX))
    window = rng.choice(CATEGORIES, size=10_000, p=CATEGORY_MIX).astype(object)
    window[:3] = "typo"
    result = ds.compare(summary, window)
    assert result.unseen_categories == ("typo",)
    assert not result.drifted


def test_unseen_list_is_capped_and_ordered_by_frequency() -> None:
    summary = ds.summarize(["a"] * 100)
    window = ["a"] * 50 + [f"new{i}" for i in range(30) for _ in range(i + 1)]
    result = ds.compare(summary, window)
    assert len(result.unseen_categories) == ds.MAX_UNSEEN_LISTED
    assert result.unseen_categories[:2] == ("new29", "new28")


def test_truncated_baseline_lumps_rare_categories() -> None:
    values = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5
    summary = ds.summarize(values, max_categories=2)
    assert summary.categorical.categories == ("a", "b")
    assert summary.categorical.other_proportion == pytest.approx(0.2)
    assert summary.categorical.n_categories == 4
    result = ds.compare(summary, values)
    assert result.js_distance == pytest.approx(0.0, abs=1e-12)
    assert set(result.unseen_categories) == {"c", "d"}
    assert "most frequent" in result.note
    assert not result.drifted


def test_category_types_survive_json() -> None:
    summary = ds.summarize(np.array([1, 2, 2, 3, 3, 3]), "categorical")
    restored = ds.BaselineSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert restored.categorical.categories == (3, 2, 1)
    assert ds.compare(restored, [3, 3, 3, 2, 2, 1]).js_distance == pytest.approx(0.0, abs=1e-12)
    mixed = ds.summarize(["x", 7, None, True, b"raw", 2.5])
    assert mixed.kind == "categorical" and mixed.n_missing == 1
    assert set(mixed.categorical.categories) == {"x", 7, True, "raw", 2.5}


# --------------------------------------------------------------------------------------------------------------------
# Benjamini-Hochberg and persistence
# --------------------------------------------------------------------------------------------------------------------


def test_benjamini_hochberg_by_hand() -> None:
    # sorted: 0.005 (x4/1 = 0.02), 0.01 (x4/2 = 0.02), 0.03 (x4/3 = 0.04), 0.04 (x4/4 = 0.04)
    np.testing.assert_allclose(ds.benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    # the monotone step: 0.02 x 3/2 = 0.03 is lowered to 0.03 x 3/3 = 0.03; 0.011 x 3 = 0.033 to 0.03
    np.testing.assert_allclose(ds.benjamini_hochberg([0.02, 0.011, 0.03]), [0.03, 0.03, 0.03])
    np.testing.assert_allclose(ds.benjamini_hochberg([0.9, 0.8]), [0.9, 0.9])
    assert ds.benjamini_hochberg([]).size == 0
    with pytest.raises(ValueError):
        ds.benjamini_hochberg([0.5, 1.5])


def test_benjamini_hochberg_matches_scipy() -> None:
    p = np.random.default_rng(4).random(200) ** 3
    np.testing.assert_allclose(ds.benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)


def test_check_uses_adjusted_p_values() -> None:
    rng = np.random.default_rng(21)
    summaries = {f"x{i}": ds.summarize(rng.normal(0, 1, 5_000)) for i in range(6)}
    window = {f"x{i}": rng.normal(0.04 * i, 1 + 0.05 * i, 400) for i in range(6)}
    result = ds.check(summaries, window)
    raw = [result.features[name].p_value for name in summaries]
    adjusted = [result.features[name].p_value_adjusted for name in summaries]
    np.testing.assert_allclose(adjusted, ds.benjamini_hochberg(raw))
    for feature in result.features.values():
        assert feature.drifted == (feature.effect_exceeded and feature.p_value_adjusted < 0.05)


def test_adjustment_can_overturn_a_raw_decision() -> None:
    """Effect exceeded and raw p just under alpha on one of many features: not drifted after correction."""
    rng = np.random.default_rng(2)
    baseline = rng.normal(0, 1, 20_000)
    summary = ds.summarize(baseline)
    window = None
    for _ in range(500):
        candidate = rng.normal(0, 1.35, 12)
        result = ds.compare(summary, candidate)
        if result.effect_exceeded and 0.01 < result.p_value < 0.05:
            window = candidate
            break
    assert window is not None
    quiet = {f"q{i}": ds.summarize(rng.normal(0, 1, 2_000)) for i in range(9)}
    summaries = {"noisy": summary, **quiet}
    columns = {"noisy": window, **{name: rng.normal(0, 1, 12) for name in quiet}}
    checked = ds.check(summaries, columns).features["noisy"]
    assert checked.p_value < 0.05 <= checked.p_value_adjusted
    assert not checked.drifted


def test_consecutive_requires_k_checks_in_a_row() -> None:
    def fake(drifted: tuple[str, ...]) -> ds.CheckResult:
        return ds.CheckResult({}, drifted, bool(drifted), 0.0, 1)

    history = [fake(("a", "b")), fake(("b",)), fake(("b", "c")), fake(("c", "b"))]
    assert ds.consecutive(history, 3) == ds.Persistence(True, ("b",))
    assert ds.consecutive(history, 2) == ds.Persistence(True, ("c", "b"))
    assert ds.consecutive([*history, fake(())], 2) == ds.Persistence(False, ())
    assert ds.consecutive(history[:1], 2) == ds.Persistence(False, ())
    with pytest.raises(ValueError):
        ds.consecutive(history, 0)


# --------------------------------------------------------------------------------------------------------------------
# Missing values and edge cases
# --------------------------------------------------------------------------------------------------------------------


def test_empty_windows_raise() -> None:
    summary = ds.summarize([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty window"):
        ds.compare(summary, [])
    with pytest.raises(ValueError, match="empty window"):
        ds.check({"x": summary}, {})
    with pytest.raises(ValueError, match="empty window"):
        ds.check({"x": summary}, {"x": np.array([])})
    with pytest.raises(ValueError, match="differ in length"):
        ds.check({"x": summary, "y": summary}, {"x": [1.0, 2.0], "y": [1.0]})
    with pytest.raises(ValueError, match="no baseline summaries"):
        ds.check({}, {"x": [1.0]})
    with pytest.raises(ValueError, match="empty baseline"):
        ds.summarize([])


def test_all_missing_feature_follows_the_rule() -> None:
    present = ds.summarize(np.arange(100.0))
    mostly_missing = ds.summarize(np.r_[np.arange(40.0), np.full(60, np.nan)])
    colours = ds.summarize(["a", "b", None, "a"])
    result = ds.check(
        {"present": present, "mostly_missing": mostly_missing, "colours": colours, "absent": present},
        {"present": np.full(10, np.nan), "mostly_missing": [None] * 10, "colours": [None] * 10},
    )
    features = result.features
    for name in ("present", "mostly_missing", "colours", "absent"):
        assert features[name].missing_rate == 1.0
        assert features[name].p_value is None and features[name].wasserstein is None
    assert features["present"].drifted and features["colours"].drifted and features["absent"].drifted
    assert not features["mostly_missing"].drifted
    assert features["present"].missing_rate_change == 1.0
    assert "absent" in features["absent"].note
    assert set(result.drifted_features) == {"present", "colours", "absent"}
    assert result.drift_coefficient == pytest.approx(3 / 4)
    _assert_plain_json(result.to_dict())


def test_partial_missing_rates_are_reported() -> None:
    rng = np.random.default_rng(6)
    summary = ds.summarize(np.where(rng.random(10_000) < 0.1, np.nan, rng.normal(0, 1, 10_000)))
    window = np.where(rng.random(5_000) < 0.4, np.nan, rng.normal(0, 1, 5_000))
    result = ds.compare(summary, window)
    assert summary.missing_rate == pytest.approx(0.1, abs=0.01)
    assert result.missing_rate == pytest.approx(0.4, abs=0.02)
    assert result.missing_rate_change == pytest.approx(result.missing_rate - summary.missing_rate)
    assert result.n_values == np.count_nonzero(~np.isnan(window))
    assert not result.drifted


def test_constant_baseline() -> None:
    summary = ds.summarize(np.full(1_000, 7.0))
    assert summary.numeric.std == 0.0 and summary.numeric.scale == 7.0
    same = ds.compare(summary, np.full(500, 7.0))
    assert same.wasserstein == 0.0 and same.ks_statistic == 0.0 and same.psi == 0.0 and not same.drifted
    moved = ds.compare(summary, np.full(500, 8.4))
    assert moved.wasserstein == pytest.approx(1.4 / 7.0)
    assert moved.out_of_range_share == 1.0 and moved.ks_statistic == 1.0 and moved.drifted
    tenth = ds.summarize(np.full(1_000_003, 0.1))
    assert tenth.numeric.std == 0.0 and tenth.numeric.mean == 0.1 and tenth.numeric.scale == 1.0
    zero = ds.summarize(np.zeros(1_000))
    assert ds.compare(zero, np.r_[np.zeros(400), np.ones(100)]).wasserstein == pytest.approx(0.2)
    _assert_plain_json(moved.to_dict())


def test_infinite_values_count_as_missing() -> None:
    rng = np.random.default_rng(12)
    baseline = rng.normal(0, 1, 10_000)
    baseline[:100] = np.inf
    baseline[100:150] = -np.inf
    summary = ds.summarize(baseline)
    assert summary.n_missing == 150
    assert math.isfinite(summary.numeric.mean) and math.isfinite(summary.numeric.maximum)
    window = rng.normal(0, 1, 2_000)
    window[:500] = np.inf
    result = ds.compare(summary, window)
    assert result.missing_rate == 0.25 and result.n_values == 1_500
    assert not result.drifted
    only_inf = ds.compare(summary, [np.inf, -np.inf, np.nan])
    assert only_inf.missing_rate == 1.0 and only_inf.drifted
    for item in (result, only_inf):
        _assert_plain_json(item.to_dict())


def test_baseline_without_values() -> None:
    summary = ds.summarize([np.nan, np.nan, None])
    assert summary.kind == "numeric" and summary.numeric is None and summary.missing_rate == 1.0
    result = ds.compare(summary, [1.0, 2.0])
    assert not result.drifted and result.p_value is None and "no non-missing" in result.note
    assert ds.BaselineSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary


def test_extreme_values_stay_finite() -> None:
    summary = ds.summarize(np.random.default_rng(1).normal(0, 1, 1_000))
    result = ds.compare(summary, np.repeat([1e300, -1e300, 0.0], 100))
    assert result.drifted and result.out_of_range_share == pytest.approx(2 / 3)
    overflowing = ds.compare(summary, np.repeat([1.7e308, -1.7e308], 100))
    assert overflowing.drifted and overflowing.wasserstein == sys.float_info.max
    for item in (result, overflowing):
        _assert_plain_json(item.to_dict())
    with pytest.raises(ValueError, match="too large"):
        ds.summarize([1.7e308, 1.7e308, -1.0])


def test_input_handling() -> None:
    assert ds.infer_kind(np.arange(3)) == "numeric"
    assert ds.infer_kind([1.5, None, 2]) == "numeric"
    assert ds.infer_kind(np.array([True, False])) == "categorical"
    assert ds.infer_kind(["a", "b"]) == "categorical"
    summary = ds.summarize(np.arange(10.0))
    assert ds.compare(summary, np.arange(10, dtype=np.int32)).ks_statistic == 0.0
    assert ds.compare(summary, np.arange(10, dtype=np.float32)).ks_statistic == 0.0
    with pytest.raises(ValueError, match="not numbers"):
        ds.compare(summary, ["a", "b"])
    with pytest.raises(ValueError, match="one-dimensional"):
        ds.compare(summary, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="kind"):
        ds.summarize([1.0], "ordinal")  # type: ignore[arg-type]


def test_thresholds_are_validated() -> None:
    assert ds.Thresholds() == ds.Thresholds(wasserstein=0.1, psi=0.2, js_distance=0.1, alpha=0.05)
    with pytest.raises(ValueError):
        ds.Thresholds(alpha=0)
    with pytest.raises(ValueError):
        ds.Thresholds(psi=-1)
    with pytest.raises(ValueError, match="version"):
        ds.BaselineSummary.from_dict({"version": 99, "kind": "numeric", "n_rows": 1, "n_missing": 0})


def test_custom_thresholds_change_the_decision() -> None:
    rng = np.random.default_rng(14)
    summary = ds.summarize(rng.normal(0, 1, 50_000))
    window = rng.normal(0.08, 1, 50_000)
    assert not ds.compare(summary, window).drifted
    assert ds.compare(summary, window, ds.Thresholds(wasserstein=0.05)).drifted
