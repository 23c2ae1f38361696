//! The hub: who is subscribed to what, and fan-out.
//!
//! One thread owns the subscription index of every feed (bug → connections,
//! connection → bugs), each client address's budget ([`Budget`]) and the
//! catch-up room ([`CatchUp`]), which alone answers `since`; connection
//! threads and broker consumers talk to it only by message, never by lock:
//! the feeds and the catch-up room by [`Event`], connections by
//! [`ConnEvent`], on a queue of their own. It parses the clients' commands
//! too, but for big ones ([`Request`]), so that parsing leaves nothing on
//! the many connection threads.
//! Each update is encoded to its WebSocket frame once and the same bytes
//! are queued to every subscriber. Replies are queued here too, all through
//! the connection's [`Client`], so a connection sees its answers, catch-up
//! and live updates in the order the hub handled them.
//!
//! Fair to every client: an update never waits behind clients' commands
//! (the feeds' queue comes first; a command in hand is the most it waits
//! for); each connection has at most one command in the queue ([`Turns`]);
//! and an address whose commands took more than its share of the hub's
//! time waits before its next ([`Budget::spent`]). So one client's stream
//! of big commands delays neither others' updates nor their commands. The
//! hub must never block on a client: [`Outbox::push`] doesn't.

use std::collections::BTreeSet;
use std::panic;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, select};
use log::{debug, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::address::ClientAddress;
use crate::catchup::{self, CatchUp, Client, Resumed};
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::notification::{BugId, Moment, Notification};
use crate::outbox::{Bytes, Outbox, text_frame};
use crate::poller::{Refused, Sink};
use crate::protocol::{self, Command, ProtocolError};
pub use budget::Budget;
use connections::{Connections, Slot};
use index::BugIndex;
pub use turn::{Turn, Turns};

mod budget;
mod connections;
mod index;
mod turn;

/// A connection, numbered by the server in accept order.
pub type ConnId = u64;
/// A feed, by its index in the configured feed list.
pub type FeedId = usize;

/// Messages queued for the hub before senders wait: deep enough to absorb a
/// burst from the broker, small enough to bound memory.
pub const HUB_QUEUE: usize = 16 * 1024;
/// Connections' messages queued for the hub before their threads wait:
/// at most one command of each ([`Turns`]), with its connect and
/// disconnect.
pub const CONN_QUEUE: usize = 16 * 1024;

/// What the connections tell the hub, in order for each.
pub enum ConnEvent {
    /// A WebSocket connection on `feed` opened, from a client counted
    /// under `address`.
    Connect {
        conn: ConnId,
        feed: FeedId,
        outbox: Arc<Outbox>,
        address: ClientAddress,
    },
    /// A command from `conn`, with the connection's [`Turn`], given back
    /// once it is handled. Errors are answered in order with the
    /// connection's other replies.
    Command {
        conn: ConnId,
        request: Request,
        turn: Turn,
    },
    /// The connection ended; forget its subscriptions.
    Disconnect { conn: ConnId },
}

/// A client's command, as its connection hands it over.
pub enum Request {
    /// The text as it came, parsed by the hub: whatever parsing touches on
    /// a connection's thread (stack pages, the allocator's per-thread
    /// cache) would stay with every idle connection's thread for its whole
    /// life (measured: 3 KiB per connection at 10 bugs, 6 KiB at 100).
    Text(String),
    /// Parsed on the connection's thread: a big command, whose parsing
    /// (0.84 ms for 20,000 bugs, measured) the hub, which every client's
    /// updates wait for, is spared; the client that sends such commands
    /// pays for them: the time it took counts against its address's share
    /// ([`Budget::spent`]) as the hub's own does.
    Parsed(Result<Command, ProtocolError>, Duration),
}

impl Request {
    /// Commands longer than this are parsed on the connection's thread: a
    /// subscription to about 2,000 bugs.
    pub const PARSED_BEYOND: usize = 16 * 1024;

    /// `text` as a connection hands it over: parsed here if it is long.
    pub fn new(text: String) -> Request {
        if text.len() > Request::PARSED_BEYOND {
            let started = Instant::now();
            let parsed = protocol::parse(&text);
            Request::Parsed(parsed, started.elapsed())
        } else {
            Request::Text(text)
        }
    }
}

/// Sends connections' messages to the hub.
pub type ConnSender = Sender<ConnEvent>;

/// What the feeds, the catch-up room and the server ask of the hub.
pub enum Event {
    /// Bug changed: tell the feed's subscribers.
    Notify {
        feed: FeedId,
        notification: Notification,
    },
    /// For the catch-up room.
    CatchUp(catchup::Event),
    /// Shutdown: close every connection with 1001 (going away).
    CloseAll,
}

/// Sends messages to the hub.
pub type HubSender = Sender<Event>;

/// The hub as the poller's [`Sink`] (`bzpush run`): a notification is
/// handed over once it is in the hub's queue.
pub struct HubSink {
    pub hub: HubSender,
    pub feed: FeedId,
    pub metrics: Arc<Metrics>,
}

impl Sink for HubSink {
    /// The hub has stopped: only during shutdown.
    type Error = &'static str;
    /// The hub holds a batch as soon as it is sent.
    type Pending = ();

    fn local(&self) -> bool {
        true
    }

    fn describe(&self) -> (&'static str, String) {
        ("hub", "in-process".to_string())
    }

    /// The hub refuses nothing.
    fn settle(&mut self, (): ()) -> Result<Refused, Self::Error> {
        Ok(Refused::default())
    }

    /// Another poller may have taken changes while this one had no lock:
    /// the cache vouches only for what is stamped after `database_now`.
    fn activated(&mut self, database_now: Option<Moment>) {
        let (feed, at) = (self.feed, Resumed::Database(database_now));
        let resumed = catchup::Event::Resumed { feed, at };
        // Only fails during shutdown, when nobody asks the cache any more.
        let _ = self.hub.send(Event::CatchUp(resumed));
    }

    /// Changes may now reach another process's hub and never this one:
    /// the cache vouches for nothing until this poller takes the lock again.
    fn deactivated(&mut self) {
        self.activated(None);
    }

    fn send(&mut self, batch: &[Notification]) -> Result<(), Self::Error> {
        for notification in batch {
            let message = Event::Notify {
                feed: self.feed,
                notification: notification.clone(),
            };
            self.hub.send(message).map_err(|_| "the hub has stopped")?;
            self.metrics
                .notifications_in
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

struct Subscriber {
    feed: FeedId,
    /// Where the subscription budget counts it.
    address: ClientAddress,
    bugs: BTreeSet<BugId>,
    /// Where its frames go: to its outbox, or behind its catch-ups.
    client: Client,
}

/// The hub's state; [`Hub::run`] is its thread.
pub struct Hub {
    /// Each feed's followers, by [`FeedId`].
    feeds: Vec<BugIndex>,
    subscribers: Connections<Subscriber>,
    catchup: CatchUp,
    max_subscriptions: usize,
    budget: Budget,
    outbound_queue: usize,
    metrics: Arc<Metrics>,
    /// Shutdown closed every connection: any that connects now is closed
    /// too.
    closing: bool,
    /// The feeds' queue, for [`Hub::between_slices`] ([`Hub::run`] sets
    /// it).
    upstream: Option<Receiver<Event>>,
}

/// Index steps of one command between two looks at the feeds' queue:
/// about 25 µs of the hub's time (20,000 inserts took 0.48 ms, measured).
const SLICE: usize = 1024;

/// How the hub is set up.
pub struct HubConfig {
    pub feeds: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    pub budget: Budget,
    pub outbound_queue: usize,
    pub catchup: CatchUp,
}

/// Parsing a command panicked (a bug one client's input reached): said a
/// few times a minute.
static PARSE_PANICS: Throttle = Throttle::new();

impl Hub {
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Hub {
        Hub {
            feeds: (0..config.feeds).map(|_| BugIndex::default()).collect(),
            subscribers: Connections::default(),
            catchup: config.catchup,
            max_subscriptions: config.max_subscriptions,
            budget: config.budget,
            outbound_queue: config.outbound_queue,
            metrics,
            closing: false,
            upstream: None,
        }
    }

    /// Handles messages until every sender of both queues is gone; what
    /// `upstream` (the feeds, the catch-up room) sends first: an update
    /// waits for the one command in hand at most, never for the queue of
    /// clients' commands.
    pub fn run(mut self, upstream: Receiver<Event>, conns: Receiver<ConnEvent>) {
        self.upstream = Some(upstream.clone());
        let task = self.metrics.tasks.register("hub");
        let (mut upstream, mut conns) = (Some(upstream), Some(conns));
        while upstream.is_some() || conns.is_some() {
            if let Some(rx) = &upstream {
                match rx.try_recv() {
                    Ok(event) => {
                        let _working = task.working();
                        self.handle(event);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => {
                        upstream = None;
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                }
            }
            // A queue whose senders are all gone is never ready again.
            let (never_up, never_conns) = (crossbeam_channel::never(), crossbeam_channel::never());
            select! {
                recv(upstream.as_ref().unwrap_or(&never_up)) -> event => match event {
                    Ok(event) => {
                        let _working = task.working();
                        self.handle(event);
                    }
                    Err(_) => upstream = None,
                },
                recv(conns.as_ref().unwrap_or(&never_conns)) -> event => match event {
                    Ok(event) => {
                        let _working = task.working();
                        self.handle_conn(event);
                    }
                    Err(_) => conns = None,
                },
            }
        }
        debug!("hub stopped");
    }

    fn handle_conn(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::Connect {
                conn,
                feed,
                outbox,
                address,
            } => {
                if self.closing {
                    outbox.close(CloseCode::Away, "server shutting down");
                }
                self.budget.connected(address);
                let (bugs, client) = (BTreeSet::new(), Client::new(outbox));
                let subscriber = Subscriber {
                    feed,
                    address,
                    bugs,
                    client,
                };
                self.subscribers.insert(conn, subscriber);
            }
            // The turn is given back when this arm ends.
            ConnEvent::Command {
                conn,
                request,
                turn,
            } => {
                let started = Instant::now();
                let address = self.subscribers.get_mut(conn).map(|c| c.address);
                // A bug in the parser that one client's input reaches must
                // end that connection, not the hub.
                let (parsed, parsing) = match request {
                    Request::Text(text) => (
                        panic::catch_unwind(|| protocol::parse(&text)),
                        Duration::ZERO,
                    ),
                    Request::Parsed(parsed, took) => (Ok(parsed), took),
                };
                match parsed {
                    Ok(Ok(command)) => self.command(conn, command),
                    Ok(Err(error)) => {
                        if let Some(c) = self.subscribers.get_mut(conn) {
                            c.client.reply(text_frame(protocol::error_reply(&error)));
                        }
                    }
                    Err(payload) => {
                        if let Some(held) = PARSE_PANICS.allow() {
                            warn!(
                                "connection {conn}: parsing its command panicked: {}{held}",
                                crate::shutdown::panic_message(payload.as_ref())
                            );
                        }
                        if let Some(c) = self.subscribers.get_mut(conn) {
                            c.client.outbox().close(CloseCode::Error, "internal error");
                        }
                    }
                }
                let now = Instant::now();
                let spent = now - started + parsing;
                if let Some(address) = address
                    && let Some(at) = self.budget.spent(address, spent, now)
                {
                    turn.not_before(at);
                }
            }
            ConnEvent::Disconnect { conn } => {
                if let Some((slot, c)) = self.subscribers.remove(conn) {
                    self.catchup.left(conn, &c.client);
                    self.budget.left(c.address, c.bugs.len());
                    self.unsubscribe(slot, c.feed, &c.bugs);
                }
            }
        }
    }

    fn handle(&mut self, message: Event) {
        match message {
            Event::Notify { feed, notification } => self.notify(feed, &notification),
            Event::CatchUp(event) => {
                let subscribers = &mut self.subscribers;
                self.catchup.handle(event, |conn| {
                    subscribers.get_mut(conn).map(|c| (c.feed, &mut c.client))
                });
            }
            Event::CloseAll => {
                self.closing = true;
                self.catchup.stop();
                for c in self.subscribers.values() {
                    c.client
                        .outbox()
                        .close(CloseCode::Away, "server shutting down");
                }
            }
        }
    }

    fn command(&mut self, conn: ConnId, command: Command) {
        let Some((slot, c)) = self.subscribers.find_mut(conn) else {
            return;
        };
        // Its answer would go nowhere: a client that was closed for asking
        // faster than it reads must not keep the hub encoding answers.
        if c.client.outbox().is_closing() {
            return;
        }
        match command {
            Command::Version => c.client.reply(text_frame(protocol::version_reply())),
            Command::Subscriptions => {
                let text = protocol::subscriptions_reply("subscriptions", c.bugs.iter().copied());
                c.client.reply(text_frame(text));
            }
            Command::Unsubscribe { bugs } => {
                let gone: BTreeSet<BugId> = bugs.into_iter().filter(|b| c.bugs.remove(b)).collect();
                gone.iter().for_each(|bug| c.client.unsubscribed(*bug));
                let text = protocol::subscriptions_reply("unsubscribe", c.bugs.iter().copied());
                let (feed, address) = (c.feed, c.address);
                self.budget.give_back(address, gone.len());
                self.unsubscribe(slot, feed, &gone);
                // Answered once done: a client that then reads `/metrics`
                // sees its subscriptions gone.
                if let Some(c) = self.subscribers.at_mut(slot) {
                    c.client.reply(text_frame(text));
                }
            }
            Command::Subscribe { bugs, since } => {
                let new: BTreeSet<BugId> = bugs
                    .iter()
                    .copied()
                    .filter(|b| !c.bugs.contains(b))
                    .collect();
                let refused = if c.bugs.len() + new.len() > self.max_subscriptions {
                    Err(self.max_subscriptions)
                } else {
                    self.budget.take(c.address, new.len())
                };
                if let Err(limit) = refused {
                    let error = ProtocolError::too_many_subscriptions("subscribe", limit);
                    c.client.reply(text_frame(protocol::error_reply(&error)));
                    return;
                }
                if c.bugs.is_empty() {
                    // A copy of a set built whole from sorted ids has full
                    // nodes; inserting one id at a time leaves them about
                    // half empty, for the connection's whole life.
                    c.bugs.clone_from(&new);
                } else {
                    c.bugs.extend(new.iter().copied());
                }
                let feed = c.feed;
                for (i, bug) in new.iter().enumerate() {
                    self.feeds[feed].insert(*bug, slot);
                    self.between_slices(i);
                }
                self.metrics
                    .subscriptions
                    .fetch_add(new.len() as u64, Ordering::Relaxed);
                // Still there: only a connection's own events remove it.
                if let Some(c) = self.subscribers.at_mut(slot) {
                    self.catchup
                        .subscribe(conn, &mut c.client, feed, &c.bugs, bugs, since);
                }
            }
        }
    }

    fn unsubscribe(&mut self, slot: Slot, feed: FeedId, bugs: &BTreeSet<BugId>) {
        for (i, bug) in bugs.iter().enumerate() {
            self.feeds[feed].remove(*bug, slot);
            self.between_slices(i);
        }
        self.metrics
            .subscriptions
            .fetch_sub(bugs.len() as u64, Ordering::Relaxed);
    }

    /// After every [`SLICE`]th step (`i`) of a big command: handles what
    /// came from the feeds meanwhile, so that an update waits for a slice,
    /// not the whole command. Such an update reaches the command's own
    /// connection if the bug is in the index by then, as if it had come
    /// just before or after the command.
    fn between_slices(&mut self, i: usize) {
        if !(i + 1).is_multiple_of(SLICE) {
            return;
        }
        let Some(upstream) = self.upstream.take() else {
            return;
        };
        while let Ok(event) = upstream.try_recv() {
            self.handle(event);
        }
        self.upstream = Some(upstream);
    }

    fn notify(&mut self, feed: FeedId, notification: &Notification) {
        if !self.catchup.arrived(feed, notification) {
            return;
        }
        self.metrics.received(&notification.when);
        // Encoded once, and only for a bug someone follows.
        let mut frame: Option<Bytes> = None;
        let mut sent = 0;
        let (subscribers, limit) = (&mut self.subscribers, self.outbound_queue);
        self.feeds[feed].for_each(notification.bug, |slot| {
            let frame = frame.get_or_insert_with(|| text_frame(protocol::update(notification)));
            if let Some(c) = subscribers.at_mut(slot)
                && c.client.update(notification, Arc::clone(frame), limit)
            {
                sent += 1;
            }
        });
        self.metrics
            .notifications_out
            .fetch_add(sent, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::n;
    use crate::protocol::Since;

    use crate::outbox::Writers;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A catch-up database's answer of `updates`, from a database that
    /// holds every change the tests send (none is later than 2026).
    fn primary(updates: Vec<Notification>) -> catchup::Answer {
        catchup::Answer {
            updates,
            newest: Moment::parse("2026-12-31T00:00:00"),
        }
    }

    /// A hub with one connection whose frames arrive on the returned
    /// socket, and the catch-up jobs it sends.
    fn hub_with_client(writers: &Writers) -> (Hub, TcpStream, Receiver<catchup::Job>) {
        let metrics = Arc::new(Metrics::new("database", 1, Default::default()));
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(4);
        let mut hub = Hub::new(
            HubConfig {
                feeds: 1,
                max_subscriptions: 100,
                budget: Budget::new(1000, 1, 1),
                outbound_queue: 100,
                catchup: CatchUp::new(1, 100, Some(jobs_tx)),
            },
            metrics,
        );
        let client = connect(&mut hub, writers, 1);
        (hub, client, jobs_rx)
    }

    /// Connects `conn` to `hub`; its frames arrive on the returned socket.
    fn connect(hub: &mut Hub, writers: &Writers, conn: ConnId) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let outbox = Outbox::new(Arc::new(server), 100, writers, Arc::clone(&hub.metrics));
        hub.handle_conn(ConnEvent::Connect {
            conn,
            feed: 0,
            outbox,
            address: ClientAddress::of([127, 0, 0, 1].into()),
        });
        client
    }

    fn command(hub: &mut Hub, conn: ConnId, text: &str) {
        hub.handle_conn(ConnEvent::Command {
            conn,
            request: Request::new(text.into()),
            turn: Turns::default().take(|| false).expect("a turn"),
        });
    }

    /// Sends connection 1's subscribe command to `hub`.
    fn subscribe(hub: &mut Hub, bugs: Vec<BugId>, since: Option<Since>) {
        let text = serde_json::json!({
            "command": "subscribe",
            "bugs": bugs.iter().map(|b| b.get()).collect::<Vec<_>>(),
            "since": since.as_ref().map(Since::as_str),
        });
        command(hub, 1, &text.to_string());
    }

    /// Reads `count` unmasked text frames (short ones: 7-bit lengths).
    fn read_texts(client: &mut TcpStream, count: usize) -> Vec<serde_json::Value> {
        (0..count)
            .map(|_| {
                let mut head = [0u8; 2];
                client.read_exact(&mut head).expect("a frame head");
                let mut len = usize::from(head[1] & 0x7f);
                if len == 126 {
                    let mut ext = [0u8; 2];
                    client.read_exact(&mut ext).expect("a length");
                    len = usize::from(u16::from_be_bytes(ext));
                }
                let mut body = vec![0u8; len];
                client.read_exact(&mut body).expect("a frame body");
                serde_json::from_slice(&body).expect("JSON")
            })
            .collect()
    }

    #[test]
    fn live_updates_wait_for_a_database_catch_up_and_only_its_own_pairs_are_not_repeated() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, mut client, jobs) = hub_with_client(&writers);
        let bugs = vec![BugId::new(5).expect("5"), BugId::new(6).expect("6")];
        let since = Since::parse("2026-01-01T00:00:00").expect("since");
        subscribe(&mut hub, bugs, Some(since));
        let job = jobs
            .try_recv()
            .expect("the cache cannot vouch: the database is asked");
        assert_eq!(job.conn, 1);
        // Meanwhile: bug 5 at a time the database answer will cover, bug 6
        // at a time later than the database's, and a command.
        hub.handle(Event::Notify {
            feed: 0,
            notification: n(5, "2026-01-01T00:00:05"),
        });
        hub.handle(Event::Notify {
            feed: 0,
            notification: n(6, "2026-01-01T00:00:09"),
        });
        command(&mut hub, 1, r#"{"command":"version"}"#);
        hub.handle(Event::CatchUp(catchup::Event::Answered {
            conn: 1,
            updates: Some(primary(vec![
                n(6, "2026-01-01T00:00:03"),
                n(5, "2026-01-01T00:00:07"),
            ])),
        }));
        let frames = read_texts(&mut client, 6);
        assert_eq!(
            frames[0],
            serde_json::json!({"command": "subscribe", "result": "ok", "bugs": [5, 6]})
        );
        assert_eq!(frames[1]["bug"], 6);
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:03");
        assert_eq!(frames[2]["bug"], 5);
        assert_eq!(frames[2]["when"], "2026-01-01T00:00:07");
        // Bug 5 at :05 is earlier than the answer's :07 but a pair the
        // client never had: sent, in the order the hub received it.
        assert_eq!(frames[3]["bug"], 5);
        assert_eq!(frames[3]["when"], "2026-01-01T00:00:05");
        assert_eq!(frames[4]["bug"], 6);
        assert_eq!(frames[4]["when"], "2026-01-01T00:00:09");
        assert_eq!(frames[5]["command"], "version");
    }

    #[test]
    fn the_live_copy_of_a_pair_a_database_catch_up_gave_is_not_repeated() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, mut client, jobs) = hub_with_client(&writers);
        subscribe(
            &mut hub,
            vec![BugId::new(5).expect("5")],
            Since::parse("2026-01-01T00:00:00"),
        );
        assert!(jobs.try_recv().is_ok());
        // The database is ahead of the live stream: it answers :07 while
        // :05 and :07 are still in the broker's queue.
        hub.handle(Event::CatchUp(catchup::Event::Answered {
            conn: 1,
            updates: Some(primary(vec![n(5, "2026-01-01T00:00:07")])),
        }));
        for when in [
            "2026-01-01T00:00:05",
            "2026-01-01T00:00:07",
            "2026-01-01T00:00:09",
        ] {
            hub.handle(Event::Notify {
                feed: 0,
                notification: n(5, when),
            });
        }
        command(&mut hub, 1, r#"{"command":"version"}"#);
        let frames = read_texts(&mut client, 5);
        assert_eq!(frames[0]["command"], "subscribe");
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:07");
        // :05 is a pair the client never had; :07's live copy is dropped.
        assert_eq!(frames[2]["when"], "2026-01-01T00:00:05");
        assert_eq!(frames[3]["when"], "2026-01-01T00:00:09");
        assert_eq!(frames[4]["command"], "version");
    }

    #[test]
    fn a_second_catch_up_waits_behind_the_first_instead_of_answering_partial() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, mut client, jobs) = hub_with_client(&writers);
        let since = Since::parse("2026-01-01T00:00:00");
        subscribe(&mut hub, vec![BugId::new(5).expect("5")], since.clone());
        command(&mut hub, 1, r#"{"command":"version"}"#);
        subscribe(&mut hub, vec![BugId::new(6).expect("6")], since);
        assert_eq!(
            jobs.try_iter().count(),
            2,
            "both catch-ups go to the database"
        );
        hub.handle(Event::Notify {
            feed: 0,
            notification: n(6, "2026-01-01T00:00:08"),
        });
        hub.handle(Event::CatchUp(catchup::Event::Answered {
            conn: 1,
            updates: Some(primary(vec![n(5, "2026-01-01T00:00:07")])),
        }));
        hub.handle(Event::CatchUp(catchup::Event::Answered {
            conn: 1,
            updates: Some(primary(vec![n(6, "2026-01-01T00:00:03")])),
        }));
        let frames = read_texts(&mut client, 6);
        assert_eq!(
            frames[0],
            serde_json::json!({"command": "subscribe", "result": "ok", "bugs": [5]})
        );
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:07");
        assert_eq!(frames[2]["command"], "version");
        assert_eq!(
            frames[3],
            serde_json::json!({"command": "subscribe", "result": "ok", "bugs": [5, 6]})
        );
        assert_eq!(frames[4]["when"], "2026-01-01T00:00:03");
        assert_eq!(frames[5]["when"], "2026-01-01T00:00:08");
    }

    #[test]
    fn a_failed_catch_up_answers_partial_from_the_cache_without_repeats() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, mut client, jobs) = hub_with_client(&writers);
        subscribe(
            &mut hub,
            vec![BugId::new(5).expect("5")],
            Since::parse("2026-01-01T00:00:00"),
        );
        assert!(jobs.try_recv().is_ok());
        hub.handle(Event::Notify {
            feed: 0,
            notification: n(5, "2026-01-01T00:00:04"),
        });
        hub.handle(Event::Notify {
            feed: 0,
            notification: n(5, "2026-01-01T00:00:05"),
        });
        hub.handle(Event::CatchUp(catchup::Event::Answered {
            conn: 1,
            updates: None,
        }));
        let frames = read_texts(&mut client, 3);
        assert_eq!(frames[0]["partial"], true);
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:04");
        assert_eq!(frames[2]["when"], "2026-01-01T00:00:05");
        // Nothing more: the held copies of :04 and :05 were not repeated.
        command(&mut hub, 1, r#"{"command":"version"}"#);
        assert_eq!(read_texts(&mut client, 1)[0]["command"], "version");
    }

    #[test]
    fn an_earlier_time_is_delivered_and_only_a_delivered_pair_is_dropped() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, mut client, _jobs) = hub_with_client(&writers);
        subscribe(&mut hub, vec![BugId::new(5).expect("5")], None);
        for when in [
            "2026-01-01T00:00:09",
            "2026-01-01T00:00:05",
            "2026-01-01T00:00:09",
            "2026-01-01 00:00:05",
        ] {
            hub.handle(Event::Notify {
                feed: 0,
                notification: n(5, when),
            });
        }
        command(&mut hub, 1, r#"{"command":"version"}"#);
        let frames = read_texts(&mut client, 4);
        assert_eq!(frames[0]["result"], "ok");
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:09");
        // :05 came after :09: a new pair (a clock went back), delivered.
        assert_eq!(frames[2]["when"], "2026-01-01T00:00:05");
        // The repeats of :09 and of :05 (in another spelling) were
        // already delivered on the feed: dropped.
        assert_eq!(frames[3]["command"], "version");
    }

    /// One client's queued commands never hold an update up: the feeds'
    /// queue comes first, so the victim's update goes out before even its
    /// own command that was queued earlier.
    #[test]
    fn an_update_goes_before_every_command_waiting() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, mut victim, _jobs) = hub_with_client(&writers);
        let _abuser = connect(&mut hub, &writers, 2);
        command(&mut hub, 1, r#"{"command":"subscribe","bugs":[5]}"#);
        let (upstream_tx, upstream_rx) = crossbeam_channel::bounded(4);
        let (conns_tx, conns_rx) = crossbeam_channel::bounded(64);
        let big =
            serde_json::json!({"command": "subscribe", "bugs": (10..60).collect::<Vec<u32>>()});
        let unsubscribe =
            serde_json::json!({"command": "unsubscribe", "bugs": (10..60).collect::<Vec<u32>>()});
        for i in 0..30 {
            let text = if i % 2 == 0 { &big } else { &unsubscribe };
            let turn = Turns::default().take(|| false).expect("a turn");
            let request = Request::new(text.to_string());
            let conn = 2;
            conns_tx
                .send(ConnEvent::Command {
                    conn,
                    request,
                    turn,
                })
                .expect("queued");
        }
        let turn = Turns::default().take(|| false).expect("a turn");
        let request = Request::new(r#"{"command":"version"}"#.into());
        conns_tx
            .send(ConnEvent::Command {
                conn: 1,
                request,
                turn,
            })
            .expect("queued");
        let notification = n(5, "2026-01-01T00:00:05");
        upstream_tx
            .send(Event::Notify {
                feed: 0,
                notification,
            })
            .expect("queued");
        drop((upstream_tx, conns_tx));
        hub.run(upstream_rx, conns_rx);
        let frames = read_texts(&mut victim, 3);
        assert_eq!(frames[0]["command"], "subscribe");
        assert_eq!(frames[1]["command"], "update");
        assert_eq!(frames[2]["command"], "version");
    }

    #[test]
    fn a_connection_in_the_slot_of_one_that_left_gets_none_of_its_bugs() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, _first, _jobs) = hub_with_client(&writers);
        let mut third = connect(&mut hub, &writers, 3);
        // Bug 5 has one follower, bug 6 two: both kinds of index entry.
        command(&mut hub, 1, r#"{"command":"subscribe","bugs":[5,6]}"#);
        command(&mut hub, 3, r#"{"command":"subscribe","bugs":[6]}"#);
        hub.handle_conn(ConnEvent::Disconnect { conn: 1 });
        // Connection 2 takes the slot connection 1 left.
        let mut second = connect(&mut hub, &writers, 2);
        command(&mut hub, 2, r#"{"command":"subscribe","bugs":[7]}"#);
        for bug in [5, 6, 7] {
            hub.handle(Event::Notify {
                feed: 0,
                notification: n(bug, "2026-01-01T00:00:05"),
            });
        }
        command(&mut hub, 2, r#"{"command":"version"}"#);
        command(&mut hub, 3, r#"{"command":"version"}"#);
        let frames = read_texts(&mut second, 3);
        assert_eq!(frames[0]["bugs"], serde_json::json!([7]));
        assert_eq!(frames[1]["bug"], 7);
        assert_eq!(frames[2]["command"], "version");
        let frames = read_texts(&mut third, 3);
        assert_eq!(frames[1]["bug"], 6);
        assert_eq!(frames[2]["command"], "version");
    }
}
