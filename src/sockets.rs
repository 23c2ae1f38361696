//! Every open client socket, from accept until it closes: how many there
//! are, which client address each counts under, which are still in their
//! handshake, and which have not yet sent a complete request head.
//!
//! It holds the front door's two bounds. Open sockets per client address,
//! in their handshake or WebSockets alike
//! (`BZPUSH_MAX_CONNECTIONS_PER_ADDRESS`): past it, that address's next
//! socket is refused, but for [`MONITORING_RESERVE`] more that may only
//! ask for `/health` or `/metrics` (a monitor behind the same address as
//! its users must still learn how the server is); past those, the
//! address's own oldest socket without a request head makes room. And
//! [`MAX_HANDSHAKES`] sockets in their handshake at once, each on a thread: at that bound the socket that has waited
//! longest without a complete request head is closed to make room, so
//! silent sockets and half-sent heads from any number of addresses never
//! keep a client that sends its request out (`/health` included). A
//! socket from a trusted proxy counts under the client its head names,
//! once it has come ([`Sockets::headed`]). Each refusal and eviction is
//! logged, a few lines a minute. At shutdown it cuts what is left. It
//! never reads or writes a socket: it only shuts one down.

use std::collections::{BTreeSet, HashMap};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::warn;

use crate::address::ClientAddress;
use crate::hub::ConnId;
use crate::logging::Throttle;

/// Sockets in their handshake at once, each on a thread of its own (so
/// also the most handshake threads): opening 10,000 connections as fast as
/// four clients can kept under 20 in their handshake at once (measured),
/// and the connection budget keeps this many threads aside.
pub const MAX_HANDSHAKES: usize = 256;

/// Sockets one client address may open past its share, each answered only
/// if it asks for `/health` or `/metrics` (429 otherwise): a monitor or a
/// load balancer's check behind a NAT, or behind a proxy not named in
/// `BZPUSH_TRUSTED_PROXIES`, whose users hold the address's share.
pub const MONITORING_RESERVE: usize = 4;

/// Why a socket may not stay open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its client address has the most sockets open that one may (429).
    Address(ClientAddress),
    /// [`MAX_HANDSHAKES`] are in their handshake, none silent (503).
    Busy,
}

/// The open client sockets; see the module's doc.
pub struct Sockets {
    state: Mutex<State>,
    /// Signalled when a socket leaves, for shutdown's wait.
    left: Condvar,
    per_address: usize,
    refused_address: Throttle,
    evicted: Throttle,
    busy: Throttle,
}

#[derive(Default)]
struct State {
    live: HashMap<ConnId, Open>,
    /// Sockets that have not sent a complete request head, oldest first
    /// (ids grow in accept order): the first to go.
    headless: BTreeSet<ConnId>,
    /// Sockets in their handshake (evicted ones no longer count).
    handshaking: usize,
    /// Open sockets by the address they count under.
    addresses: HashMap<ClientAddress, usize>,
}

struct Open {
    socket: Arc<TcpStream>,
    /// `None`: a trusted proxy's socket whose client is not known yet.
    address: Option<ClientAddress>,
    handshaking: bool,
    /// Opened past its address's share: it may only ask for `/health` or
    /// `/metrics` ([`MONITORING_RESERVE`]).
    over_share: bool,
}

