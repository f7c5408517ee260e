// The Go client (amqp091-go) in the habits of ordinary Go services. One scenario per run; each prints JSON
// lines describing what the client saw. Usage: compat-go <scenario> <url> <name>
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func out(v map[string]interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func fail(err error) {
	out(map[string]interface{}{"event": "failed", "error": err.Error()})
	os.Exit(1)
}

func must(err error) {
	if err != nil {
		fail(err)
	}
}

func errText(err error) interface{} {
	if err == nil {
		return nil
	}
	return err.Error()
}

func amqpCode(err *amqp.Error) interface{} {
	if err == nil {
		return nil
	}
	return err.Code
}

// crossing: publish to a missing exchange on channel 1 and at once close channel 1, so the broker's
// channel.close (404) and ours cross; then declare an exchange on channel 2. Repeated to hit the race.
func crossing(url, name string, rounds int) {
	conn, err := amqp.Dial(url)
	must(err)
	defer conn.Close()
	declareErrors := 0
	for i := 0; i < rounds; i++ {
		ch1, err := conn.Channel()
		must(err)
		ch2, err := conn.Channel()
		must(err)
		closes := ch1.NotifyClose(make(chan *amqp.Error, 1))
		_ = ch1.Publish(name+"-missing", "k", false, false, amqp.Publishing{Body: []byte("x")})
		closeErr := ch1.Close()
		declErr := ch2.ExchangeDeclare(name, "fanout", false, true, false, false, nil)
		if declErr != nil {
			declareErrors++
		}
		var notified interface{}
		select {
		case e := <-closes:
			notified = amqpCode(e)
		case <-time.After(2 * time.Second):
			notified = "timeout"
		}
		out(map[string]interface{}{"event": "round", "round": i, "close_error": errText(closeErr),
			"declare_error": errText(declErr), "ch1_notified": notified, "conn_closed": conn.IsClosed()})
		if declErr != nil {
			break
		}
		_ = ch2.ExchangeDelete(name, false, false)
		_ = ch2.Close()
	}
	out(map[string]interface{}{"event": "done", "declare_errors": declareErrors, "conn_closed": conn.IsClosed()})
}

// closeMany: many goroutines call Connection.Close at once; each must get nil or ErrClosed.
func closeMany(url string, rounds, callers int) {
	results := map[string]int{}
	var mu sync.Mutex
	for i := 0; i < rounds; i++ {
		conn, err := amqp.Dial(url)
		must(err)
		ch, err := conn.Channel()
		must(err)
		_, err = ch.QueueDeclare("", false, true, true, false, nil)
		must(err)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for j := 0; j < callers; j++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				err := conn.Close()
				key := "nil"
				if errors.Is(err, amqp.ErrClosed) {
					key = "ErrClosed"
				} else if err != nil {
					key = err.Error()
				}
				mu.Lock()
				results[key]++
				mu.Unlock()
			}()
		}
		close(start)
		wg.Wait()
	}
	out(map[string]interface{}{"event": "close-many", "results": results})
}

// confirms: NotifyPublish over a burst (the broker may ack with `multiple`), NotifyReturn for a mandatory
// unroutable publish (returned before its ack, and still acked).
func confirms(url, name string, n int) {
	conn, err := amqp.Dial(url)
	must(err)
	defer conn.Close()
	ch, err := conn.Channel()
	must(err)
	_, err = ch.QueueDeclare(name, false, false, false, false, nil)
	must(err)
	must(ch.Confirm(false))
	acks := ch.NotifyPublish(make(chan amqp.Confirmation, n+1))
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	for i := 0; i < n; i++ {
		must(ch.Publish("", name, false, false, amqp.Publishing{Body: []byte(fmt.Sprint(i))}))
	}
	acked, inOrder := 0, true
	for i := 0; i < n; i++ {
		select {
		case c := <-acks:
			if c.Ack {
				acked++
			}
			if c.DeliveryTag != uint64(i+1) {
				inOrder = false
			}
		case <-time.After(10 * time.Second):
			fail(fmt.Errorf("only %d of %d confirms", i, n))
		}
	}
	out(map[string]interface{}{"event": "confirmed", "acked": acked, "in_order": inOrder})
	must(ch.Publish("", name+"-nowhere", true, false, amqp.Publishing{Body: []byte("back")}))
	// The client delivers both in wire order, each on its own channel: note which arrived first.
	var ret amqp.Return
	var last amqp.Confirmation
	order := []string{}
	for len(order) < 2 {
		select {
		case ret = <-returns:
			order = append(order, "return")
		case last = <-acks:
			order = append(order, "ack")
		case <-time.After(5 * time.Second):
			fail(fmt.Errorf("only %v of the return and the confirm", order))
		}
	}
	returnedFirst := order[0] == "return"
	q, err := ch.QueueDeclarePassive(name, false, false, false, false, nil)
	must(err)
	out(map[string]interface{}{"event": "returned", "reply_code": ret.ReplyCode, "reply_text": ret.ReplyText,
		"body": string(ret.Body), "returned_before_ack": returnedFirst, "ack": last.Ack,
		"tag": last.DeliveryTag, "queued": q.Messages})
}

