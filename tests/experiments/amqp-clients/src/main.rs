//! What an AMQP client costs per message doing the daemon's broker work
//! and nothing else: lapin (Scramjet's client) against amqprs (a client
//! whose connections are tasks on the caller's tokio runtime, where lapin
//! runs an I/O thread per connection).
//!
//! For each client, in alternating rounds: preload a queue with 1 KB
//! persistent messages, then relay them as `scramjet bench`'s ceiling does
//! — consume with a prefetch of 256, take up to 128 at once, publish each
//! with confirms to an exchange bound to a second queue, await the batch's
//! confirms, ack the batch with one `basic.ack(multiple)` — on two
//! connections (one consumes, one publishes, as the daemon). This process
//! does nothing else meanwhile, so its CPU time and context switches
//! (getrusage) over the relay are the client's; the broker's (`beam.smp`)
//! are read from `/proc` beside them.
//!
//! `cargo run --release -- [rounds] [messages]`; `WORKERS=N` runs the relay
//! on a multi-thread runtime of N workers instead of one current thread.
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672`, the default
//! vhost; amqprs does not decode `%2f`).

use std::time::Instant;

use futures_util::{FutureExt, StreamExt};

const SIZE: usize = 1024;
const PREFETCH: u16 = 256;
const BATCH: usize = 128;

/// CPU time (µs) and context switches of this process, its threads
/// that have exited included.
fn usage() -> (f64, i64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    (
        us(ru.ru_utime) + us(ru.ru_stime),
        ru.ru_nvcsw + ru.ru_nivcsw,
    )
}

/// utime + stime of a `stat` file, in clock ticks (USER_HZ, 100).
fn ticks_of(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// CPU ticks of the local RabbitMQ node.
fn broker_ticks() -> u64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "beam.smp")
        })
        .map(|p| ticks_of(&format!("/proc/{p}/stat")))
        .sum()
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

struct Names {
    input: String,
    output: String,
    sink: String,
}

impl Names {
    fn new(tag: &str) -> Names {
        let p = format!("bench-clients-{}-{tag}", std::process::id());
        Names {
            input: format!("{p}.in"),
            output: format!("{p}.out"),
            sink: format!("{p}.sink"),
        }
    }
}

async fn lapin_connect() -> lapin::Connection {
    lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect with lapin")
}

/// Declares the queues and the exchange, and fills the input queue.
async fn prepare(ch: &lapin::Channel, n: &Names, messages: usize) {
    use lapin::options::*;
    use lapin::types::FieldTable;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in [&n.input, &n.sink] {
        ch.queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
    }
    ch.exchange_declare(
        n.output.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        n.sink.as_str().into(),
        n.output.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let body = vec![b'x'; SIZE];
    for _ in 0..messages.div_ceil(500) {
        let sent = futures_util::future::try_join_all((0..500).map(|_| {
            ch.basic_publish(
                "".into(),
                n.input.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
        }))
        .await
        .unwrap();
        futures_util::future::try_join_all(sent).await.unwrap();
    }
}

async fn remove(ch: &lapin::Channel, n: &Names) {
    use lapin::options::*;
    for q in [&n.input, &n.sink] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    ch.exchange_delete(n.output.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

/// The relay with lapin; returns when every message is acked.
async fn relay_lapin(n: &Names, messages: usize, start: Instant) -> (f64, (f64, i64)) {
    use lapin::options::*;
    let (consuming, publishing) = (lapin_connect().await, lapin_connect().await);
    let consumer = consuming.create_channel().await.unwrap();
    let publisher = publishing.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    consumer
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let before = (start.elapsed().as_secs_f64(), usage());
    let mut stream = consumer
        .basic_consume(
            n.input.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut done = 0;
    while done < messages {
        let mut batch = vec![stream.next().await.unwrap().unwrap()];
        while batch.len() < BATCH {
            match stream.next().now_or_never() {
                Some(Some(d)) => batch.push(d.unwrap()),
                _ => break,
            }
        }
        let confirms = futures_util::future::try_join_all(batch.iter().map(|d| {
            publisher.basic_publish(
                n.output.as_str().into(),
                "x".into(),
                BasicPublishOptions::default(),
                &d.data,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
        }))
        .await
        .unwrap();
        for c in futures_util::future::try_join_all(confirms).await.unwrap() {
            assert!(c.is_ack(), "nacked");
        }
        batch
            .last()
            .unwrap()
            .acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .unwrap();
        done += batch.len();
    }
    let _ = consuming.close(200, "done".into()).await;
    let _ = publishing.close(200, "done".into()).await;
    before
}

/// amqprs reports confirms to a callback: the highest tag confirmed.
struct Confirms(tokio::sync::watch::Sender<u64>);

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for Confirms {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &amqprs::channel::Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        // With or without `multiple`, every tag up to this one is confirmed
        // (one channel, tags in order).
        let tag = ack.delivery_tag();
        self.0
            .send_if_modified(|v| (tag > *v).then(|| *v = tag).is_some());
    }
    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, _: amqprs::Nack) {
        panic!("nacked")
    }
    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

/// The relay with amqprs; returns when every message is acked.
async fn relay_amqprs(n: &Names, messages: usize, start: Instant) -> (f64, (f64, i64)) {
    use amqprs::{channel::*, connection::*};
    let parsed = url();
    let args = OpenConnectionArguments::try_from(parsed.as_str()).expect("AMQP_URL");
    let (consuming, publishing) = (
        Connection::open(&args).await.unwrap(),
        Connection::open(&args).await.unwrap(),
    );
    let consumer = consuming.open_channel(None).await.unwrap();
    let publisher = publishing.open_channel(None).await.unwrap();
    let (tx, mut confirmed) = tokio::sync::watch::channel(0u64);
    publisher.register_callback(Confirms(tx)).await.unwrap();
    publisher
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    consumer
        .basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await
        .unwrap();
    let before = (start.elapsed().as_secs_f64(), usage());
    let (_tag, mut rx) = consumer
        .basic_consume_rx(BasicConsumeArguments::new(&n.input, ""))
        .await
        .unwrap();
    let mut props = amqprs::BasicProperties::default();
    props.with_delivery_mode(2);
    let (mut done, mut published) = (0, 0u64);
    while done < messages {
        let mut batch = vec![rx.recv().await.unwrap()];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut last = 0;
        for m in &mut batch {
            last = m.deliver.as_ref().unwrap().delivery_tag();
            publisher
                .basic_publish(
                    props.clone(),
                    m.content.take().unwrap(),
                    BasicPublishArguments::new(&n.output, "x"),
                )
                .await
                .unwrap();
            published += 1;
        }
        confirmed.wait_for(|v| *v >= published).await.unwrap();
        consumer
            .basic_ack(BasicAckArguments::new(last, true))
            .await
            .unwrap();
        done += batch.len();
    }
    let _ = consuming.close().await;
    let _ = publishing.close().await;
    before
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let workers: Option<usize> = std::env::var("WORKERS").ok().and_then(|w| w.parse().ok());
    let setup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = setup.block_on(lapin_connect());
    let ch = setup.block_on(conn.create_channel()).unwrap();
    setup
        .block_on(ch.confirm_select(Default::default()))
        .unwrap();
    println!(
        "{messages} messages of {SIZE} B per round, prefetch {PREFETCH}, batches of up to {BATCH}, relay on {}",
        match workers {
            Some(w) => format!("a multi-thread runtime of {w} workers"),
            None => "one current-thread runtime".into(),
        }
    );
    for round in 0..rounds {
        for client in ["lapin", "amqprs"] {
            let names = Names::new(&format!("{client}-{round}"));
            setup.block_on(prepare(&ch, &names, messages));
            let names = std::sync::Arc::new(names);
            let relay = std::thread::spawn({
                let names = names.clone();
                move || {
                    let runtime = match workers {
                        Some(w) => tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(w)
                            .enable_all()
                            .build(),
                        None => tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build(),
                    }
                    .unwrap();
                    let start = Instant::now();
                    let before = runtime.block_on(async {
                        if client == "lapin" {
                            relay_lapin(&names, messages, start).await
                        } else {
                            relay_amqprs(&names, messages, start).await
                        }
                    });
                    // Read before the runtime and its threads go.
                    (before, (start.elapsed().as_secs_f64(), usage()))
                }
            });
            let b0 = broker_ticks();
            let ((t0, (cpu0, cs0)), (t1, (cpu1, cs1))) = relay.join().expect("relay");
            let b1 = broker_ticks();
            let per = |x: f64| x / messages as f64;
            println!(
                "{client:6} round {round}: {:6.0} msgs/s, client {:5.1} µs/msg, {:4.2} context switches/msg, broker {:5.1} µs/msg",
                messages as f64 / (t1 - t0),
                per(cpu1 - cpu0),
                per((cs1 - cs0) as f64),
                per((b1 - b0) as f64 * 1e6 / 100.0),
            );
            setup.block_on(remove(&ch, &names));
        }
    }
}
