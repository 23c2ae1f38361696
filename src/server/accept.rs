//! The accept loop and the connections' threads: each accepted socket goes
//! to a handshake thread (kept a while for the next socket), and each
//! WebSocket to a thread of its own, within the bounds of the machine and
//! of each client address ([`Sockets`]). A thread that cannot start costs
//! its client a refusal, never the process; a panic in one ends only its
//! connection. Starting the server's other threads is `super`'s.

use std::net::{IpAddr, Shutdown as SocketShutdown, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, Scope};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use log::warn;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::address::ClientAddress;
use crate::connection::{self, Limits};
use crate::handshake::{self, HEAD_TIMEOUT, Handshake, Upgraded};
use crate::hub::{ConnEvent, ConnId, ConnSender};
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Writers};
use crate::shutdown::{self, Shutdown};
use crate::sockets::{MAX_HANDSHAKES, Refusal, Sockets};

/// A connection's thread touches little stack, except to parse a frame:
/// serde_json recurses up to its limit of 127 levels, and a frame nested
/// that deep takes up to 80 KiB of stack in a release build and 256 KiB in
/// a debug build (measured). At 128 KiB one such frame overflowed the
/// stack of a debug build and aborted the whole process. Only pages
/// touched cost memory: an idle connection touches a few KiB.
const CONNECTION_STACK: usize = 512 * 1024;
/// A handshake thread's stack: smaller than [`CONNECTION_STACK`] so that
/// glibc, which hands an ended thread's stack to the next thread asking for
/// no more than its size, never gives a connection thread a stack whose
/// pages a handshake touched (idle connections: 11.2 KiB of stack each
/// when it could, 8.0 since, measured).
const HANDSHAKE_STACK: usize = 256 * 1024;
/// A handshake thread with no socket to take ends after this long.
const HANDSHAKE_IDLE: Duration = Duration::from_secs(10);
/// How long the accept loop waits for a handshake thread to come free when
/// [`MAX_HANDSHAKES`] live: one is about to (see [`Acceptor::hand_over`]),
/// within microseconds unless the machine is starved.
const HANDOVER_WAIT: Duration = Duration::from_millis(100);
/// A write to a client that makes no progress this long fails the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepts that failed (out of descriptors, usually): a few lines a minute.
static ACCEPT_FAILURES: Throttle = Throttle::new();
/// Threads that could not start: one line a minute, with the count.
static NO_THREAD: Throttle = Throttle::per_minute(1);
/// Connection threads whose work panicked: a few lines a minute.
static PANICS: Throttle = Throttle::new();

/// What every connection thread shares.
pub(super) struct Shared {
    /// What a request must pass to become a WebSocket.
    pub(super) handshake: Handshake,
    pub(super) outbound_queue: usize,
    pub(super) limits: Limits,
    pub(super) metrics: Arc<Metrics>,
    /// Every open client socket: how many, from where, what to cut.
    pub(super) sockets: Sockets,
    /// Handshake threads alive: at most [`MAX_HANDSHAKES`].
    pub(super) handshake_threads: AtomicUsize,
}

/// The accept loop and what it gives each connection.
///
/// Each handshake runs on a thread of its own, never on the accept loop's,
/// so that a slow client holds up no other. Starting a thread costs more
/// than a handshake does (its stack, its signal stack, and undoing both
/// when it ends), so a handshake thread that is done waits
/// [`HANDSHAKE_IDLE`] for the next socket before it ends; a new one starts
/// only when none is waiting, and never more than [`MAX_HANDSHAKES`]. The
/// WebSocket itself is always served on a fresh thread
/// ([`Accepted::start_websocket`]). A socket that a bound of [`Sockets`]
/// refuses, or that no thread can be started for, gets a refusal (429 or
/// 503) and is closed: it costs that client alone.
pub(super) struct Acceptor<'a> {
    shared: Arc<Shared>,
    hub: ConnSender,
    writers: &'a Writers,
    next_id: ConnId,
    /// Rendezvous with a handshake thread waiting for a socket: a send
    /// succeeds only if one is waiting.
    handshakes: (Sender<Accepted>, Receiver<Accepted>),
}

