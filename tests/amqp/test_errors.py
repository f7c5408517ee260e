"""Error handling and recovery: channel errors stay on their channel, connection errors and
malformed frames close the connection with the right code."""
import struct

import pika
import pika.spec as spec
import pytest

from helpers import (CHANNEL_ERROR, FRAME_ERROR, NOT_FOUND, PRECONDITION_FAILED, UNEXPECTED_FRAME,
                     RawConn, expect_channel_error, get, uname)


def test_connection_usable_after_channel_error(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.queue_declare(uname("missing"), passive=True)
    ch2 = amqp.channel()
    q = amqp.queue(ch=ch2)
    ch2.basic_publish("", q, b"m")
    assert get(ch2, q)[2] == b"m"


def test_channel_number_reused_after_error(amqp):
    n = amqp.ch.channel_number
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.queue_declare(uname("missing"), passive=True)
    ch = amqp.conn.channel(channel_number=n)
    q = amqp.queue(ch=ch)
    ch.basic_publish("", q, b"m")
    assert get(ch, q)[2] == b"m"


def test_channel_error_does_not_affect_other_channels_consumers(amqp):
    q = amqp.queue()
    got = []
    ch_c = amqp.channel()
    ch_c.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    bad = amqp.channel()
    with expect_channel_error(bad, NOT_FOUND):
        bad.basic_publish(uname("missing"), "", b"x")
    amqp.ch.basic_publish("", q, b"still-here")
    while not got:
        amqp.conn.process_data_events(time_limit=0.1)
    assert got == [b"still-here"]


def test_channel_error_requeues_its_unacked(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    ch = amqp.channel()
    get(ch, q, auto_ack=False)
    with expect_channel_error(ch, PRECONDITION_FAILED):
        ch.basic_ack(999)
    m, _, b = get(amqp.ch, q)
    assert b == b"m" and m.redelivered


def _raw(broker, **kw):
    rc = RawConn(broker).handshake(**kw)
    rc.open_channel(1)
    return rc


def test_raw_pipelined_methods_after_channel_error_are_ignored(broker):
    """Methods that arrive after the server sent channel.close (before close-ok) are discarded."""
    q = uname("raw")
    with _raw(broker) as rc:
        rc.send_method(1, spec.Queue.Declare(queue=uname("missing"), passive=True))
        # pipelined before we have seen channel.close:
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.send_method(1, spec.Basic.Publish(exchange="", routing_key=q))
        rc.send_content(1, b"dropped")
        rc.send_method(1, spec.Basic.Ack(delivery_tag=42))
        rc.send_method(1, spec.Basic.Get(queue=q))
        f = rc.read_method()
        assert isinstance(f.method, spec.Channel.Close), f.method
        assert f.method.reply_code == NOT_FOUND
        assert (f.method.class_id, f.method.method_id) == (50, 10)
        rc.send_method(1, spec.Channel.CloseOk())
        # the channel number is usable again and the connection is fine
        rc.open_channel(1)
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        ok = rc.expect(spec.Queue.DeclareOk).method
        assert ok.message_count == 0  # the pipelined publish was dropped


def test_raw_channel_close_carries_failing_method(broker):
    with _raw(broker) as rc:
        rc.send_method(1, spec.Exchange.Declare(exchange=uname("missing"), passive=True))
        f = rc.expect(spec.Channel.Close)
        assert f.method.reply_code == NOT_FOUND
        assert (f.method.class_id, f.method.method_id) == (40, 10)
        assert f.method.reply_text.startswith("NOT_FOUND")


def test_raw_client_channel_close(broker):
    with _raw(broker) as rc:
        rc.send_method(1, spec.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        rc.expect(spec.Channel.CloseOk)
        rc.open_channel(1)


def test_raw_client_connection_close(broker):
    with _raw(broker) as rc:
        rc.send_method(0, spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        rc.expect(spec.Connection.CloseOk)
        # the client closes the socket after close-ok (RabbitMQ waits for it to)


def test_raw_method_on_unopened_channel_504(broker):
    with _raw(broker) as rc:
        rc.send_method(7, spec.Queue.Declare(queue="", exclusive=True))
        rc.expect_connection_close(CHANNEL_ERROR)


def test_raw_second_channel_open_504(broker):
    with _raw(broker) as rc:
        rc.send_method(1, spec.Channel.Open())
        rc.expect_connection_close(CHANNEL_ERROR)


def test_raw_frame_larger_than_frame_max_501(broker):
    with _raw(broker, frame_max=4096) as rc:
        rc.send_method(1, spec.Basic.Publish(exchange="", routing_key=uname("q")))
        rc.send(pika.frame.Header(1, 10000, pika.BasicProperties()).marshal())
        rc.send(pika.frame.Body(1, b"x" * 10000).marshal())
        rc.expect_connection_close(FRAME_ERROR)


def test_raw_bad_frame_end_501(broker):
    with _raw(broker) as rc:
        frame = bytearray(pika.frame.Method(1, spec.Basic.Qos(prefetch_count=1)).marshal())
        frame[-1] = 0x00
        rc.send(bytes(frame))
        rc.expect_connection_close(FRAME_ERROR)


def test_raw_unknown_frame_type_501(broker):
    with _raw(broker) as rc:
        rc.send(struct.pack(">BHI", 9, 1, 4) + b"abcd" + b"\xce")
        rc.expect_connection_close(FRAME_ERROR)


def test_raw_method_instead_of_content_header_505(broker):
    with _raw(broker) as rc:
        rc.send_method(1, spec.Basic.Publish(exchange="", routing_key=uname("q")))
        rc.send_method(1, spec.Basic.Qos(prefetch_count=1))
        rc.expect_connection_close(UNEXPECTED_FRAME)


def test_raw_method_instead_of_body_505(broker):
    with _raw(broker) as rc:
        rc.send_method(1, spec.Basic.Publish(exchange="", routing_key=uname("q")))
        rc.send(pika.frame.Header(1, 10, pika.BasicProperties()).marshal())
        rc.send_method(1, spec.Basic.Qos(prefetch_count=1))
        rc.expect_connection_close(UNEXPECTED_FRAME)


def test_raw_body_without_publish_505(broker):
    with _raw(broker) as rc:
        rc.send(pika.frame.Body(1, b"stray").marshal())
        rc.expect_connection_close(UNEXPECTED_FRAME)


def test_raw_header_without_publish_505(broker):
    with _raw(broker) as rc:
        rc.send(pika.frame.Header(1, 5, pika.BasicProperties()).marshal())
        rc.expect_connection_close(UNEXPECTED_FRAME)


def test_raw_heartbeat_on_nonzero_channel_505(broker):
    with _raw(broker) as rc:
        rc.send(struct.pack(">BHI", 8, 1, 0) + b"\xce")
        rc.expect_connection_close(UNEXPECTED_FRAME)


def test_raw_method_frame_on_channel_zero_wrong_class(broker):
    """A channel-class method on channel 0 is a connection error."""
    with _raw(broker) as rc:
        rc.send_method(0, spec.Queue.Declare(queue="", exclusive=True))
        close = rc.expect_connection_close(CHANNEL_ERROR)
        assert close.reply_code == CHANNEL_ERROR