// cancel: a consumer whose queue is deleted gets basic.cancel (NotifyCancel) and its delivery channel closes.
func cancel(url, name string) {
	conn, err := amqp.Dial(url)
	must(err)
	defer conn.Close()
	ch, err := conn.Channel()
	must(err)
	_, err = ch.QueueDeclare(name, false, false, false, false, nil)
	must(err)
	cancels := ch.NotifyCancel(make(chan string, 1))
	deliveries, err := ch.Consume(name, "compat-ctag", false, false, false, false, nil)
	must(err)
	other, err := conn.Channel()
	must(err)
	_, err = other.QueueDelete(name, false, false, false)
	must(err)
	var tag string
	select {
	case tag = <-cancels:
	case <-time.After(5 * time.Second):
		fail(errors.New("no basic.cancel"))
	}
	closed := false
	select {
	case _, ok := <-deliveries:
		closed = !ok
	case <-time.After(5 * time.Second):
	}
	_, err = ch.QueueDeclare("", false, true, true, false, nil)
	out(map[string]interface{}{"event": "cancelled", "tag": tag, "deliveries_closed": closed, "channel_usable": err == nil})
}

// channelError: a 404 closes the channel (NotifyClose gets it), not the connection.
func channelError(url, name string) {
	conn, err := amqp.Dial(url)
	must(err)
	connCloses := conn.NotifyClose(make(chan *amqp.Error, 1))
	ch, err := conn.Channel()
	must(err)
	closes := ch.NotifyClose(make(chan *amqp.Error, 1))
	_, declErr := ch.QueueDeclarePassive(name, false, false, false, false, nil)
	var notified *amqp.Error
	select {
	case notified = <-closes:
	case <-time.After(5 * time.Second):
	}
	other, err := conn.Channel()
	must(err)
	_, err = other.QueueDeclare(name, false, false, false, false, nil)
	otherOK := err == nil
	_, _ = other.QueueDelete(name, false, false, false)
	must(conn.Close())
	// A clean close: the connection's NotifyClose channel is closed without an error.
	var connErr *amqp.Error
	gotErr := false
	select {
	case e, ok := <-connCloses:
		connErr, gotErr = e, ok
	case <-time.After(5 * time.Second):
		gotErr = true
	}
	out(map[string]interface{}{"event": "channel-error", "declare_error": errText(declErr),
		"notified_code": amqpCode(notified), "other_channel_ok": otherOK,
		"conn_close_error": gotErr && connErr != nil})
}

// heartbeat: heartbeats at 1 s keep an idle connection alive.
func heartbeat(url, name string) {
	conn, err := amqp.DialConfig(url, amqp.Config{Heartbeat: time.Second})
	must(err)
	closes := conn.NotifyClose(make(chan *amqp.Error, 1))
	ch, err := conn.Channel()
	must(err)
	time.Sleep(3500 * time.Millisecond)
	var early interface{}
	select {
	case e := <-closes:
		early = errText(e)
	default:
	}
	_, err = ch.QueueDeclare(name, false, true, false, false, nil)
	out(map[string]interface{}{"event": "heartbeat", "alive": err == nil, "closed_early": early})
	must(conn.Close())
}

