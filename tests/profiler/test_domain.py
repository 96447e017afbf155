"""The recommendation and the request's checks, on figures written out here."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.profiler.domain import ProfileSpec, SizeResult, StepResult, complete_spec, recommend
from services.profiler.runtimes import RuntimeSize


def step(concurrency: int, rate: float, p99: float, memory: float = 100.0, errors: int = 0) -> StepResult:
    return StepResult(
        size_index=0,
        concurrency=concurrency,
        requests=int(rate),
        errors=errors,
        error_rate=errors / rate,
        throughput_rps=rate,
        p50_ms=p99 / 2,
        p90_ms=p99 * 0.8,
        p99_ms=p99,
        cpu_percent=90,
        memory_mb=memory,
        load_generator_cpu_percent=10,
        load_generator_saturated=False,
        seconds=1,
    )


def sizes() -> list[SizeResult]:
    return [
        SizeResult(RuntimeSize(1, 0, 1, 0), steps=[step(1, 1000, 2), step(8, 1500, 9), step(16, 1600, 30)]),
        SizeResult(RuntimeSize(1, 0, 1, 16), steps=[step(1, 300, 5), step(16, 2500, 9)]),
        SizeResult(RuntimeSize(2, 0, 2, 0), steps=[step(1, 1200, 1.5), step(16, 3000, 8, memory=150)]),
    ]


def test_the_cheapest_size_within_the_slo_with_headroom_wins() -> None:
    spec = ProfileSpec("m:1", p99_ms=12)  # with 20% headroom: p99 <= 10 ms
    found = recommend(sizes(), spec)
    assert found.met and found.size_index == 0 and found.cpus == 1 and found.replicas == 1
    assert found.memory_mb == 128  # 100 MiB peak + 20%, rounded up to 64 MiB
    assert "1,500 requests/s at 8 in flight" in found.explanation
    # The batched size of the same cores would serve more: the recommendation says so.
    assert "batching up to 16 rows raises one replica's capacity to 2,500" in found.explanation


def test_a_throughput_goal_sets_replicas_and_may_prefer_batching() -> None:
    found = recommend(sizes(), ProfileSpec("m:1", p99_ms=12, throughput_rps=6000))
    # 6000 x 1.2 = 7200/s: 5 x 1 core (1500), 3 x 1 core batched (2500) or 3 x 2 cores (3000).
    assert (found.cpus, found.replicas, found.max_batch_rows) == (1, 3, 16)


def test_a_slo_no_size_meets_says_by_how_much() -> None:
    found = recommend(sizes(), ProfileSpec("m:1", p99_ms=1))
    assert not found.met and found.size_index == -1 and found.replicas == 0
    assert "the lowest p99 was 1.50 ms (2 cpu at 1 in flight), 1.8x the allowed latency" in found.explanation


def test_steps_with_errors_do_not_count() -> None:
    failing = [SizeResult(RuntimeSize(1, 0, 1, 0), steps=[step(1, 1000, 2, errors=3)])]
    assert not recommend(failing, ProfileSpec("m:1", p99_ms=100)).met


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (ProfileSpec("m:1", p99_ms=-1), "slo.p99_ms"),
        (ProfileSpec("m:1", p99_ms=float("inf")), "slo.p99_ms"),
        (ProfileSpec("m:1", p99_ms=10, target="docker", sizes=(RuntimeSize(1, 32, 0, 0),)), "at least 64 MiB"),
        (ProfileSpec("m:1", p99_ms=10, sizes=(RuntimeSize(float("nan"), 0, 0, 0),)), "cpus"),
        (ProfileSpec("m:1", p99_ms=10, sizes=(RuntimeSize(1, 0, 0, -1),)), "max_batch_rows"),
        (ProfileSpec("m:1", p99_ms=10, warmup_seconds=float("nan")), "warmup_seconds"),
        (ProfileSpec("m:1", p99_ms=10, target="docker", image="Not A Reference"), "image"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(spec: ProfileSpec, words: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        complete_spec(spec, max_rows=100, max_seconds=1800)
    assert words in refused.value.message


def test_defaults_fill_an_empty_ladder() -> None:
    completed = complete_spec(ProfileSpec("m:1", p99_ms=10), max_rows=100, max_seconds=1800)
    assert completed.concurrency == (1, 2, 4, 8, 16) and completed.sizes and completed.step_seconds == 1.5
    assert all(size.threads >= 1 for size in completed.sizes)
