//! A publisher that writes AMQP 0-9-1 frames by hand, for messages lapin
//! cannot build: lapin's `ShortString` holds a `String`, so a short-string
//! property that is not UTF-8 can only be put on the wire byte by byte.
//!
//! It speaks just enough of the protocol for one confirmed publish: the
//! handshake with PLAIN guest/guest, one channel in confirm mode,
//! `basic.publish` with a content header and one body frame, then close.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

/// How long the broker may take to answer one step.
const STEP: Duration = Duration::from_secs(10);

/// The `basic` class's properties, each as the raw bytes that go on the wire
/// (short strings without their length octet, which is added here), so any
/// of them can hold bytes that are not UTF-8.
#[derive(Debug, Clone, Default)]
pub struct RawProperties {
    pub content_type: Option<Vec<u8>>,
    pub content_encoding: Option<Vec<u8>>,
    /// Header names (raw bytes) with long-string values.
    pub headers: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    pub delivery_mode: Option<u8>,
    pub correlation_id: Option<Vec<u8>>,
    pub reply_to: Option<Vec<u8>>,
    pub expiration: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
    pub kind: Option<Vec<u8>>,
    pub user_id: Option<Vec<u8>>,
    pub app_id: Option<Vec<u8>>,
    pub cluster_id: Option<Vec<u8>>,
}

impl RawProperties {
    /// The property flags and list of a content header frame, in the order
    /// (and with the flag bits) the specification gives.
    fn encode(&self) -> Vec<u8> {
        let mut flags: u16 = 0;
        let mut list = Vec::new();
        let short = |bit: u16, value: &Option<Vec<u8>>, flags: &mut u16, list: &mut Vec<u8>| {
            if let Some(v) = value {
                *flags |= 1 << bit;
                short_string(list, v);
            }
        };
        short(15, &self.content_type, &mut flags, &mut list);
        short(14, &self.content_encoding, &mut flags, &mut list);
        if let Some(headers) = &self.headers {
            flags |= 1 << 13;
            let mut table = Vec::new();
            for (name, value) in headers {
                short_string(&mut table, name);
                table.push(b'S');
                long_string(&mut table, value);
            }
            long_string(&mut list, &table);
        }
        if let Some(mode) = self.delivery_mode {
            flags |= 1 << 12;
            list.push(mode);
        }
        short(10, &self.correlation_id, &mut flags, &mut list);
        short(9, &self.reply_to, &mut flags, &mut list);
        short(8, &self.expiration, &mut flags, &mut list);
        short(7, &self.message_id, &mut flags, &mut list);
        short(5, &self.kind, &mut flags, &mut list);
        short(4, &self.user_id, &mut flags, &mut list);
        short(3, &self.app_id, &mut flags, &mut list);
        short(2, &self.cluster_id, &mut flags, &mut list);
        let mut out = flags.to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }
}

fn short_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("a short string is at most 255 bytes"));
    out.extend_from_slice(s);
}

fn long_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// A connection with one open channel (number 1) in confirm mode.
struct RawChannel {
    stream: TcpStream,
}

impl RawChannel {
    async fn open(broker: &Broker) -> RawChannel {
        let addr = format!("{}:{}", broker.host, broker.port);
        let stream = TcpStream::connect(&addr)
            .await
            .expect("RabbitMQ is reachable");
        let mut c = RawChannel { stream };
        c.stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        c.expect(0, 10, 10).await; // connection.start

        let mut start_ok = Vec::new();
        start_ok.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty
        short_string(&mut start_ok, b"PLAIN");
        let response = format!("\0{}\0{}", broker.user, broker.password);
        long_string(&mut start_ok, response.as_bytes());
        short_string(&mut start_ok, b"en_US");
        c.method(0, 10, 11, &start_ok).await;

        let tune = c.expect(0, 10, 30).await;
        let mut tune_ok = tune[..6].to_vec(); // the server's channel-max and frame-max
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        c.method(0, 10, 31, &tune_ok).await;

        let mut open = Vec::new();
        short_string(&mut open, broker.vhost.as_bytes());
        short_string(&mut open, b"");
        open.push(0);
        c.method(0, 10, 40, &open).await;
        c.expect(0, 10, 41).await;

        c.method(1, 20, 10, &[0]).await; // channel.open, empty reserved short string
        c.expect(1, 20, 11).await;
        c.method(1, 85, 10, &[0]).await; // confirm.select, wait for the reply
        c.expect(1, 85, 11).await;
        c
    }

    async fn frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn method(&mut self, channel: u16, class: u16, method: u16, args: &[u8]) {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(args);
        self.frame(METHOD, channel, &payload).await;
    }

    /// Reads frames until a method frame, which must be `class.method` on
    /// `channel`; returns its arguments. A `close` from the broker instead
    /// panics with the broker's reply text, which says what it refused.
    async fn expect(&mut self, channel: u16, class: u16, method: u16) -> Vec<u8> {
        loop {
            let (kind, on, payload) = tokio::time::timeout(STEP, self.read_frame())
                .await
                .expect("the broker answers in time");
            if kind == HEARTBEAT {
                continue;
            }
            assert_eq!(kind, METHOD, "a method frame");
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            if got == (10, 50) || got == (20, 40) {
                let text_len = payload[6] as usize;
                let text = String::from_utf8_lossy(&payload[7..7 + text_len]);
                panic!("the broker closed the channel or connection: {text}");
            }
            assert_eq!((on, got), (channel, (class, method)), "the expected reply");
            return payload[4..].to_vec();
        }
    }

    async fn read_frame(&mut self) -> (u8, u16, Vec<u8>) {
        let mut head = [0u8; 7];
        self.stream.read_exact(&mut head).await.unwrap();
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload.pop(), Some(FRAME_END), "frames end with 0xCE");
        (head[0], u16::from_be_bytes([head[1], head[2]]), payload)
    }

    async fn close(mut self) {
        let mut close = 200u16.to_be_bytes().to_vec();
        short_string(&mut close, b"bye");
        close.extend_from_slice(&[0, 0, 0, 0]);
        self.method(0, 10, 50, &close).await;
        self.expect(0, 10, 51).await;
    }
}

/// Where the test broker is and how to log in, from [`crate::helpers::amqp_url`].
struct Broker {
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
}

impl Broker {
    fn of_the_tests() -> Broker {
        let url = url::Url::parse(&crate::helpers::amqp_url()).expect("the broker URL parses");
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            v => decode(v),
        };
        Broker {
            host: url.host_str().unwrap_or("127.0.0.1").to_owned(),
            port: url.port().unwrap_or(5672),
            user: decode(url.username()),
            password: decode(url.password().unwrap_or("")),
            vhost,
        }
    }
}

/// Undoes a URL's percent-encoding (`%2f` is `/`).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Publishes `body` with `properties` to `exchange` on the test broker and
/// waits for the broker's ack, so the message is in its queue before
/// anything the caller publishes next.
pub async fn publish_raw(
    exchange: &str,
    routing_key: &[u8],
    body: &[u8],
    properties: &RawProperties,
) {
    let mut c = RawChannel::open(&Broker::of_the_tests()).await;
    let mut publish = 0u16.to_be_bytes().to_vec();
    short_string(&mut publish, exchange.as_bytes());
    short_string(&mut publish, routing_key);
    publish.push(0); // neither mandatory nor immediate
    c.method(1, 60, 40, &publish).await;

    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&properties.encode());
    c.frame(HEADER, 1, &header).await;
    if !body.is_empty() {
        c.frame(BODY, 1, body).await;
    }

    c.expect(1, 60, 80).await; // basic.ack
    c.close().await;
}
