//! A TCP proxy between bzpush and a service, for faults: links that are
//! cut, refused, slowed or silently stalled.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A TCP proxy in front of a service, which the test can cut off: `sever`
/// kills every open connection, `set_down(true)` refuses new ones too,
/// `set_delay` slows every chunk it forwards, `stall` makes the open
/// connections go silent without closing them, and `set_stalled(true)`
/// stops forwarding on every connection, new ones too (a link that dies
/// silently).
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    down: AtomicBool,
    stop: AtomicBool,
    live: Mutex<Vec<TcpStream>>,
    delay_ms: AtomicU64,
    /// One flag per connection: set, its pipes hold what they read.
    stalled: Mutex<Vec<Arc<AtomicBool>>>,
    /// Set, every pipe holds what it read, on every connection.
    stalled_all: AtomicBool,
    /// When each connection was refused while down.
    refusals: Mutex<Vec<Instant>>,
    /// Chunks read from the clients, toward the target.
    chunks_sent: AtomicU64,
    /// Chunks read either way, numbered in order, and the number of the
    /// last one each way: which side spoke last.
    chunks: AtomicU64,
    last_up: AtomicU64,
    last_down: AtomicU64,
}

impl Proxy {
    pub fn to(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState {
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            delay_ms: AtomicU64::new(0),
            stalled: Mutex::new(Vec::new()),
            stalled_all: AtomicBool::new(false),
            refusals: Mutex::new(Vec::new()),
            chunks_sent: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            last_up: AtomicU64::new(0),
            last_down: AtomicU64::new(0),
        });
        let target = target.to_string();
        let shared = Arc::clone(&state);
        thread::Builder::new()
            .name("test-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    if shared.down.load(Ordering::SeqCst) {
                        shared
                            .refusals
                            .lock()
                            .expect("proxy lock")
                            .push(Instant::now());
                        continue; // dropped: the client sees the connection close
                    }
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    if let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                        client.try_clone(),
                        server.try_clone(),
                        client.try_clone(),
                        server.try_clone(),
                    ) {
                        shared.live.lock().expect("proxy lock").extend([c3, s3]);
                        let stalled = Arc::new(AtomicBool::new(false));
                        shared
                            .stalled
                            .lock()
                            .expect("proxy lock")
                            .push(Arc::clone(&stalled));
                        pipe(client, s2, Arc::clone(&shared), Arc::clone(&stalled), true);
                        pipe(server, c2, Arc::clone(&shared), stalled, false);
                    }
                }
            })
            .expect("spawn the proxy");
        Proxy { addr, state }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts every connection open through the proxy, mid-stream.
    pub fn sever(&self) {
        for stream in self.state.live.lock().expect("proxy lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Holds every chunk `delay` before forwarding it, in both directions:
    /// a slow link, so a request and its answer are far apart in time.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Every connection open now stops forwarding, in both directions,
    /// without closing: a link that went silent (no FIN, no RST). Both
    /// ends wait on it until their own timeouts; new connections work.
    pub fn stall(&self) {
        for flag in self.state.stalled.lock().expect("proxy lock").drain(..) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// While stalled, nothing is forwarded either way and nothing is
    /// closed (no FIN, no RST): a link whose packets silently vanish, as
    /// behind a dead router or a firewall that drops state. New connections
    /// are accepted and hang too. What was held is forwarded on resuming,
    /// as TCP retransmits after such an outage.
    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled_all.store(stalled, Ordering::SeqCst);
    }

    /// When each connection attempt was refused while down, in order: a
    /// client's reconnection attempts, and the pauses between them.
    pub fn refusals(&self) -> Vec<Instant> {
        self.state.refusals.lock().expect("proxy lock").clone()
    }

    /// How many chunks the clients have sent toward the target so far: it
    /// grows with each request a client makes (a query, an ack), so a test
    /// can wait for the client's next one instead of sleeping.
    pub fn chunks_sent(&self) -> u64 {
        self.state.chunks_sent.load(Ordering::SeqCst)
    }

    /// Whether the last chunk through the proxy came from a client: it
    /// answered (an ack, say) everything the target sent it.
    pub fn client_spoke_last(&self) -> bool {
        self.state.last_up.load(Ordering::SeqCst) > self.state.last_down.load(Ordering::SeqCst)
    }

    /// While down, new connections are accepted and closed at once.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.sever();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.sever();
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Forwards `from` to `to`; `upstream` when `from` is the client.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    state: Arc<ProxyState>,
    stalled: Arc<AtomicBool>,
    upstream: bool,
) {
    let _ = thread::Builder::new()
        .name("test-proxy-pipe".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let number = state.chunks.fetch_add(1, Ordering::SeqCst) + 1;
                        if upstream {
                            state.chunks_sent.fetch_add(1, Ordering::SeqCst);
                            state.last_up.store(number, Ordering::SeqCst);
                        } else {
                            state.last_down.store(number, Ordering::SeqCst);
                        }
                        let delay = state.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            thread::sleep(Duration::from_millis(delay));
                        }
                        // Held, not forwarded: holding the chunk also stops
                        // reading, so what follows waits in the kernel's
                        // buffers.
                        while stalled.load(Ordering::SeqCst)
                            || state.stalled_all.load(Ordering::SeqCst)
                        {
                            if state.stop.load(Ordering::SeqCst) {
                                return;
                            }
                            thread::sleep(Duration::from_millis(10));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
}
