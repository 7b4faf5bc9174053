//! A TCP proxy the tests put between the daemon and a service, to cut and
//! restore connections (a network drop, or the service restarting) without
//! touching the machine's shared PostgreSQL and RabbitMQ.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
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
        let (generation, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let cut = cut.clone();
            let lose_commit_reply = lose_commit_reply.clone();
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
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = pump(client, server, lose_commit_reply) => {}
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
            task,
        }
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
async fn pump(client: TcpStream, server: TcpStream, lose_commit_reply: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let silenced = Arc::new(AtomicBool::new(false));
    let upstream = {
        let silenced = silenced.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
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

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_host(Some(&addr.ip().to_string())).unwrap();
    parsed.set_port(Some(addr.port())).unwrap();
    parsed.to_string()
}