impl Sockets {
    /// Sockets with at most `per_address` open from one client address.
    pub fn new(per_address: usize) -> Sockets {
        Sockets {
            state: Mutex::default(),
            left: Condvar::new(),
            per_address,
            refused_address: Throttle::new(),
            evicted: Throttle::new(),
            busy: Throttle::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in socket `id`, just accepted from `peer`, unless a bound
    /// refuses it; counted under `peer` unless `proxied` (a trusted
    /// proxy's: counted once its head names the client). At
    /// [`MAX_HANDSHAKES`] the oldest socket without a complete head is
    /// shut down to make room.
    pub fn admit(
        &self,
        id: ConnId,
        socket: &Arc<TcpStream>,
        peer: ClientAddress,
        proxied: bool,
    ) -> Result<(), Refusal> {
        let mut state = self.lock();
        let over_share = !proxied
            && self
                .make_room(&mut state, peer)
                .map_err(|_| self.refused(peer))?;
        if state.handshaking >= MAX_HANDSHAKES {
            let Some(&oldest) = state.headless.first() else {
                drop(state);
                if let Some(held) = self.busy.allow() {
                    warn!(
                        "{MAX_HANDSHAKES} sockets are in their handshake, none of them silent: \
                         refusing more with 503 until one is done{held}"
                    );
                }
                return Err(Refusal::Busy);
            };
            let from = cut(&mut state, oldest);
            if let Some(held) = self.evicted.allow() {
                let from = from.map_or("a proxy".to_string(), |a| a.to_string());
                warn!(
                    "{MAX_HANDSHAKES} sockets are in their handshake: closed the one that \
                     waited longest without sending its request, from {from}{held}"
                );
            }
        }
        let address = (!proxied).then_some(peer);
        if let Some(a) = address {
            *state.addresses.entry(a).or_default() += 1;
        }
        state.live.insert(
            id,
            Open {
                socket: Arc::clone(socket),
                address,
                handshaking: true,
                over_share,
            },
        );
        state.headless.insert(id);
        state.handshaking += 1;
        Ok(())
    }

    /// Like [`Sockets::check_address`], but past the reserve the oldest
    /// socket of `address` that has not sent its request head is closed to
    /// make room: its own silent sockets never keep that address's next
    /// request (`/health`) out.
    fn make_room(&self, state: &mut State, address: ClientAddress) -> Result<bool, Refusal> {
        let refusal = match self.check_address(state, address) {
            Err(refusal) => refusal,
            room => return room,
        };
        let oldest = state.headless.iter().copied().find(|id| {
            state
                .live
                .get(id)
                .is_some_and(|o| o.address == Some(address))
        });
        let Some(id) = oldest else {
            return Err(refusal);
        };
        cut(state, id);
        // It counts no more: the new socket takes its place now.
        if let Some(open) = state.live.get_mut(&id) {
            open.address = None;
        }
        if let Some(n) = state.addresses.get_mut(&address) {
            *n -= 1;
        }
        Ok(true)
    }

    /// Whether another socket from `address` is past its share (`true`:
    /// in the monitoring reserve); refused past the reserve too (the
    /// caller says so, [`Sockets::refused`]).
    fn check_address(&self, state: &State, address: ClientAddress) -> Result<bool, Refusal> {
        let open = state.addresses.get(&address).copied().unwrap_or(0);
        if open < self.per_address {
            return Ok(false);
        }
        if open < self.per_address.saturating_add(MONITORING_RESERVE) {
            return Ok(true);
        }
        Err(Refusal::Address(address))
    }

    /// Logs, a few times a minute, that `address` is refused.
    fn refused(&self, address: ClientAddress) -> Refusal {
        if let Some(held) = self.refused_address.allow() {
            warn!(
                "{address} has {} sockets open, the most one client address may \
                 (BZPUSH_MAX_CONNECTIONS_PER_ADDRESS): refusing more from it with 429, but \
                 for /health and /metrics{held}",
                self.per_address
            );
        }
        Refusal::Address(address)
    }

    /// Socket `id` sent a complete request head: it is no longer the first
    /// to go. `client`: the client a trusted proxy's head names, under
    /// which the socket counts from now on, if it has room. `monitoring`:
    /// the head asks for `/health` or `/metrics`, which a socket past its
    /// address's share may still have.
    pub fn headed(
        &self,
        id: ConnId,
        client: Option<ClientAddress>,
        monitoring: bool,
    ) -> Result<(), Refusal> {
        let mut state = self.lock();
        state.headless.remove(&id);
        let Some(open) = state.live.get(&id) else {
            return Ok(());
        };
        let over_share = match (client, open.address) {
            (Some(client), None) => {
                let over_share = self
                    .check_address(&state, client)
                    .map_err(|_| self.refused(client))?;
                *state.addresses.entry(client).or_default() += 1;
                if let Some(open) = state.live.get_mut(&id) {
                    open.address = Some(client);
                    open.over_share = over_share;
                }
                over_share
            }
            _ => open.over_share,
        };
        match (over_share, open_address(&state, id)) {
            (true, Some(address)) if !monitoring => Err(self.refused(address)),
            _ => Ok(()),
        }
    }

    /// Socket `id`'s handshake is over: it is a WebSocket now.
    pub fn upgraded(&self, id: ConnId) {
        let mut state = self.lock();
        if let Some(open) = state.live.get_mut(&id)
            && std::mem::take(&mut open.handshaking)
        {
            state.handshaking -= 1;
        }
    }

    /// Forgets socket `id`, which its thread is done with.
    pub fn remove(&self, id: ConnId) -> Option<Arc<TcpStream>> {
        let mut state = self.lock();
        let open = state.live.remove(&id)?;
        state.headless.remove(&id);
        if open.handshaking {
            state.handshaking -= 1;
        }
        if let Some(a) = open.address
            && let Some(n) = state.addresses.get_mut(&a)
        {
            *n -= 1;
            if *n == 0 {
                state.addresses.remove(&a);
            }
        }
        drop(state);
        self.left.notify_all();
        Some(open.socket)
    }

    /// Open sockets.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// Waits until every socket is gone or `grace` passed, then cuts those
    /// still there: their threads then end soon.
    pub fn drain(&self, grace: Duration) {
        let state = self.lock();
        let (state, _) = self
            .left
            .wait_timeout_while(state, grace, |s| !s.live.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        for open in state.live.values() {
            let _ = open.socket.shutdown(Shutdown::Both);
        }
    }
}

/// Shuts down socket `id`, which has sent no complete request head, to make
/// room: its thread's read ends at once, and the thread then removes it.
/// It leaves the handshakes now. Answers the address it counts under.
fn cut(state: &mut State, id: ConnId) -> Option<ClientAddress> {
    state.headless.remove(&id);
    let open = state.live.get_mut(&id)?;
    let _ = open.socket.shutdown(Shutdown::Both);
    if std::mem::take(&mut open.handshaking) {
        state.handshaking -= 1;
    }
    open.address
}

/// The address socket `id` counts under, if known.
fn open_address(state: &State, id: ConnId) -> Option<ClientAddress> {
    state.live.get(&id).and_then(|open| open.address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// `n` connected server-side sockets, and their clients.
    fn pairs(n: usize) -> Vec<(Arc<TcpStream>, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        (0..n)
            .map(|_| {
                let client = TcpStream::connect(addr).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                (Arc::new(server), client)
            })
            .collect()
    }

    fn address(text: &str) -> ClientAddress {
        ClientAddress::of(text.parse().expect("an address"))
    }

    #[test]
    fn one_address_is_capped_and_leaving_frees_its_place() {
        let sockets = Sockets::new(2);
        let (a, b) = (address("192.0.2.1"), address("192.0.2.2"));
        let reserve = MONITORING_RESERVE;
        let mut all = pairs(6 + reserve);
        assert_eq!(sockets.admit(0, &all[0].0, a, false), Ok(()));
        sockets.headed(0, None, false).expect("within its share");
        sockets.upgraded(0);
        assert_eq!(sockets.admit(1, &all[1].0, a, false), Ok(()));
        sockets.headed(1, None, false).expect("within its share");
        // Past its share, a socket may only ask for /health or /metrics.
        for (id, (socket, _)) in all.iter().enumerate().skip(2).take(reserve) {
            assert_eq!(sockets.admit(id as u64, socket, a, false), Ok(()));
        }
        assert_eq!(sockets.headed(2, None, true), Ok(()));
        assert_eq!(sockets.headed(3, None, false), Err(Refusal::Address(a)));
        // Past the reserve, its oldest socket without a head (4) makes room.
        let past = 2 + reserve;
        assert_eq!(sockets.admit(past as u64, &all[past].0, a, false), Ok(()));
        let mut byte = [0u8; 1];
        assert_eq!(
            all[4].1.read(&mut byte).expect("eof"),
            0,
            "socket 4 was cut"
        );
        sockets.remove(4);
        // With every one of its sockets headed, the next is refused.
        for id in (5..2 + reserve).chain([past]) {
            sockets.headed(id as u64, None, true).expect("monitoring");
        }
        assert_eq!(
            sockets.admit(past as u64 + 1, &all[past + 1].0, a, false),
            Err(Refusal::Address(a))
        );
        assert_eq!(
            sockets.admit(past as u64 + 2, &all[past + 2].0, b, false),
            Ok(())
        );
        for id in (2..2 + reserve).chain([past]) {
            sockets.remove(id as u64);
        }
        assert!(sockets.remove(0).is_some());
        assert_eq!(
            sockets.admit(past as u64 + 1, &all[past + 1].0, a, false),
            Ok(())
        );
        assert_eq!(sockets.headed(past as u64 + 1, None, false), Ok(()));
        assert_eq!(sockets.len(), 3);
    }

    #[test]
    fn a_proxied_socket_counts_under_the_client_its_head_names() {
        let sockets = Sockets::new(1);
        let proxy = address("127.0.0.1");
        let all = pairs(4);
        for (id, (socket, _)) in all.iter().enumerate() {
            assert_eq!(sockets.admit(id as u64, socket, proxy, true), Ok(()));
        }
        let client = address("192.0.2.7");
        assert_eq!(sockets.headed(0, Some(client), false), Ok(()));
        assert_eq!(
            sockets.headed(1, Some(client), false),
            Err(Refusal::Address(client))
        );
        assert_eq!(sockets.headed(2, Some(address("192.0.2.8")), false), Ok(()));
        // A refused socket's thread ends; another from the client comes.
        sockets.remove(1);
        sockets.remove(0);
        assert_eq!(sockets.headed(3, Some(client), false), Ok(()));
    }

    #[test]
    fn at_the_handshake_bound_the_oldest_silent_socket_makes_room() {
        let sockets = Sockets::new(usize::MAX);
        let mut all = pairs(MAX_HANDSHAKES + 2);
        let from = |i: usize| address(&format!("10.0.{}.{}", i / 256, i % 256));
        for (i, (socket, _)) in all.iter().enumerate().take(MAX_HANDSHAKES) {
            assert_eq!(sockets.admit(i as u64, socket, from(i), false), Ok(()));
        }
        // Socket 0 sent its head: socket 1 is the oldest silent one.
        sockets.headed(0, None, false).expect("room");
        let n = MAX_HANDSHAKES;
        assert_eq!(sockets.admit(n as u64, &all[n].0, from(n), false), Ok(()));
        let mut byte = [0u8; 1];
        assert_eq!(
            all[1].1.read(&mut byte).expect("eof"),
            0,
            "socket 1 was cut"
        );
        all[0]
            .1
            .set_nonblocking(true)
            .expect("a look without waiting");
        assert!(all[0].1.read(&mut byte).is_err(), "socket 0 is still open");
        // With none silent left, a socket is refused.
        for i in 2..=n {
            sockets.headed(i as u64, None, false).expect("room");
        }
        let m = n + 1;
        assert_eq!(
            sockets.admit(m as u64, &all[m].0, from(m), false),
            Err(Refusal::Busy)
        );
        // The evicted socket's thread forgets it; one becomes a WebSocket.
        sockets.remove(1);
        sockets.upgraded(0);
        assert_eq!(sockets.admit(m as u64, &all[m].0, from(m), false), Ok(()));
    }
}