// blocked: NotifyBlocked reports connection.blocked once publishing trips the broker's memory alarm, and
// connection.unblocked after another connection purged the queue; publishing then goes on.
func blocked(url, name string) {
	conn, err := amqp.Dial(url)
	must(err)
	defer conn.Close()
	blocks := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	ch, err := conn.Channel()
	must(err)
	_, err = ch.QueueDeclare(name, false, false, false, false, nil)
	must(err)
	body := make([]byte, 1024)
	for i := 0; i < 64; i++ {
		must(ch.Publish("", name, false, false, amqp.Publishing{Body: body}))
	}
	seen := []string{}
	wait := func() {
		select {
		case b := <-blocks:
			if b.Active {
				seen = append(seen, "blocked: "+b.Reason)
			} else {
				seen = append(seen, "unblocked")
			}
		case <-time.After(10 * time.Second):
			seen = append(seen, "timeout")
		}
	}
	wait()
	admin, err := amqp.Dial(url)
	must(err)
	defer admin.Close()
	ach, err := admin.Channel()
	must(err)
	purged, err := ach.QueuePurge(name, false)
	must(err)
	wait()
	_, err = ach.QueueDelete(name, false, false, false)
	must(err)
	out(map[string]interface{}{"event": "blocked", "seen": seen, "purged": purged})
}

// concurrent: goroutines publish on their own channels at once, each message larger than frame_max, so
// content frames of different channels interleave on the wire; every body must come back intact.
func concurrent(url, name string, publishers, perPublisher int) {
	conn, err := amqp.Dial(url)
	must(err)
	defer conn.Close()
	setup, err := conn.Channel()
	must(err)
	_, err = setup.QueueDeclare(name, false, false, false, false, nil)
	must(err)
	var wg sync.WaitGroup
	errs := make(chan error, publishers)
	for g := 0; g < publishers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			ch, err := conn.Channel()
			if err == nil {
				err = ch.Confirm(false)
			}
			if err != nil {
				errs <- err
				return
			}
			acks := ch.NotifyPublish(make(chan amqp.Confirmation, perPublisher))
			for i := 0; i < perPublisher; i++ {
				body := make([]byte, 140000+i)
				for j := range body {
					body[j] = byte('a' + g)
				}
				if err := ch.Publish("", name, false, false, amqp.Publishing{Body: body}); err != nil {
					errs <- err
					return
				}
			}
			for i := 0; i < perPublisher; i++ {
				if c := <-acks; !c.Ack {
					errs <- fmt.Errorf("publisher %d: nack %d", g, c.DeliveryTag)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail(err)
	}
	perByte := map[string]int{}
	intact := true
	for n := 0; n < publishers*perPublisher; n++ {
		m, ok, err := setup.Get(name, true)
		must(err)
		if !ok {
			break
		}
		first := m.Body[0]
		for _, b := range m.Body {
			if b != first {
				intact = false
			}
		}
		if len(m.Body) < 140000 || len(m.Body) >= 140000+perPublisher {
			intact = false
		}
		perByte[string(first)]++
	}
	out(map[string]interface{}{"event": "concurrent", "per_publisher": perByte, "intact": intact})
}

// ipv6: round-trip one message.
func ipv6(url, name string) {
	conn, err := amqp.Dial(url)
	must(err)
	defer conn.Close()
	ch, err := conn.Channel()
	must(err)
	_, err = ch.QueueDeclare(name, false, true, false, false, nil)
	must(err)
	must(ch.Publish("", name, false, false, amqp.Publishing{Body: []byte("over v6")}))
	var body string
	for i := 0; i < 50 && body == ""; i++ {
		m, ok, err := ch.Get(name, true)
		must(err)
		if ok {
			body = string(m.Body)
		} else {
			time.Sleep(20 * time.Millisecond)
		}
	}
	out(map[string]interface{}{"event": "ipv6", "body": body})
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: compat-go <scenario> <url> [name]")
		os.Exit(2)
	}
	scenario, url, name := os.Args[1], os.Args[2], ""
	if len(os.Args) > 3 {
		name = os.Args[3]
	}
	switch scenario {
	case "crossing":
		crossing(url, name, 20)
	case "close-many":
		closeMany(url, 20, 16)
	case "confirms":
		confirms(url, name, 2000)
	case "cancel":
		cancel(url, name)
	case "channel-error":
		channelError(url, name)
	case "heartbeat":
		heartbeat(url, name)
	case "ipv6":
		ipv6(url, name)
	case "blocked":
		blocked(url, name)
	case "concurrent":
		concurrent(url, name, 6, 20)
	default:
		fmt.Fprintln(os.Stderr, "unknown scenario", scenario)
		os.Exit(2)
	}
}
