//! A TCP proxy the tests put between the daemon and a service, to cut and
//! restore connections (a network drop, or the service restarting) without
//! touching the machine's shared PostgreSQL and RabbitMQ.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// While true, new connections are closed at once.
    cut: Arc<AtomicBool>,
    /// Bumped on every cut; live connections watch it and close.
    generation: watch::Sender<u64>,
    /// When set, the next PostgreSQL `COMMIT` a client sends reaches the
    /// server, but its connection is then closed before any reply gets back.
    lose_commit_reply: Arc<AtomicBool>,
    /// PostgreSQL transactions begun through the proxy, by whether the
    /// client sent more before `BEGIN` was answered.
    begins: Arc<Begins>,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Proxies a fresh local port to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let lose_commit_reply = Arc::new(AtomicBool::new(false));
        let begins = Arc::new(Begins::default());
        let (generation, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let cut = cut.clone();
            let lose_commit_reply = lose_commit_reply.clone();
            let begins = begins.clone();
            let generation = generation.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let mut cuts = generation.subscribe();
                    let lose_commit_reply = lose_commit_reply.clone();
                    let begins = begins.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = pump(client, server, lose_commit_reply, begins) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            cut,
            generation,
            lose_commit_reply,
            begins,
            task,
        }
    }

    /// How many PostgreSQL transactions began through the proxy since the
    /// last call: (those whose client sent its next statements before the
    /// server answered `BEGIN`, those whose client waited for the answer).
    pub fn take_begins(&self) -> (u64, u64) {
        (
            self.begins.pipelined.swap(0, Ordering::SeqCst),
            self.begins.alone.swap(0, Ordering::SeqCst),
        )
    }

    /// Lets the next `COMMIT` through to the server and closes that
    /// connection before the answer comes back.
    pub fn lose_the_next_commit_reply(&self) {
        self.lose_commit_reply.store(true, Ordering::SeqCst);
    }

    /// Drops every live connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Copies both ways until either side closes. When `lose_commit_reply` is
/// set and the client sends a simple-query `COMMIT`, that message goes to
/// the server, the replies stop, and the connection closes shortly after.
async fn pump(
    client: TcpStream,
    server: TcpStream,
    lose_commit_reply: Arc<AtomicBool>,
    begins: Arc<Begins>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A `BEGIN` sent and not answered yet: whether more followed it.
    let begun: Arc<Mutex<Option<bool>>> = Arc::default();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let silenced = Arc::new(AtomicBool::new(false));
    let upstream = {
        let silenced = silenced.clone();
        let begun = begun.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                {
                    let mut begun = begun.lock().unwrap();
                    match begin_query_end(chunk) {
                        Some(end) => *begun = Some(end < chunk.len()),
                        None => {
                            if let Some(sent_after) = begun.as_mut() {
                                *sent_after = true;
                            }
                        }
                    }
                }
                let commit = chunk.windows(7).any(|w| w == b"COMMIT\0");
                if commit && lose_commit_reply.swap(false, Ordering::SeqCst) {
                    silenced.store(true, Ordering::SeqCst);
                    let _ = server_write.write_all(chunk).await;
                    // Give the server time to commit, then hang up.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    return;
                }
                if server_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if silenced.load(Ordering::SeqCst) {
                continue;
            }
            // The CommandComplete of either form.
            let answered = contains(&buf[..n], b"C\0\0\0\x0aBEGIN\0")
                || contains(&buf[..n], b"C\0\0\0\x16START TRANSACTION\0");
            if answered && let Some(sent_after) = begun.lock().unwrap().take() {
                let counter = if sent_after {
                    &begins.pipelined
                } else {
                    &begins.alone
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// Counts of transactions begun, kept by [`pump`].
#[derive(Default)]
struct Begins {
    /// `BEGIN` followed by more before its answer.
    pipelined: AtomicU64,
    /// `BEGIN` answered before the client sent anything else.
    alone: AtomicU64,
}

/// Where the simple-query message that begins a transaction (`BEGIN …` or
/// `START TRANSACTION …`) ends in `chunk`, if the chunk holds one.
fn begin_query_end(chunk: &[u8]) -> Option<usize> {
    [&b"BEGIN"[..], b"START TRANSACTION"]
        .iter()
        .find_map(|word| {
            (5..chunk.len()).find_map(|at| {
                if chunk[at - 5] != b'Q' || !chunk[at..].starts_with(word) {
                    return None;
                }
                let len = u32::from_be_bytes(chunk[at - 4..at].try_into().unwrap()) as usize;
                Some(at - 4 + len)
            })
        })
}

/// Whether `haystack` holds `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_host(Some(&addr.ip().to_string())).unwrap();
    parsed.set_port(Some(addr.port())).unwrap();
    parsed.to_string()
}
