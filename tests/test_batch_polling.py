"""Many deferred tasks share few getResponse requests, and one bad task never fails the others."""

from __future__ import annotations

import asyncio

from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.runware.protocol import TaskStatus
from airflow_provider_zimage.triggers.polling import BatchPoller, batch_poller


def requests(n: int) -> list[ImageInferenceRequest]:
    return [
        ImageInferenceRequest.build(
            model="runware:z-image@turbo", positive_prompt=f"batch {i}", width=128, height=128
        )
        for i in range(n)
    ]


async def test_concurrent_polls_are_sent_as_a_few_batched_requests(zimage_conn):
    reqs = requests(250)
    await ZImageHook().asubmit(reqs)
    zimage_conn.wait_idle()
    before = zimage_conn.stats["requests"]
    poller = BatchPoller("zimage_default", max_batch=100)
    answers = await asyncio.gather(*(poller.poll(r.task_uuid) for r in reqs))
    assert zimage_conn.stats["requests"] - before == 3  # 250 polls, 3 POSTs of at most 100 tasks
    for req, answer in zip(reqs, answers, strict=True):
        status = TaskStatus(req.task_uuid).merge(answer)
        assert status.complete and len(status.results) == 1
        assert status.results[0].task_uuid == req.task_uuid


async def test_an_unknown_task_in_a_batch_fails_only_itself(zimage_conn):
    (good,) = requests(1)
    await ZImageHook().asubmit([good])
    zimage_conn.wait_idle()
    poller = BatchPoller("zimage_default")
    unknown = "00000000-0000-4000-8000-000000000000"
    good_answer, bad_answer = await asyncio.gather(poller.poll(good.task_uuid), poller.poll(unknown))
    assert TaskStatus(good.task_uuid).merge(good_answer).complete
    bad = TaskStatus(unknown).merge(bad_answer)
    assert bad.failed and bad.errors[0].code == "taskNotFound"


async def test_a_cancelled_waiter_does_not_break_the_batch(zimage_conn):
    reqs = requests(3)
    await ZImageHook().asubmit(reqs)
    poller = BatchPoller("zimage_default", window=0.05)
    waiters = [asyncio.ensure_future(poller.poll(r.task_uuid)) for r in reqs]
    await asyncio.sleep(0)
    waiters[0].cancel()
    done = await asyncio.gather(*waiters[1:])
    assert len(done) == 2


async def test_triggers_of_one_loop_share_one_poller():
    assert batch_poller("a") is batch_poller("a")
    assert batch_poller("a") is not batch_poller("b")