impl<'a> Acceptor<'a> {
    /// An accept loop handing connections to `hub`, their writes to
    /// `writers`.
    pub(super) fn new(shared: Arc<Shared>, hub: ConnSender, writers: &'a Writers) -> Acceptor<'a> {
        Acceptor {
            shared,
            hub,
            writers,
            next_id: 0,
            handshakes: crossbeam_channel::bounded(0),
        }
    }
}

impl<'scope> Acceptor<'_> {
    /// Accepts connections until `shutdown`, each on threads of `scope`,
    /// which joins them all when it ends. Waiting handshake threads end
    /// when this returns.
    pub(super) fn run(
        mut self,
        scope: &'scope Scope<'scope, '_>,
        listener: &TcpListener,
        shutdown: &Shutdown,
    ) {
        let mut backoff = Duration::from_millis(10);
        for socket in listener.incoming() {
            if shutdown.requested() {
                break;
            }
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    if let Some(held) = ACCEPT_FAILURES.allow() {
                        // Usually out of file descriptors: wait for some to free.
                        warn!("accept failed: {e}; trying again{held}");
                    }
                    shutdown.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            self.start(scope, socket);
        }
    }

    /// Takes in `socket` if the bounds of [`Sockets`] let it, and hands it
    /// to a handshake thread ([`Acceptor::hand_over`]).
    fn start(&mut self, scope: &'scope Scope<'scope, '_>, socket: TcpStream) {
        let id = self.next_id;
        self.next_id += 1;
        // Gone before it was looked at, or unusable: nothing to answer.
        let Ok(peer) = socket.peer_addr() else { return };
        let peer = peer.ip().to_canonical();
        if socket.set_nodelay(true).is_err()
            || socket.set_read_timeout(Some(HEAD_TIMEOUT)).is_err()
            || socket.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            return;
        }
        let socket = Arc::new(socket);
        let proxied = self.shared.handshake.proxies.trusts(peer);
        let admitted = self
            .shared
            .sockets
            .admit(id, &socket, ClientAddress::of(peer), proxied);
        if let Err(refusal) = admitted {
            handshake::refuse(&socket, refusal);
            return;
        }
        let accepted = Accepted {
            id,
            peer,
            outbox: Outbox::new(
                Arc::clone(&socket),
                self.shared.outbound_queue,
                self.writers,
                Arc::clone(&self.shared.metrics),
            ),
            socket,
            shared: Arc::clone(&self.shared),
            hub: self.hub.clone(),
        };
        self.hand_over(scope, accepted);
    }

    /// Hands `accepted` to a handshake thread: a waiting one, a new one
    /// while fewer than [`MAX_HANDSHAKES`] live, or else the next that
    /// comes free ([`Sockets`] keeps as many sockets in their handshake,
    /// so one is about to); [`Handshake::answer`] answers the request.
    fn hand_over(&mut self, scope: &'scope Scope<'scope, '_>, accepted: Accepted) {
        let accepted = match self.handshakes.0.try_send(accepted) {
            Ok(()) => return,
            Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => a,
        };
        let threads = &self.shared.handshake_threads;
        if threads.fetch_add(1, Ordering::Relaxed) >= MAX_HANDSHAKES {
            threads.fetch_sub(1, Ordering::Relaxed);
            if let Err(SendTimeoutError::Timeout(a) | SendTimeoutError::Disconnected(a)) =
                self.handshakes.0.send_timeout(accepted, HANDOVER_WAIT)
            {
                a.refuse_busy();
            }
            return;
        }
        let (id, socket, shared) = (
            accepted.id,
            Arc::clone(&accepted.socket),
            Arc::clone(&accepted.shared),
        );
        let next = self.handshakes.1.clone();
        let thread = thread::Builder::new()
            .name("handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn_scoped(scope, move || {
                let shared = Arc::clone(&accepted.shared);
                handshakes(scope, accepted, &next);
                shared.handshake_threads.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = thread {
            shared.handshake_threads.fetch_sub(1, Ordering::Relaxed);
            if let Some(held) = NO_THREAD.allow() {
                warn!("cannot start a handshake thread: {e}; its client got 503{held}");
            }
            handshake::refuse(&socket, Refusal::Busy);
            shared.sockets.remove(id);
        }
    }
}

/// A handshake thread: answers `first`, then each socket it is handed,
/// until none comes for [`HANDSHAKE_IDLE`] or the accept loop ends.
fn handshakes<'scope>(
    scope: &'scope Scope<'scope, '_>,
    first: Accepted,
    next: &Receiver<Accepted>,
) {
    let mut accepted = first;
    loop {
        let shared = &accepted.shared;
        match contain(accepted.id, || {
            let sockets = &shared.sockets;
            (shared.handshake).answer(accepted.id, &accepted.socket, accepted.peer, sockets)
        })
        .flatten()
        {
            Some(websocket) => accepted.start_websocket(scope, websocket),
            None => accepted.finish(),
        }
        accepted = match next.recv_timeout(HANDSHAKE_IDLE) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        };
    }
}

