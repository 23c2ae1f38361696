//! The hub: who is subscribed to what, and fan-out.
//!
//! One thread owns the subscription index of every feed (bug → connections,
//! connection → bugs) and the catch-up cache; connection threads and broker
//! consumers talk to it only by [`Event`], never by lock. It parses the
//! clients' commands too, so that parsing leaves nothing on the many
//! connection threads. Each update is
//! encoded to its WebSocket frame once and the same bytes are queued to every
//! subscriber's [`Outbox`]. Replies to a connection's commands are queued
//! here too, so a connection sees its answers, catch-up and live updates in
//! the order the hub handled them. The hub must never block on a client:
//! [`Outbox::push`] doesn't.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::panic;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::cache::{Cache, DatabaseClock, Resumed};
use crate::metrics::Metrics;
use crate::notification::{BugId, ChangeTime, Moment, Notification};
use crate::outbox::{Bytes, Outbox, text_frame};
use crate::poller::Sink;
use crate::protocol::{self, Command, ProtocolError, Since};
use connections::{Connections, Slot};
use index::BugIndex;

mod connections;
mod index;

/// A connection, numbered by the server in accept order.
pub type ConnId = u64;
/// A feed, by its index in the configured feed list.
pub type FeedId = usize;

/// Catch-ups one connection may have on their way to the database; one
/// more is answered from the cache alone. A client asks once per
/// (re)connection; this bounds what one client can make the hub queue.
pub const CATCH_UPS_PER_CONNECTION: usize = 4;

/// Messages queued for the hub before senders wait: deep enough to absorb a
/// burst from the broker, small enough to bound memory.
pub const HUB_QUEUE: usize = 16 * 1024;

/// What the hub is asked to do.
pub enum Event {
    /// A WebSocket connection on `feed` opened.
    Connect {
        conn: ConnId,
        feed: FeedId,
        outbox: Arc<Outbox>,
    },
    /// A command from `conn`, the text as it came. Parsed here rather than
    /// on the connection's thread: whatever parsing touches (stack pages,
    /// the allocator's per-thread cache) would stay with every idle
    /// connection's thread for its whole life (measured: 3 KiB per
    /// connection at 10 bugs, 6 KiB at 100). Errors are answered in order
    /// with the connection's other replies.
    Command { conn: ConnId, text: String },
    /// The connection ended; forget its subscriptions.
    Disconnect { conn: ConnId },
    /// Bug changed: tell the feed's subscribers.
    Notify {
        feed: FeedId,
        notification: Notification,
    },
    /// The feed's upstream (a broker consumer, the in-process poller) just
    /// started receiving from a point known to be complete: everything
    /// published from `at` on reaches the hub.
    Resumed { feed: FeedId, at: Resumed },
    /// The catch-up database's clock runs at most `ahead` seconds ahead of
    /// this host's (negative: behind), measured when it connected.
    DatabaseClock { ahead: i64 },
    /// The database's answer to a catch-up; `None` if it failed.
    CaughtUp {
        conn: ConnId,
        updates: Option<Vec<Notification>>,
    },
    /// The watchdog asks whether the hub still handles messages.
    Heartbeat,
    /// Shutdown: close every connection with 1001 (going away).
    CloseAll,
}

/// Sends messages to the hub.
pub type HubSender = Sender<Event>;

/// One subscription's catch-up request, which the hub sends to the
/// catch-up worker (`catchup`) when its cache cannot vouch for
/// `since`; the answer comes back as an [`Event`].
pub struct CatchUpJob {
    pub conn: ConnId,
    pub bugs: Vec<BugId>,
    pub since: Since,
}

/// The hub as the poller's [`Sink`] (`bzpush run`): a notification is
/// handed over once it is in the hub's queue.
pub struct HubSink {
    pub hub: HubSender,
    pub feed: FeedId,
    pub metrics: Arc<Metrics>,
}

/// The hub has stopped: only during shutdown.
#[derive(Debug)]
pub struct HubGone;

