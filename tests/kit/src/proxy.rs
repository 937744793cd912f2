//! A TCP fault-injection proxy for tests: forwards bytes both ways and can cut every
//! connection, black-hole traffic, or refuse connections on its (stable) port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use crate::smtp::Acceptor;

#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyStats {
    pub connections_total: u64,
    pub open_connections: usize,
}

struct Shared {
    target: SocketAddr,
    blackhole: AtomicBool,
    deaf: AtomicBool,
    stats: watch::Sender<ProxyStats>,
}

/// A TCP proxy on 127.0.0.1 in front of one target, with faults on demand.
pub struct Proxy {
    shared: Arc<Shared>,
    acceptor: Acceptor,
    /// Generation counter: bumping it cuts every connection; dropping it (with the
    /// proxy) ends them too.
    cut: watch::Sender<u64>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards to `target`. Must run inside a tokio runtime.
    pub fn start(target: SocketAddr) -> Proxy {
        let shared = Arc::new(Shared {
            target,
            blackhole: AtomicBool::new(false),
            deaf: AtomicBool::new(false),
            stats: watch::Sender::new(ProxyStats::default()),
        });
        let (cut, cut_rx) = watch::channel(0u64);
        let sh = shared.clone();
        let acceptor = Acceptor::start(move |client| {
            let mut cut = cut_rx.clone();
            cut.borrow_and_update(); // only cuts issued from now on concern it
            tokio::spawn(handle(sh.clone(), client, cut));
        })
        .expect("bind the test proxy");
        Proxy {
            shared,
            acceptor,
            cut,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }
    /// The port it listens on (stable across [`Proxy::set_refusing`]).
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Close every proxied connection (both sides); keep listening.
    pub fn cut_all(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }

    /// While true, connections stay open but bytes are silently discarded both ways.
    /// A connection accepted during a black-hole never reaches the target, even after
    /// the black-hole is lifted (like a connection whose handshake got lost).
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// While true, the client's bytes still reach the target, but the target's replies are
    /// silently discarded: what a client sends is done, and it never hears so (a lost confirm).
    /// The streams are then out of step: cut the connections before lifting it.
    pub fn set_deaf(&self, on: bool) {
        self.shared.deaf.store(on, Ordering::SeqCst);
    }

    /// true: stop listening (ECONNREFUSED); false: re-bind the same port.
    /// Existing connections are not affected (see `cut_all`).
    pub async fn set_refusing(&self, refusing: bool) {
        self.acceptor.set_refusing(refusing).await;
    }

    /// Like dropping the proxy, but on return the port is already closed.
    pub async fn shutdown(self) {
        self.acceptor.set_refusing(true).await;
    }

    /// Connections accepted so far.
    pub fn connections_total(&self) -> u64 {
        self.shared.stats.borrow().connections_total
    }
    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.stats.borrow().open_connections
    }

    /// Waits until `pred` holds on the counters; false on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&ProxyStats) -> bool,
    ) -> bool {
        let mut rx = self.shared.stats.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await,
            Ok(Ok(_))
        )
    }
}

struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.stats.send_modify(|s| s.open_connections -= 1);
    }
}

async fn handle(shared: Arc<Shared>, client: TcpStream, mut cut: watch::Receiver<u64>) {
    shared.stats.send_modify(|s| {
        s.connections_total += 1;
        s.open_connections += 1;
    });
    let _guard = ConnGuard(shared.clone());
    tokio::select! {
        _ = forward(&shared, client) => {}
        _ = cut.changed() => {} // cut_all() (Ok) or proxy dropped (Err)
    }
    // The sockets lived in the `forward` future, already dropped here: by the time
    // open_connections decrements, both sides are closed.
}

async fn forward(shared: &Shared, client: TcpStream) {
    let _ = client.set_nodelay(true);
    if shared.blackhole.load(Ordering::SeqCst) {
        let (mut rd, _wr) = client.into_split();
        let mut sink = [0u8; 4096];
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    // Target down: the client connection is closed right after being accepted.
    let Ok(upstream) = TcpStream::connect(shared.target).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (up_rd, up_wr) = upstream.into_split();
    // An error in either direction ends the whole connection; a clean EOF is passed
    // on as a half-close and the other direction keeps flowing.
    let _ = tokio::try_join!(
        pump(client_rd, up_wr, || shared.blackhole.load(Ordering::SeqCst)),
        pump(up_rd, client_wr, || {
            shared.blackhole.load(Ordering::SeqCst) || shared.deaf.load(Ordering::SeqCst)
        })
    );
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    discard: impl Fn() -> bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        if !discard() {
            to.write_all(&buf[..n]).await?;
        }
    }
}