/// Runs a connection thread's `work`. A panic (a bug that one client's
/// input reached) is logged and ends only this connection: `None`, and
/// the caller cleans up as after any other end, so that the socket is
/// closed and the connection forgotten rather than left hanging. What
/// runs outside `work` cannot panic, so the scope that joins connection
/// threads never finds one that did.
fn contain<T>(id: ConnId, work: impl FnOnce() -> T) -> Option<T> {
    panic::catch_unwind(AssertUnwindSafe(work))
        .map_err(|payload| {
            if let Some(held) = PANICS.allow() {
                warn!(
                    "connection {id}: its thread panicked: {}{held}",
                    shutdown::panic_message(payload.as_ref())
                );
            }
        })
        .ok()
}

/// A WebSocket's thread: serves it, then forgets it. What it is given
/// stays in its box: on this thread's stack it would be one more page for
/// the whole life of an idle connection.
fn serve_websocket(given: &mut (Accepted, Upgraded)) {
    let (accepted, websocket) = given;
    let id = accepted.id;
    let (socket, outbox) = (Arc::clone(&accepted.socket), Arc::clone(&accepted.outbox));
    let websocket = Upgraded {
        leftover: std::mem::take(&mut websocket.leftover),
        ..*websocket
    };
    let served = contain(id, || {
        connection::run(
            id,
            websocket,
            socket,
            outbox,
            &accepted.hub,
            accepted.shared.limits,
        )
    });
    if served.is_none() {
        // It may not have told the hub it left.
        let _ = accepted.hub.send(ConnEvent::Disconnect { conn: id });
    }
    accepted.left();
}

/// An accepted socket, as its threads (handshake, then WebSocket) hold it.
#[derive(Clone)]
struct Accepted {
    id: ConnId,
    /// The address it came from (a proxy's, if proxied).
    peer: IpAddr,
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    hub: ConnSender,
}

impl Accepted {
    /// Serves `websocket` on a thread of its own, started afresh: the
    /// handshake's thread ends here, and its stack and malloc cache keep
    /// what the handshake touched, which would otherwise cost every idle
    /// connection some KiB for its whole life. A thread that cannot start
    /// costs its client a close (1013, try again later) right after its
    /// handshake; the budget ([`Capacity`](crate::capacity::Capacity), counted before the 101) keeps
    /// that rare.
    fn start_websocket<'scope>(self, scope: &'scope Scope<'scope, '_>, websocket: Upgraded) {
        self.shared.sockets.upgraded(self.id);
        // Boxed: std's thread start moves what the thread is given through
        // three frames, and every idle connection's thread keeps them on
        // its stack (a page more by value: 4 KiB a connection, measured).
        let given = Box::new((self.clone(), websocket));
        let spawned = thread::Builder::new()
            .name(format!("conn-{}", self.id))
            .stack_size(CONNECTION_STACK)
            .spawn_scoped(scope, move || {
                let mut given = given;
                serve_websocket(&mut given);
            });
        if let Err(e) = spawned {
            if let Some(held) = NO_THREAD.allow() {
                warn!(
                    "cannot start a connection thread: {e}; its client was closed with 1013 \
                     (try again later){held}"
                );
            }
            // The writers put the close frame out, then shut the socket.
            self.outbox.close(CloseCode::Again, "try again later");
            self.left();
        }
    }

    /// No handshake thread came free in time: 503, and the socket goes.
    fn refuse_busy(self) {
        handshake::refuse(&self.socket, Refusal::Busy);
        self.finish();
    }

    /// The WebSocket is over: it no longer counts, and its socket goes.
    fn left(&self) {
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        self.finish();
    }

    /// The connection's last thread ends: forget the socket, shut it.
    fn finish(&self) {
        let socket = self.shared.sockets.remove(self.id);
        // A closing outbox shuts the socket itself once its close frame is
        // out: shutting it here could cut that frame off.
        if let Some(s) = socket
            && !self.outbox.is_closing()
        {
            let _ = s.shutdown(SocketShutdown::Both);
        }
    }
}
