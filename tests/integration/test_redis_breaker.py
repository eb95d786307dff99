"""The Redis circuit breaker in a real worker: a private redis-server of this
test's own is stopped with SIGSTOP (it accepts connections and answers
nothing, as a hung server or a network black hole does), then resumed."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.models import digits_split
from gateway.store import CounterStore, redis_from_settings
from gateway.worker import Worker
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    fail_open_settings,
    responses_for,
    running_worker,
)
from tests.integration.test_adversarial import OwnRedis, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

logger = logging.getLogger(__name__)

X_TEST = digits_split()[1]
ANSWER_S = 30.0
TIMEOUT_S = 1.0
# Long enough that the hung phase below (a few fast batches) sees at most a
# probe or two; short enough that recovery does not drag the test out.
COOLDOWN_S = 8.0
HUNG_BATCHES = 5


def _sample(worker: Worker, name: str) -> float:
    value = worker.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def _breaker(worker: Worker) -> dict[str, float]:
    return {
        "state": _sample(worker, "modelgate_redis_breaker_state"),
        "opens": _sample(worker, "modelgate_redis_breaker_opens_total"),
        "rejected": _sample(worker, "modelgate_redis_breaker_rejected_total"),
        "waited": _sample(worker, "modelgate_redis_waited_out_total"),
    }


async def _requests_counted(settings: Settings, client_id: str) -> int:
    redis = redis_from_settings(settings)
    try:
        counters = await CounterStore(redis, settings).client_counters(client_id)
    finally:
        await redis.aclose()
    return counters["requests"]


async def test_hung_redis_costs_a_timeout_per_cooldown_not_per_call(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> None:
    """Fail mode ``open``: the first batch after Redis hangs waits out
    ``redis.breaker_failures`` timeouts in a row (the default, 3), which open
    the breaker; the batches after it are served without
    waiting (every call that still waited was a probe, each of which
    reopened the breaker). Once Redis resumes, a probe closes the breaker and
    requests are counted in Redis again."""
    own = OwnRedis(tmp_path, _free_port(16497))
    own.start()
    settings = fail_open_settings(
        stack,
        own.url,
        models_dir,
        redis={"socket_timeout_s": TIMEOUT_S, "breaker_cooldown_s": COOLDOWN_S},
    )
    key = await create_key(settings, "hang")
    row = 0

    async def ask(kafka: RawKafka) -> float:
        """One request in its own batch; its answer's wait in seconds."""
        nonlocal row
        started = time.monotonic()
        rid = await kafka.send_request(*key, X_TEST[row : row + 1], client_id="hang")
        row += 1
        await kafka.flush()
        answer = (await responses_for(settings, [rid], timeout_s=ANSWER_S))[rid]
        assert answer["status"] == "ok", answer.get("error")
        return time.monotonic() - started

    try:
        async with RawKafka(settings) as kafka, running_worker(settings) as worker:
            await ask(kafka)  # the key is cached; served while Redis hangs
            healthy_s = await ask(kafka)
            before = _breaker(worker)
            assert before["state"] == 0, before

            own.signal(signal.SIGSTOP)
            first_s = await ask(kafka)
            opened = _breaker(worker)
            assert opened["state"] == 2, opened
            assert opened["opens"] == before["opens"] + 1, opened
            # Opened by the threshold's worth of timeouts, not by the first.
            threshold = settings.redis.breaker_failures
            assert threshold > 1, "run with a threshold above one"
            assert opened["waited"] - before["waited"] >= threshold, opened

            hung_s = [await ask(kafka) for _ in range(HUNG_BATCHES)]
            hung = _breaker(worker)
            logger.info(
                "answer wait (s): healthy %.3f, first hung batch %.3f, later %s",
                healthy_s,
                first_s,
                [round(s, 3) for s in hung_s],
            )
            waited = hung["waited"] - opened["waited"]
            probes_failed = hung["opens"] - opened["opens"]
            # Every call that waited after the opening was a probe, and each
            # failed probe reopened the breaker: no batch paid for its calls.
            assert waited <= probes_failed, (opened, hung)
            assert waited < HUNG_BATCHES, (opened, hung)
            assert hung["rejected"] >= opened["rejected"] + HUNG_BATCHES, hung

            own.signal(signal.SIGCONT)
            # The next call after the cool-down probes and closes the breaker.
            deadline = time.monotonic() + COOLDOWN_S + ANSWER_S
            while _breaker(worker)["state"] != 0:
                assert time.monotonic() < deadline, _breaker(worker)
                await ask(kafka)
            closed = _breaker(worker)
            assert closed["waited"] - hung["waited"] <= 1, closed

            counted = await _requests_counted(settings, "hang")
            await ask(kafka)
            assert await _requests_counted(settings, "hang") == counted + 1
            assert _breaker(worker)["state"] == 0
    finally:
        own.kill()  # resumes it first if still stopped
