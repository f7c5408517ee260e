import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.BlockedListener;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.ConfirmListener;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.Recoverable;
import com.rabbitmq.client.RecoveryListener;
import com.rabbitmq.client.RpcClient;
import com.rabbitmq.client.StringRpcServer;
import com.rabbitmq.client.impl.recovery.AutorecoveringConnection;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * Compatibility driver for the RabbitMQ Java client (Debian's librabbitmq-client-java).
 *
 * Usage: java Compat SUBCOMMAND AMQP_URI
 *
 * Each subcommand drives one client feature against the broker and prints what the client saw as
 * `key=value` lines on stdout; tests/compat/test_java.py asserts on them, so the checks live in one
 * place (the test) and this program only reports. Exit code 0 means the scenario ran to its end; any
 * exception or timeout exits non-zero with the stack trace on stderr.
 */
public final class Compat {
    /** How long any single wait for the broker may take before the scenario is reported as failed. */
    private static final long WAIT_S = 10;
    /** How long the recovery scenario waits for the broker to come back (the test restarts it). */
    private static final long RECOVERY_WAIT_S = 60;

    private Compat() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: java Compat basic|confirms|returns|cancel|blocked|recover|rpc|heartbeat AMQP_URI");
            System.exit(2);
        }
        String uri = args[1];
        switch (args[0]) {
            case "basic": basic(uri); break;
            case "confirms": confirms(uri); break;
            case "returns": returns(uri); break;
            case "cancel": cancel(uri); break;
            case "blocked": blocked(uri); break;
            case "recover": recover(uri); break;
            case "rpc": rpc(uri); break;
            case "heartbeat": heartbeat(uri); break;
            default:
                System.err.println("unknown subcommand " + args[0]);
                System.exit(2);
        }
        // Non-daemon client threads (recovery, heartbeats) must not keep the JVM alive.
        System.exit(0);
    }

    /** One reported observation. */
    private static void out(String key, Object value) {
        System.out.println(key + "=" + value);
        System.out.flush();
    }

    /** A connection without automatic recovery: these scenarios check what the client sees, not retries. */
    private static Connection connect(String uri) throws Exception {
        ConnectionFactory f = new ConnectionFactory();
        f.setUri(uri);
        f.setAutomaticRecoveryEnabled(false);
        f.setConnectionTimeout((int) TimeUnit.SECONDS.toMillis(WAIT_S));
        // -Dcompat.nio=true: the client's NIO transport, which buffers and writes frames differently
        // from the default blocking-socket one.
        if (Boolean.getBoolean("compat.nio")) {
            f.useNio();
        }
        return f.newConnection("mailroom-compat-java");
    }

    private static String unique(String what) {
        return "compat.java." + what + "." + System.nanoTime();
    }

    private static String str(byte[] body) {
        return new String(body, StandardCharsets.UTF_8);
    }

    private static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    /** A delivery as a consumer saw it. */
    private static final class Delivery {
        final String consumerTag;
        final Envelope envelope;
        final AMQP.BasicProperties props;
        final byte[] body;

        Delivery(String consumerTag, Envelope envelope, AMQP.BasicProperties props, byte[] body) {
            this.consumerTag = consumerTag;
            this.envelope = envelope;
            this.props = props;
            this.body = body;
        }
    }

    /** A consumer that queues its deliveries and records cancel notifications. */
    private static final class Collector extends DefaultConsumer {
        final BlockingQueue<Delivery> deliveries = new LinkedBlockingQueue<>();
        final BlockingQueue<String> cancels = new LinkedBlockingQueue<>();
        final BlockingQueue<String> cancelOks = new LinkedBlockingQueue<>();

        Collector(Channel ch) {
            super(ch);
        }

        @Override
        public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) {
            deliveries.add(new Delivery(tag, env, props, body));
        }

        @Override
        public void handleCancel(String tag) {
            cancels.add(tag);
        }

        @Override
        public void handleCancelOk(String tag) {
            cancelOks.add(tag);
        }

        Delivery next() throws InterruptedException {
            Delivery d = deliveries.poll(WAIT_S, TimeUnit.SECONDS);
            if (d == null) {
                throw new IllegalStateException("no delivery within " + WAIT_S + " s");
            }
            return d;
        }
    }

    /** Publish, consume with manual ack and prefetch, nack/requeue, basic.get, passive declare. */
    private static void basic(String uri) throws Exception {
        try (Connection conn = connect(uri)) {
            out("server_product", conn.getServerProperties().get("product"));
            Channel ch = conn.createChannel();
            String q = unique("basic");
            AMQP.Queue.DeclareOk ok = ch.queueDeclare(q, false, false, false, null);
            out("declare_queue", ok.getQueue().equals(q));
            for (int i = 0; i < 5; i++) {
                Map<String, Object> headers = new HashMap<>();
                headers.put("i", i);
                headers.put("s", "v" + i);
                AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                        .contentType("text/plain").correlationId("c" + i).messageId("m" + i)
                        .deliveryMode(2).headers(headers).build();
                ch.basicPublish("", q, props, bytes("b" + i));
            }
            ch.basicQos(2);
            Collector c = new Collector(ch);
            String tag = ch.basicConsume(q, false, c);
            // With prefetch 2 and nothing acked, exactly two deliveries arrive.
            Thread.sleep(300);
            out("prefetch_window", c.deliveries.size());
            List<String> bodies = new ArrayList<>();
            List<String> tags = new ArrayList<>();
            List<String> meta = new ArrayList<>();
            for (int i = 0; i < 5; i++) {
                Delivery d = c.next();
                bodies.add(str(d.body));
                tags.add(Long.toString(d.envelope.getDeliveryTag()));
                Object hi = d.props.getHeaders() == null ? null : d.props.getHeaders().get("i");
                Object hs = d.props.getHeaders() == null ? null : d.props.getHeaders().get("s");
                meta.add(d.props.getContentType() + "/" + d.props.getCorrelationId() + "/"
                        + d.props.getMessageId() + "/" + d.props.getDeliveryMode() + "/" + hi + "/" + hs
                        + "/" + d.envelope.isRedeliver() + "/" + d.envelope.getExchange() + "/"
                        + d.envelope.getRoutingKey().equals(q) + "/" + d.consumerTag.equals(tag));
                ch.basicAck(d.envelope.getDeliveryTag(), false);
            }
            out("bodies", String.join(",", bodies));
            out("delivery_tags", String.join(",", tags));
            // content-type/correlation/message-id/delivery-mode/header i/header s/redelivered/exchange/rk ok/tag ok
            out("meta", String.join(",", meta));

            ch.basicPublish("", q, null, bytes("requeue-me"));
            Delivery first = c.next();
            ch.basicNack(first.envelope.getDeliveryTag(), false, true);
            Delivery again = c.next();
            out("requeued", str(first.body) + "/" + first.envelope.isRedeliver() + " -> " + str(again.body)
                    + "/" + again.envelope.isRedeliver());
            ch.basicAck(again.envelope.getDeliveryTag(), false);

            ch.basicCancel(tag);
            String cancelOk = c.cancelOks.poll(WAIT_S, TimeUnit.SECONDS);
            out("cancel_ok_tag_matches", tag.equals(cancelOk));

            ch.basicPublish("", q, MessageProperties.PERSISTENT_TEXT_PLAIN, bytes("g1"));
            ch.basicPublish("", q, null, bytes("g2"));
            // basic.get sees the publish only once it is enqueued: poll briefly.
            GetResponse g = null;
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(WAIT_S);
            while (g == null && System.nanoTime() < deadline) {
                g = ch.basicGet(q, false);
            }
            out("get", str(g.getBody()) + "/remaining=" + g.getMessageCount() + "/redelivered="
                    + g.getEnvelope().isRedeliver() + "/content_type=" + g.getProps().getContentType());
            ch.basicAck(g.getEnvelope().getDeliveryTag(), false);
            GetResponse g2 = ch.basicGet(q, true);
            out("get_autoack", str(g2.getBody()) + "/remaining=" + g2.getMessageCount());
            out("get_empty", ch.basicGet(q, true));

            AMQP.Queue.DeclareOk passive = ch.queueDeclarePassive(q);
            out("passive", "messages=" + passive.getMessageCount() + "/consumers=" + passive.getConsumerCount());
            ch.basicPublish("", q, null, bytes("left"));
            Thread.sleep(100);
            out("delete_count", ch.queueDelete(q).getMessageCount());
            ch.close();
        }
    }

    /** A ConfirmListener that expands `multiple` acks/nacks into the set of sequence numbers covered. */
    private static final class ConfirmLog implements ConfirmListener {
        final TreeSet<Long> acked = new TreeSet<>();
        final TreeSet<Long> nacked = new TreeSet<>();
        long highest = 0;
        int multipleAcks = 0;
        int doubleConfirmed = 0;

        private synchronized void record(TreeSet<Long> into, long tag, boolean multiple) {
            if (multiple) {
                multipleAcks++;
            }
            long from = multiple ? highest + 1 : tag;
            for (long t = from; t <= tag; t++) {
                if (acked.contains(t) || nacked.contains(t)) {
                    if (!multiple) {
                        doubleConfirmed++;
                    }
                    continue;
                }
                into.add(t);
            }
            highest = Math.max(highest, tag);
            notifyAll();
        }

        @Override
        public void handleAck(long tag, boolean multiple) {
            record(acked, tag, multiple);
        }

        @Override
        public void handleNack(long tag, boolean multiple) {
            record(nacked, tag, multiple);
        }

        synchronized void awaitAll(long n) throws InterruptedException {
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(WAIT_S);
            while (acked.size() + nacked.size() < n) {
                long left = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime());
                if (left <= 0) {
                    throw new IllegalStateException("confirmed " + (acked.size() + nacked.size()) + " of " + n);
                }
                wait(left);
            }
        }
    }

    private static String join(TreeSet<Long> tags) {
        List<String> s = new ArrayList<>();
        for (long t : tags) {
            s.add(Long.toString(t));
        }
        return String.join(",", s);
    }

    /** waitForConfirms, a ConfirmListener over many publishes (multiple acks), and nacks from reject-publish. */
    private static void confirms(String uri) throws Exception {
        final int many = 500;
        try (Connection conn = connect(uri)) {
            Channel ch = conn.createChannel();
            String q = unique("confirms");
            ch.queueDeclare(q, true, false, false, null);
            ch.confirmSelect();
            out("first_seq", ch.getNextPublishSeqNo());
            for (int i = 0; i < 20; i++) {
                ch.basicPublish("", q, MessageProperties.PERSISTENT_BASIC, bytes("w" + i));
            }
            out("wait_for_confirms", ch.waitForConfirms(TimeUnit.SECONDS.toMillis(WAIT_S)));
            out("next_seq", ch.getNextPublishSeqNo());

            Channel ch2 = conn.createChannel();
            ch2.confirmSelect();
            ConfirmLog log = new ConfirmLog();
            ch2.addConfirmListener(log);
            for (int i = 0; i < many; i++) {
                ch2.basicPublish("", q, MessageProperties.PERSISTENT_BASIC, bytes("l" + i));
            }
            log.awaitAll(many);
            synchronized (log) {
                out("listener_acked", log.acked.size() + "/first=" + log.acked.first() + "/last=" + log.acked.last());
                out("listener_nacked", log.nacked.size());
                out("listener_double_confirmed", log.doubleConfirmed);
                // Informational: RabbitMQ and Mailroom may or may not coalesce acks; not asserted.
                out("listener_multiple_acks", log.multipleAcks);
            }
            out("queue_messages", ch.queueDeclarePassive(q).getMessageCount());
            ch.queueDelete(q);

            // reject-publish overflow: the first publish is acked, later ones are nacked.
            String capped = unique("capped");
            Map<String, Object> args = new HashMap<>();
            args.put("x-max-length", 1);
            args.put("x-overflow", "reject-publish");
            ch.queueDeclare(capped, false, false, false, args);
            Channel ch3 = conn.createChannel();
            ch3.confirmSelect();
            ConfirmLog log3 = new ConfirmLog();
            ch3.addConfirmListener(log3);
            for (int i = 0; i < 3; i++) {
                ch3.basicPublish("", capped, null, bytes("c" + i));
            }
            out("wait_for_confirms_with_nacks", ch3.waitForConfirms(TimeUnit.SECONDS.toMillis(WAIT_S)));
            log3.awaitAll(3);
            synchronized (log3) {
                out("capped_acked", join(log3.acked));
                out("capped_nacked", join(log3.nacked));
            }
            out("capped_channel_open", ch3.isOpen());
            out("capped_messages", ch.queueDeclarePassive(capped).getMessageCount());
            ch.queueDelete(capped);
        }
    }

    /** basic.return through a ReturnListener for a mandatory, unroutable publish, ordered before its confirm. */
    private static void returns(String uri) throws Exception {
        try (Connection conn = connect(uri)) {
            Channel ch = conn.createChannel();
            String x = unique("returns");
            String q = unique("returns.q");
            ch.exchangeDeclare(x, "direct", false, false, null);
            ch.queueDeclare(q, false, false, false, null);
            ch.queueBind(q, x, "routed");
            List<String> events = Collections.synchronizedList(new ArrayList<>());
            List<String> returned = Collections.synchronizedList(new ArrayList<>());
            ch.addReturnListener((code, text, exchange, rk, props, body) -> {
                events.add("return:" + str(body));
                returned.add(code + "/" + text + "/" + exchange.equals(x) + "/" + rk + "/" + str(body) + "/"
                        + props.getMessageId() + "/" + props.getContentType());
            });
            ch.confirmSelect();
            ch.addConfirmListener(new ConfirmListener() {
                @Override
                public void handleAck(long tag, boolean multiple) {
                    events.add("ack:" + tag + (multiple ? "+" : ""));
                }

                @Override
                public void handleNack(long tag, boolean multiple) {
                    events.add("nack:" + tag + (multiple ? "+" : ""));
                }
            });
            AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                    .messageId("lost-1").contentType("application/octet-stream").build();
            ch.basicPublish(x, "nowhere", true, props, bytes("lost"));
            ch.waitForConfirmsOrDie(TimeUnit.SECONDS.toMillis(WAIT_S));
            ch.basicPublish(x, "routed", true, null, bytes("kept"));
            ch.waitForConfirmsOrDie(TimeUnit.SECONDS.toMillis(WAIT_S));
            // Not mandatory and unroutable: silently dropped, still confirmed, never returned.
            ch.basicPublish(x, "nowhere", false, null, bytes("dropped"));
            ch.waitForConfirmsOrDie(TimeUnit.SECONDS.toMillis(WAIT_S));
            Thread.sleep(200); // a late, wrong return would show up here
            out("returned", String.join(";", returned));
            out("events", String.join(",", events));
            GetResponse g = ch.basicGet(q, true);
            out("routed_body", g == null ? null : str(g.getBody()));
            out("channel_open", ch.isOpen());
            ch.queueDelete(q);
            ch.exchangeDelete(x);
        }
    }

    /** Consumer cancel notification: the queue is deleted by another connection, handleCancel runs. */
    private static void cancel(String uri) throws Exception {
        try (Connection conn = connect(uri); Connection other = connect(uri)) {
            out("client_advertises_cancel_notify",
                    ((Map<?, ?>) conn.getClientProperties().get("capabilities")).get("consumer_cancel_notify"));
            Channel ch = conn.createChannel();
            String q = unique("cancel");
            ch.queueDeclare(q, false, false, false, null);
            Collector c = new Collector(ch);
            String tag = ch.basicConsume(q, false, c);
            ch.basicPublish("", q, null, bytes("before-delete"));
            Delivery d = c.next();
            out("delivered", str(d.body));
            Channel och = other.createChannel();
            och.queueDelete(q);
            String cancelled = c.cancels.poll(WAIT_S, TimeUnit.SECONDS);
            out("handle_cancel_tag_matches", tag.equals(cancelled));
            out("handle_cancel_ok_called", !c.cancelOks.isEmpty());
            // The unacked delivery's channel stays usable: a new queue can be declared and consumed.
            out("channel_open", ch.isOpen());
            String q2 = ch.queueDeclare().getQueue();
            out("server_named_prefix", q2.startsWith("amq.gen-"));
            ch.queueDelete(q2);
            ch.close();
        }
    }

    /** connection.blocked / unblocked: publish past the broker's memory watermark, drain, resume. */
    private static void blocked(String uri) throws Exception {
        try (Connection pub = connect(uri); Connection cons = connect(uri)) {
            BlockingQueue<String> events = new LinkedBlockingQueue<>();
            pub.addBlockedListener(new BlockedListener() {
                @Override
                public void handleBlocked(String reason) {
                    events.add("blocked:" + reason);
                }

                @Override
                public void handleUnblocked() {
                    events.add("unblocked");
                }
            });
            Channel ch = pub.createChannel();
            String q = unique("blocked");
            ch.queueDeclare(q, false, false, false, null);
            byte[] big = new byte[100_000];
            for (int i = 0; i < 3; i++) {
                ch.basicPublish("", q, null, big);
            }
            out("first_event", events.poll(WAIT_S, TimeUnit.SECONDS));
            Channel cch = cons.createChannel();
            int drained = 0;
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(WAIT_S);
            while (drained < 3 && System.nanoTime() < deadline) {
                if (cch.basicGet(q, true) != null) {
                    drained++;
                }
            }
            out("drained_by_consumer_connection", drained);
            out("second_event", events.poll(WAIT_S, TimeUnit.SECONDS));
            ch.basicPublish("", q, null, bytes("after"));
            GetResponse g = null;
            deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(WAIT_S);
            while (g == null && System.nanoTime() < deadline) {
                g = cch.basicGet(q, true);
            }
            out("after_unblock", g == null ? null : str(g.getBody()));
            cch.queueDelete(q);
        }
    }

    /**
     * Automatic connection recovery with topology recovery. Declares a durable topic exchange, a durable
     * queue bound to it, and a server-named exclusive queue bound to it, consumes both, then prints READY
     * and waits while the test restarts the broker. After recovery it publishes on its recovered channel
     * and reports what each recovered consumer received.
     */
    private static void recover(String uri) throws Exception {
        ConnectionFactory f = new ConnectionFactory();
        f.setUri(uri);
        f.setAutomaticRecoveryEnabled(true);
        f.setTopologyRecoveryEnabled(true);
        f.setNetworkRecoveryInterval(250);
        f.setConnectionTimeout((int) TimeUnit.SECONDS.toMillis(WAIT_S));
        AutorecoveringConnection conn = (AutorecoveringConnection) f.newConnection("mailroom-compat-java-recover");
        CountDownLatch recovered = new CountDownLatch(1);
        List<String> recoveryEvents = Collections.synchronizedList(new ArrayList<>());
        // What the client saw when the broker went away: a connection.close (its reply code, 320 on a
        // graceful broker shutdown) or a dropped socket ("io").
        conn.addShutdownListener(cause -> recoveryEvents.add("shutdown:" + (cause.getReason() instanceof AMQP.Connection.Close
                ? ((AMQP.Connection.Close) cause.getReason()).getReplyCode() : "io")));
        conn.addRecoveryListener(new RecoveryListener() {
            @Override
            public void handleRecoveryStarted(Recoverable r) {
                recoveryEvents.add("started");
            }

            @Override
            public void handleRecovery(Recoverable r) {
                recoveryEvents.add("recovered");
                recovered.countDown();
            }
        });
        Map<String, String> renamed = Collections.synchronizedMap(new HashMap<>());
        conn.addQueueRecoveryListener((oldName, newName) -> renamed.put(oldName, newName));

        Channel ch = conn.createChannel();
        String x = unique("recover.x");
        String dq = unique("recover.q");
        ch.exchangeDeclare(x, "topic", true, false, null);
        ch.queueDeclare(dq, true, false, false, null);
        ch.queueBind(dq, x, "rk.#");
        String sq = ch.queueDeclare().getQueue();
        ch.queueBind(sq, x, "rk.*");
        Collector durable = new Collector(ch);
        Collector serverNamed = new Collector(ch);
        String durableTag = ch.basicConsume(dq, false, durable);
        String serverNamedTag = ch.basicConsume(sq, false, serverNamed);
        ch.confirmSelect();
        ch.basicPublish(x, "rk.before", MessageProperties.PERSISTENT_BASIC, bytes("before"));
        ch.waitForConfirmsOrDie(TimeUnit.SECONDS.toMillis(WAIT_S));
        Delivery d1 = durable.next();
        Delivery s1 = serverNamed.next();
        ch.basicAck(d1.envelope.getDeliveryTag(), false);
        ch.basicAck(s1.envelope.getDeliveryTag(), false);
        out("before", str(d1.body) + "," + str(s1.body));
        // A persistent message the durable consumer still holds unacked when the broker goes away: it must
        // come back, redelivered, to the recovered consumer.
        ch.basicPublish(x, "rk.inflight", MessageProperties.PERSISTENT_BASIC, bytes("inflight"));
        ch.waitForConfirmsOrDie(TimeUnit.SECONDS.toMillis(WAIT_S));
        Delivery d0 = durable.next();
        Delivery s0 = serverNamed.next();
        ch.basicAck(s0.envelope.getDeliveryTag(), false);
        out("inflight_unacked", str(d0.body) + "/redelivered=" + d0.envelope.isRedeliver());
        // A synchronous round trip: the broker handles a channel's frames in order, so the acks above
        // have been processed before the test is told to restart it.
        ch.queueDeclarePassive(dq);
        out("READY", "");

        if (!recovered.await(RECOVERY_WAIT_S, TimeUnit.SECONDS)) {
            throw new IllegalStateException("no recovery within " + RECOVERY_WAIT_S + " s: " + recoveryEvents);
        }
        out("recovery_events", String.join(",", recoveryEvents));
        out("connection_open", conn.isOpen());
        out("channel_open", ch.isOpen());
        String newSq = renamed.getOrDefault(sq, sq);
        out("server_named_queue_renamed", !newSq.equals(sq));
        out("server_named_queue_new_prefix", newSq.startsWith("amq.gen-"));
        // Confirms restart from 1 on the recovered channel's new server-side channel; the client re-enables
        // confirm mode itself.
        ch.basicPublish(x, "rk.after", MessageProperties.PERSISTENT_BASIC, bytes("after"));
        out("after_confirmed", ch.waitForConfirms(TimeUnit.SECONDS.toMillis(WAIT_S)));
        Delivery back = durable.next();
        out("inflight_after_recovery", str(back.body) + "/redelivered=" + back.envelope.isRedeliver());
        ch.basicAck(back.envelope.getDeliveryTag(), false);
        Delivery d2 = durable.next();
        Delivery s2 = serverNamed.next();
        out("after", str(d2.body) + "," + str(s2.body));
        out("after_consumer_tags_kept", d2.consumerTag.equals(durableTag) + "," + s2.consumerTag.equals(serverNamedTag));
        out("after_redelivered", d2.envelope.isRedeliver() + "," + s2.envelope.isRedeliver());
        ch.basicAck(d2.envelope.getDeliveryTag(), false);
        ch.basicAck(s2.envelope.getDeliveryTag(), false);
        // "before" was acked before the restart and "inflight" after it: neither may come back.
        Delivery extra = durable.deliveries.poll(300, TimeUnit.MILLISECONDS);
        out("durable_extra_delivery", extra == null ? null : str(extra.body));
        AMQP.Queue.DeclareOk passive = ch.queueDeclarePassive(dq);
        out("durable_queue", "messages=" + passive.getMessageCount() + "/consumers=" + passive.getConsumerCount());
        ch.queueDelete(dq);
        ch.exchangeDelete(x);
        conn.close();
        out("closed", true);
    }

    /**
     * The client's RpcClient/StringRpcServer pair: RpcClient 5.x uses direct reply-to
     * (amq.rabbitmq.reply-to) by default, so this checks the broker's pseudo-queue end to end.
     */
    private static void rpc(String uri) throws Exception {
        try (Connection conn = connect(uri)) {
            Channel sch = conn.createChannel();
            String q = unique("rpc");
            sch.queueDeclare(q, false, false, true, null);
            List<String> replyTos = Collections.synchronizedList(new ArrayList<>());
            StringRpcServer server = new StringRpcServer(sch, q) {
                @Override
                public byte[] handleCall(AMQP.BasicProperties request, byte[] body, AMQP.BasicProperties reply) {
                    // The request's properties (the 2-argument form only sees the reply's).
                    replyTos.add(request.getReplyTo());
                    return super.handleCall(request, body, reply);
                }

                @Override
                public String handleStringCall(String request) {
                    return "pong:" + request;
                }
            };
            Thread loop = new Thread(() -> {
                try {
                    server.mainloop();
                } catch (Exception e) {
                    // mainloop ends with an exception when the server is terminated: expected at the end.
                }
            });
            loop.setDaemon(true);
            loop.start();
            Channel cch = conn.createChannel();
            RpcClient client = new RpcClient(cch, "", q, (int) TimeUnit.SECONDS.toMillis(WAIT_S));
            List<String> replies = new ArrayList<>();
            for (int i = 0; i < 3; i++) {
                replies.add(client.stringCall("ping" + i));
            }
            out("replies", String.join(",", replies));
            out("reply_to_prefix", replyTos.stream().allMatch(r -> r.startsWith("amq.rabbitmq.reply-to.")));
            out("calls_seen_by_server", replyTos.size());
            client.close();
            server.terminateMainloop();
            loop.join(TimeUnit.SECONDS.toMillis(WAIT_S));
            out("channels_open", sch.isOpen() + "," + cch.isOpen());
        }
    }

    /**
     * Heartbeats: asks for a 1 s heartbeat and stays idle for 4 s. The Java client closes a connection
     * on which it hears nothing for two heartbeat intervals, so it stays open only if the broker sends
     * heartbeats on an idle connection.
     */
    private static void heartbeat(String uri) throws Exception {
        ConnectionFactory f = new ConnectionFactory();
        f.setUri(uri);
        f.setAutomaticRecoveryEnabled(false);
        f.setRequestedHeartbeat(1);
        try (Connection conn = f.newConnection("mailroom-compat-java-heartbeat")) {
            out("negotiated_heartbeat", conn.getHeartbeat());
            Channel ch = conn.createChannel();
            Thread.sleep(4000);
            out("open_after_idle", conn.isOpen());
            String q = ch.queueDeclare().getQueue();
            ch.basicPublish("", q, null, bytes("still-here"));
            GetResponse g = null;
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(WAIT_S);
            while (g == null && System.nanoTime() < deadline) {
                g = ch.basicGet(q, true);
            }
            out("get_after_idle", g == null ? null : str(g.getBody()));
        }
    }
}