impl fmt::Display for HubGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the hub has stopped")
    }
}

impl Sink for HubSink {
    type Error = HubGone;
    /// The hub holds a batch as soon as it is sent.
    type Pending = ();

    fn describe(&self) -> (&'static str, String) {
        ("hub", "in-process".to_string())
    }

    fn settle(&mut self, (): ()) -> Result<(), HubGone> {
        Ok(())
    }

    /// Another poller may have taken changes while this one had no lock:
    /// the cache vouches only for what is stamped after `database_now`,
    /// on the database's clock, whatever this host's says.
    fn activated(&mut self, database_now: Option<Moment>) {
        // Only fails during shutdown, when nobody asks the cache any more.
        let _ = self.hub.send(Event::Resumed {
            feed: self.feed,
            at: Resumed::Database(database_now),
        });
    }

    /// Changes may now reach another process's hub and never this one:
    /// the cache vouches for nothing until this poller takes the lock
    /// again.
    fn deactivated(&mut self) {
        let _ = self.hub.send(Event::Resumed {
            feed: self.feed,
            at: Resumed::Database(None),
        });
    }

    fn send(&mut self, batch: &[Notification]) -> Result<(), HubGone> {
        for notification in batch {
            let message = Event::Notify {
                feed: self.feed,
                notification: notification.clone(),
            };
            self.hub.send(message).map_err(|_| HubGone)?;
            self.metrics
                .notifications_in
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

struct Subscriber {
    feed: FeedId,
    outbox: Arc<Outbox>,
    bugs: BTreeSet<BugId>,
    /// Database catch-ups on their way, oldest first: everything for this
    /// connection waits in the last one, so the client still sees answer,
    /// catch-up, then live, in the order it asked. At most
    /// [`CATCH_UPS_PER_CONNECTION`].
    held: VecDeque<Held>,
    /// The pair a database catch-up answer gave each bug. The database is
    /// ahead of the live stream: the same pair may still be on its way (not
    /// yet polled, or in the broker's queue), and is not sent twice. Any
    /// other pair of the bug, earlier or later, is new and is sent. Bounded
    /// by the connection's subscriptions.
    answered: HashMap<BugId, ChangeTime>,
}

/// What waits for a database catch-up.
struct Held {
    /// The subscribe answer's list, as it was when the command came.
    subscribed: Vec<BugId>,
    /// What to answer from the cache if the database cannot.
    asked: HashSet<BugId>,
    since: Since,
    /// What came meanwhile, in order.
    waiting: Vec<Waiting>,
}

/// A frame held for a catch-up.
enum Waiting {
    Reply(Bytes),
    /// A live update, kept with its notification so that the very pair
    /// the catch-up answer gave is not sent again.
    Update(Notification, Bytes),
}

impl Subscriber {
    /// Queues a reply or catch-up frame (never refused for being many).
    fn reply(&mut self, frame: Bytes) {
        match self.held.back_mut() {
            Some(held) => held.waiting.push(Waiting::Reply(frame)),
            None => self.outbox.push_reply(frame),
        }
    }

    /// Queues a live update; `false` if the client is too slow for it, or
    /// a catch-up answer already gave it this very pair.
    fn update(&mut self, notification: &Notification, frame: Bytes, limit: usize) -> bool {
        if self.held.is_empty() && self.already_answered(notification) {
            return false;
        }
        match self.held.back_mut() {
            Some(held) if held.waiting.len() >= limit => {
                self.outbox
                    .close(CloseCode::Policy, "too slow: outbound queue full");
                false
            }
            Some(held) => {
                held.waiting
                    .push(Waiting::Update(notification.clone(), frame));
                true
            }
            None => self.outbox.push(frame),
        }
    }

    /// Whether a catch-up answer gave this very pair; forgets it then, as
    /// its live copy comes only once.
    fn already_answered(&mut self, notification: &Notification) -> bool {
        if self.answered.get(&notification.bug) == Some(&notification.when) {
            self.answered.remove(&notification.bug);
            return true;
        }
        false
    }
}

struct Feed {
    subscribers: BugIndex,
    cache: Cache,
}

/// The hub's state; [`Hub::run`] is its thread.
pub struct Hub {
    feeds: Vec<Feed>,
    subscribers: Connections<Subscriber>,
    max_subscriptions: usize,
    outbound_queue: usize,
    /// Where to send catch-ups the cache cannot answer, if anywhere.
    catchup: Option<Sender<CatchUpJob>>,
    /// Catch-up jobs the worker had no room for yet, oldest first: at most
    /// [`CATCH_UPS_PER_CONNECTION`] per connection, so bounded by the
    /// connection limit.
    unsent: VecDeque<CatchUpJob>,
    metrics: Arc<Metrics>,
}

/// How the hub is set up.
pub struct HubConfig {
    pub feeds: usize,
    pub cache_size: usize,
    pub max_subscriptions: usize,
    pub outbound_queue: usize,
    pub catchup: Option<Sender<CatchUpJob>>,
}

impl Hub {
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Hub {
        // With a catch-up database, its clock is measured when it connects
        // (`catchup`); without one, it is assumed to be on UTC.
        let clock = if config.catchup.is_some() {
            DatabaseClock::Awaited
        } else {
            DatabaseClock::AssumedUtc
        };
        Hub {
            feeds: (0..config.feeds)
                .map(|_| Feed {
                    subscribers: BugIndex::default(),
                    cache: Cache::new(config.cache_size, clock),
                })
                .collect(),
            subscribers: Connections::default(),
            max_subscriptions: config.max_subscriptions,
            outbound_queue: config.outbound_queue,
            catchup: config.catchup,
            unsent: VecDeque::new(),
            metrics,
        }
    }

    /// Handles messages until every sender is gone.
    pub fn run(mut self, messages: Receiver<Event>) {
        for message in messages {
            self.handle(message);
        }
        debug!("hub stopped");
    }

    fn handle(&mut self, message: Event) {
        self.metrics.beat(&self.metrics.hub_beat);
        match message {
            Event::Heartbeat => {}
            Event::Connect { conn, feed, outbox } => {
                self.subscribers.insert(
                    conn,
                    Subscriber {
                        feed,
                        outbox,
                        bugs: BTreeSet::new(),
                        held: VecDeque::new(),
                        answered: HashMap::new(),
                    },
                );
            }
            Event::Command { conn, text } => {
                // A bug in the parser that one client's input reaches must
                // end that connection, not the hub: it ran on the
                // connection's own thread before, where it was contained.
                match panic::catch_unwind(|| protocol::parse(&text)) {
                    Ok(Ok(command)) => self.command(conn, command),
                    Ok(Err(error)) => self.reply(conn, protocol::error_reply(&error)),
                    Err(payload) => {
                        warn!(
                            "connection {conn}: parsing its command panicked: {}",
                            crate::shutdown::panic_message(payload.as_ref())
                        );
                        if let Some(c) = self.subscribers.get(conn) {
                            c.outbox.close(CloseCode::Error, "internal error");
                        }
                    }
                }
            }
            Event::Disconnect { conn } => {
                if let Some((slot, c)) = self.subscribers.remove(conn) {
                    if !c.held.is_empty() {
                        self.unsent.retain(|job| job.conn != conn);
                    }
                    self.unsubscribe(slot, c.feed, &c.bugs);
                }
            }
            Event::Notify { feed, notification } => self.notify(feed, &notification),
            Event::CaughtUp { conn, updates } => self.caught_up(conn, updates),
            Event::Resumed { feed, at } => {
                if let Some(f) = self.feeds.get_mut(feed) {
                    f.cache.resume(at);
                }
            }
            Event::DatabaseClock { ahead } => {
                for f in &mut self.feeds {
                    f.cache.database_clock(ahead);
                }
            }
            Event::CloseAll => {
                // The catch-up worker holds a sender to the hub: let it
                // end, so that the hub can.
                self.catchup = None;
                self.unsent.clear();
                for c in self.subscribers.values() {
                    c.outbox.close(CloseCode::Away, "server shutting down");
                }
            }
        }
    }

    fn reply(&mut self, conn: ConnId, text: String) {
        if let Some(c) = self.subscribers.get_mut(conn) {
            c.reply(text_frame(text));
        }
    }

    fn command(&mut self, conn: ConnId, command: Command) {
        let Some((slot, c)) = self.subscribers.find_mut(conn) else {
            return;
        };
        // Its answer would go nowhere: a client that was closed for asking
        // faster than it reads must not keep the hub encoding answers.
        if c.outbox.is_closing() {
            return;
        }
        match command {
            Command::Version => {
                let text = protocol::version_reply();
                self.reply(conn, text);
            }
            Command::Subscriptions => {
                let text = protocol::subscriptions_reply("subscriptions", c.bugs.iter().copied());
                self.reply(conn, text);
            }
            Command::Unsubscribe { bugs } => {
                let feed = c.feed;
                let gone: BTreeSet<BugId> = bugs.into_iter().filter(|b| c.bugs.remove(b)).collect();
                for bug in &gone {
                    c.answered.remove(bug);
                }
                let text = protocol::subscriptions_reply("unsubscribe", c.bugs.iter().copied());
                self.unsubscribe(slot, feed, &gone);
                self.reply(conn, text);
            }
            Command::Subscribe { bugs, since } => {
                let new: BTreeSet<BugId> = bugs
                    .iter()
                    .copied()
                    .filter(|b| !c.bugs.contains(b))
                    .collect();
                if c.bugs.len() + new.len() > self.max_subscriptions {
                    let error =
                        ProtocolError::too_many_subscriptions("subscribe", self.max_subscriptions);
                    self.reply(conn, protocol::error_reply(&error));
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
                let feed = &mut self.feeds[c.feed];
                for bug in &new {
                    feed.subscribers.insert(*bug, slot);
                }
                self.metrics
                    .subscriptions
                    .fetch_add(new.len() as u64, Ordering::Relaxed);
                let Some(since) = since else {
                    c.reply(text_frame(protocol::subscribe_reply(
                        c.bugs.iter().copied(),
                        false,
                    )));
                    return;
                };
                let asked: HashSet<BugId> = bugs.into_iter().collect();
                if feed
                    .cache
                    .complete_since(&since, Moment::from_system(SystemTime::now()))
                {
                    c.reply(text_frame(protocol::subscribe_reply(
                        c.bugs.iter().copied(),
                        false,
                    )));
                    for update in feed.cache.since(&asked, &since) {
                        c.reply(text_frame(protocol::update(update)));
                    }
                    return;
                }
                let job = CatchUpJob {
                    conn,
                    bugs: asked.iter().copied().collect(),
                    since: since.clone(),
                };
                let held = Held {
                    subscribed: c.bugs.iter().copied().collect(),
                    asked,
                    since,
                    waiting: Vec::new(),
                };
                match &self.catchup {
                    // Jobs the worker has no room for wait here, in order:
                    // a storm of reconnecting clients is answered late,
                    // never `partial` for being many.
                    Some(_) if c.held.len() < CATCH_UPS_PER_CONNECTION => {
                        c.held.push_back(held);
                        self.unsent.push_back(job);
                        self.hand_over();
                    }
                    _ => answer_from_cache(c, &feed.cache, held),
                }
            }
        }
    }

    /// Hands waiting catch-up jobs to the worker while it has room.
    fn hand_over(&mut self) {
        let Some(catchup) = &self.catchup else {
            return;
        };
        while let Some(job) = self.unsent.pop_front() {
            match catchup.try_send(job) {
                Ok(()) => {}
                // Room comes back as the worker answers (`CaughtUp`).
                Err(TrySendError::Full(job)) => {
                    self.unsent.push_front(job);
                    return;
                }
                // The worker ended: only at shutdown.
                Err(TrySendError::Disconnected(_)) => {
                    self.unsent.clear();
                    return;
                }
            }
        }
    }

    /// The database answered a catch-up: release what was held.
    fn caught_up(&mut self, conn: ConnId, updates: Option<Vec<Notification>>) {
        // The worker took jobs from its queue: there is room for more.
        self.hand_over();
        let Some(c) = self.subscribers.get_mut(conn) else {
            return;
        };
        let Some(held) = c.held.pop_front() else {
            return;
        };
        // The oldest catch-up: everything before it is out, so its answer
        // and what it held go straight to the client, not behind the
        // catch-ups still on their way.
        let later = std::mem::take(&mut c.held);
        match updates {
            Some(updates) => {
                c.reply(text_frame(protocol::subscribe_reply(
                    held.subscribed.iter().copied(),
                    false,
                )));
                for update in &updates {
                    c.reply(text_frame(protocol::update(update)));
                }
                release(c, held.waiting, updates.iter());
            }
            None => answer_from_cache(c, &self.feeds[c.feed].cache, held),
        }
        c.held = later;
    }

    fn unsubscribe(&mut self, slot: Slot, feed: FeedId, bugs: &BTreeSet<BugId>) {
        let subscribers = &mut self.feeds[feed].subscribers;
        for bug in bugs {
            subscribers.remove(*bug, slot);
        }
        self.metrics
            .subscriptions
            .fetch_sub(bugs.len() as u64, Ordering::Relaxed);
    }

    fn notify(&mut self, feed: FeedId, notification: &Notification) {
        let Some(f) = self.feeds.get_mut(feed) else {
            return;
        };
        if !f
            .cache
            .add(notification, Moment::from_system(SystemTime::now()))
        {
            debug!(
                "dropping a duplicate: bug {} at {} was already delivered",
                notification.bug, notification.when
            );
            return;
        }
        // Encoded once, and only for a bug someone follows.
        let mut frame: Option<Bytes> = None;
        let mut sent = 0;
        let (subscribers, limit) = (&mut self.subscribers, self.outbound_queue);
        f.subscribers.for_each(notification.bug, |slot| {
            let frame = frame.get_or_insert_with(|| text_frame(protocol::update(notification)));
            if let Some(c) = subscribers.at_mut(slot)
                && c.update(notification, Arc::clone(frame), limit)
            {
                sent += 1;
            }
        });
        self.metrics
            .notifications_out
            .fetch_add(sent, Ordering::Relaxed);
    }
}

/// Answers a `since` from the cache alone: `partial` unless the cache can
/// vouch for it. Then releases whatever was held.
fn answer_from_cache(c: &mut Subscriber, cache: &Cache, held: Held) {
    let partial = !cache.complete_since(&held.since, Moment::from_system(SystemTime::now()));
    c.reply(text_frame(protocol::subscribe_reply(
        held.subscribed.iter().copied(),
        partial,
    )));
    let answer = cache.since(&held.asked, &held.since);
    for update in &answer {
        c.reply(text_frame(protocol::update(update)));
    }
    release(c, held.waiting, answer.into_iter());
}

/// Queues what was held, in its order, except live copies of pairs the
/// catch-up `answer` already gave. The answer's latest pair per bug stays
/// with the connection for a live copy still on its way.
fn release<'a>(
    c: &mut Subscriber,
    waiting: Vec<Waiting>,
    answer: impl Iterator<Item = &'a Notification>,
) {
    let mut given = HashSet::new();
    for n in answer {
        given.insert(n);
        match c.answered.get_mut(&n.bug) {
            Some(time) if n.when > *time => *time = n.when.clone(),
            Some(_) => {}
            None => {
                c.answered.insert(n.bug, n.when.clone());
            }
        }
    }
    for item in waiting {
        match item {
            Waiting::Reply(frame) => c.outbox.push_reply(frame),
            Waiting::Update(n, frame) => {
                if !given.contains(&n) {
                    c.outbox.push(frame);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::n;

    use crate::outbox::Writers;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A hub with one connection whose frames arrive on the returned
    /// socket, and the catch-up jobs it sends.
    fn hub_with_client(writers: &Writers) -> (Hub, TcpStream, Receiver<CatchUpJob>) {
        let metrics = Arc::new(Metrics::new("database", 1));
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(4);
        let mut hub = Hub::new(
            HubConfig {
                feeds: 1,
                cache_size: 100,
                max_subscriptions: 100,
                outbound_queue: 100,
                catchup: Some(jobs_tx),
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
        hub.handle(Event::Connect {
            conn,
            feed: 0,
            outbox,
        });
        client
    }

    fn command(hub: &mut Hub, conn: ConnId, text: &str) {
        hub.handle(Event::Command {
            conn,
            text: text.into(),
        });
    }

    /// Sends connection 1's subscribe command to `hub`.
    fn subscribe(hub: &mut Hub, bugs: Vec<BugId>, since: Option<Since>) {
        let text = serde_json::json!({
            "command": "subscribe",
            "bugs": bugs.iter().map(|b| b.get()).collect::<Vec<_>>(),
            "since": since.as_ref().map(Since::as_str),
        });
        hub.handle(Event::Command {
            conn: 1,
            text: text.to_string(),
        });
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
        hub.handle(Event::Command {
            conn: 1,
            text: r#"{"command":"version"}"#.into(),
        });
        hub.handle(Event::CaughtUp {
            conn: 1,
            updates: Some(vec![
                n(6, "2026-01-01T00:00:03"),
                n(5, "2026-01-01T00:00:07"),
            ]),
        });
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
        hub.handle(Event::CaughtUp {
            conn: 1,
            updates: Some(vec![n(5, "2026-01-01T00:00:07")]),
        });
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
        hub.handle(Event::Command {
            conn: 1,
            text: r#"{"command":"version"}"#.into(),
        });
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
        hub.handle(Event::Command {
            conn: 1,
            text: r#"{"command":"version"}"#.into(),
        });
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
        hub.handle(Event::CaughtUp {
            conn: 1,
            updates: Some(vec![n(5, "2026-01-01T00:00:07")]),
        });
        hub.handle(Event::CaughtUp {
            conn: 1,
            updates: Some(vec![n(6, "2026-01-01T00:00:03")]),
        });
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
        hub.handle(Event::CaughtUp {
            conn: 1,
            updates: None,
        });
        let frames = read_texts(&mut client, 3);
        assert_eq!(frames[0]["partial"], true);
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:04");
        assert_eq!(frames[2]["when"], "2026-01-01T00:00:05");
        // Nothing more: the held copies of :04 and :05 were not repeated.
        hub.handle(Event::Command {
            conn: 1,
            text: r#"{"command":"version"}"#.into(),
        });
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
        hub.handle(Event::Command {
            conn: 1,
            text: r#"{"command":"version"}"#.into(),
        });
        let frames = read_texts(&mut client, 4);
        assert_eq!(frames[0]["result"], "ok");
        assert_eq!(frames[1]["when"], "2026-01-01T00:00:09");
        // :05 came after :09: a new pair (a clock went back), delivered.
        assert_eq!(frames[2]["when"], "2026-01-01T00:00:05");
        // The repeats of :09 and of :05 (in another spelling) were
        // already delivered on the feed: dropped.
        assert_eq!(frames[3]["command"], "version");
    }

    #[test]
    fn a_connection_in_the_slot_of_one_that_left_gets_none_of_its_bugs() {
        let writers = Writers::start(&crate::shutdown::channel().1).expect("writers");
        let (mut hub, _first, _jobs) = hub_with_client(&writers);
        let mut third = connect(&mut hub, &writers, 3);
        // Bug 5 has one follower, bug 6 two: both kinds of index entry.
        command(&mut hub, 1, r#"{"command":"subscribe","bugs":[5,6]}"#);
        command(&mut hub, 3, r#"{"command":"subscribe","bugs":[6]}"#);
        hub.handle(Event::Disconnect { conn: 1 });
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
