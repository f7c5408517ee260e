"""Python asyncio: aio-pika (on aiormq) in the habits of asyncio services."""
import asyncio

import pytest

from conftest import missing

try:
    import aio_pika
    import aiormq
except ImportError:  # pragma: no cover - depends on the machine
    aio_pika = None


@pytest.fixture(autouse=True)
def need_aio_pika():
    if aio_pika is None:
        missing("aio-pika is not installed (pip install -r tests/requirements.txt)")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_confirmed_publishes_then_iterator_consumer_with_acks(target, names):
    q = names("compat-aio")

    async def main():
        async with await aio_pika.connect(target.url) as conn:
            ch = await conn.channel()  # publisher confirms on by default
            queue = await ch.declare_queue(q)
            for i in range(500):
                confirmation = await ch.default_exchange.publish(
                    aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=q)
                assert isinstance(confirmation, aiormq.spec.Basic.Ack), confirmation
            consumer_ch = await conn.channel()
            await consumer_ch.set_qos(prefetch_count=20)
            queue = await consumer_ch.get_queue(q)
            got = []
            async with queue.iterator() as it:
                async for message in it:
                    async with message.process():
                        got.append(int(message.body))
                    if len(got) == 500:
                        break
            declared = await consumer_ch.declare_queue(q, passive=True)
            return got, declared.declaration_result.message_count

    got, left = run(main())
    assert got == list(range(500))
    assert left == 0


def test_mandatory_unroutable_publish_is_returned(target, names):
    key = names("compat-aio-r")

    async def main():
        async with await aio_pika.connect(target.url) as conn:
            # Default channel: the publish resolves to the basic.return, and return callbacks see it.
            ch = await conn.channel()
            returned = []
            ch.return_callbacks.add(lambda _ch, message: returned.append(message))
            result = await ch.default_exchange.publish(aio_pika.Message(b"nobody"), routing_key=key, mandatory=True)
            # on_return_raises: the publish raises with the returned message.
            raising = await conn.channel(on_return_raises=True)
            with pytest.raises(aiormq.exceptions.PublishError) as e:
                await raising.default_exchange.publish(aio_pika.Message(b"again"), routing_key=key, mandatory=True)
            # Both channels go on.
            await ch.declare_queue(exclusive=True)
            await raising.declare_queue(exclusive=True)
            return result, e.value, returned

    result, err, returned = run(main())
    assert isinstance(result.delivery, aiormq.spec.Basic.Return)
    assert result.delivery.reply_code == 312 and result.body == b"nobody"
    assert err.message.body == b"again"
    assert [m.body for m in returned] == [b"nobody"]


def test_channel_error_closes_only_the_channel(target, names):
    q = names("compat-aio-e")

    async def main():
        async with await aio_pika.connect(target.url) as conn:
            ch = await conn.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity) as e:
                await ch.declare_queue(q, passive=True)
            other = await conn.channel()
            declared = await other.declare_queue(q)
            return str(e.value), declared.name, conn.is_closed

    text, name, closed = run(main())
    assert "NOT_FOUND" in text and name == q and closed is False


def test_consumer_cancel_notification(target, names):
    q = names("compat-aio-q")

    async def main():
        async with await aio_pika.connect(target.url) as conn:
            ch = await conn.channel()
            queue = await ch.declare_queue(q)
            cancelled = asyncio.get_running_loop().create_future()
            async def ignore(message):
                pass

            tag = await queue.consume(ignore)
            underlay = await ch.get_underlay_channel()
            other = await conn.channel()
            await other.queue_delete(q)
            # aiormq removes a consumer the broker cancelled; the channel stays open and usable.
            for _ in range(100):
                if tag not in underlay.consumers:
                    cancelled.set_result(True)
                    break
                await asyncio.sleep(0.05)
            usable = await ch.declare_queue(exclusive=True)
            return cancelled.done(), usable.name.startswith("amq.gen-")

    cancelled, usable = run(main())
    assert cancelled and usable


def test_heartbeats_keep_an_idle_connection(target, names):
    q = names("compat-aio-h")

    async def main():
        async with await aio_pika.connect(target.url + "?heartbeat=1") as conn:
            ch = await conn.channel()
            await asyncio.sleep(3.5)
            queue = await ch.declare_queue(q)
            return queue.name, conn.is_closed

    name, closed = run(main())
    assert name == q and closed is False


def test_ipv6(target, names):
    if target.url6 is None:
        pytest.skip(f"{target.name} listens on IPv4 only here")
    q = names("compat-aio-6")

    async def main():
        async with await aio_pika.connect(target.url6) as conn:
            ch = await conn.channel()
            queue = await ch.declare_queue(q)
            await ch.default_exchange.publish(aio_pika.Message(b"over v6"), routing_key=q)
            for _ in range(50):
                message = await queue.get(no_ack=True, fail=False)
                if message:
                    return message.body
                await asyncio.sleep(0.02)

    assert run(main()) == b"over v6"
