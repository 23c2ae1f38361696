//! The catch-up room: all that answers `subscribe … since`.
//!
//! A client that subscribes with `since` is owed every update of its bugs
//! with `when >= since`, or `"partial": true`. The room holds each feed's
//! cache and its proof ([`cache`]), what each connection holds back while
//! its catch-ups are on their way ([`client`]), and the worker that asks
//! the database when the cache cannot vouch ([`database`]). Time comes in
//! only as the room's [`Event`]s (a feed's resume, the database's clock,
//! its answers), and whether an answer is complete is decided here alone:
//! the cache's proof, else the database's answer, else `partial`. The room
//! must never claim more than it can prove, never answer `partial` for
//! being busy, never block the hub, and never touch the subscription index.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::SystemTime;

use crossbeam_channel::{Sender, TrySendError};
use log::debug;

use crate::hub::{ConnId, FeedId};
use crate::notification::{BugId, Moment, Notification};
use crate::protocol::Since;
use cache::{Cache, DatabaseClock};
use client::Held;

pub use cache::{CLOCK_MARGIN_SECS, Resumed};
pub use client::Client;
pub use database::Job;

pub mod cache;
pub mod client;
pub mod database;

/// Catch-ups one connection may have on their way to the database; one
/// more is answered from the cache alone. A client asks once per
/// (re)connection; this bounds what one client can make the room queue.
pub const CATCH_UPS_PER_CONNECTION: usize = 4;

/// What the room is told, through the hub's queue.
pub enum Event {
    /// The feed's upstream (a broker consumer, the in-process poller)
    /// receives everything published from `at` on.
    Resumed { feed: FeedId, at: Resumed },
    /// The database's clock runs at most `ahead` seconds ahead of this
    /// host's (negative: behind).
    DatabaseClock { ahead: i64 },
    /// The database's answer to `conn`'s oldest catch-up; `None`: failed.
    Answered {
        conn: ConnId,
        updates: Option<Answer>,
    },
}

/// What the catch-up database answered to one job.
pub struct Answer {
    /// Its bugs changed at or after its `since`, oldest first.
    pub updates: Vec<Notification>,
    /// The newest change the database held when it answered (read before
    /// the rows, so they hold at least that much): a replica that lags
    /// holds less than the live stream brought.
    pub newest: Option<Moment>,
}

/// The room: every feed's cache, and the catch-ups on their way.
pub struct CatchUp {
    /// By [`FeedId`].
    caches: Vec<Cache>,
    /// `None` without a catch-up database, and once shutdown began.
    worker: Option<Sender<Job>>,
    /// Jobs the worker had no room for yet, oldest first: at most
    /// [`CATCH_UPS_PER_CONNECTION`] per connection.
    unsent: VecDeque<Job>,
}

impl CatchUp {
    /// A cache of `cache_size` updates for each of `feeds` feeds; `worker`
    /// takes the catch-ups for the catch-up database, if there is one.
    pub fn new(feeds: usize, cache_size: usize, worker: Option<Sender<Job>>) -> CatchUp {
        let clock = worker
            .as_ref()
            .map_or(DatabaseClock::AssumedUtc, |_| DatabaseClock::Awaited);
        CatchUp {
            caches: (0..feeds).map(|_| Cache::new(cache_size, clock)).collect(),
            worker,
            unsent: VecDeque::new(),
        }
    }

    /// A live update reached `feed`; `false` if the same pair was already
    /// delivered on it (or there is no such feed): drop it.
    pub fn arrived(&mut self, feed: FeedId, notification: &Notification) -> bool {
        let Some(cache) = self.caches.get_mut(feed) else {
            return false;
        };
        let new = cache.add(notification, Moment::from_system(SystemTime::now()));
        if !new {
            let (bug, when) = (notification.bug, &notification.when);
            debug!("dropping a duplicate: bug {bug} at {when} was already delivered");
        }
        new
    }

    /// Answers `conn`'s `subscribe` to `asked` on `feed`, through its
    /// `client`, listing `subscribed` (all its subscriptions). With
    /// `since`: from the cache if it can vouch, else from the database once
    /// it answers (whatever comes for the connection waits meanwhile), else
    /// from the cache, `partial`.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        client: &mut Client,
        feed: FeedId,
        subscribed: &BTreeSet<BugId>,
        asked: Vec<BugId>,
        since: Option<Since>,
    ) {
        let cache = &self.caches[feed];
        let Some(since) = since else {
            client.answer(subscribed.iter().copied(), false, [].into_iter());
            return;
        };
        let asked: HashSet<BugId> = asked.into_iter().collect();
        if cache.complete_since(&since, Moment::from_system(SystemTime::now())) {
            let answer = cache.since(&asked, &since);
            client.answer(subscribed.iter().copied(), false, answer.into_iter());
            return;
        }
        let held = Held {
            subscribed: subscribed.iter().copied().collect(),
            asked,
            since,
            waiting: Vec::new(),
        };
        if self.worker.is_some() && client.held.len() < CATCH_UPS_PER_CONNECTION {
            let (bugs, since) = (held.asked.iter().copied().collect(), held.since.clone());
            self.unsent.push_back(Job { conn, bugs, since });
            client.held.push_back(held);
            self.hand_over();
        } else {
            answer_from_cache(client, cache, held);
        }
    }

    /// Takes in one of the room's own events; `client` finds a connection's
    /// feed and [`Client`], if it is still connected.
    pub fn handle<'a>(
        &mut self,
        event: Event,
        client: impl FnOnce(ConnId) -> Option<(FeedId, &'a mut Client)>,
    ) {
        match event {
            Event::Resumed { feed, at } => {
                if let Some(cache) = self.caches.get_mut(feed) {
                    cache.resume(at);
                }
            }
            Event::DatabaseClock { ahead } => {
                for cache in &mut self.caches {
                    cache.database_clock(ahead);
                }
            }
            Event::Answered { conn, updates } => {
                // The worker took jobs from its queue: there is room for more.
                self.hand_over();
                if let Some((feed, client)) = client(conn)
                    && let Some(held) = client.held.pop_front()
                {
                    // The oldest catch-up: everything before it is out, so
                    // its answer and what it held go straight to the
                    // client, not behind the catch-ups still on their way.
                    let later = std::mem::take(&mut client.held);
                    let cache = &self.caches[feed];
                    match updates {
                        // Read from the source of truth, holding everything
                        // the feed received: complete.
                        Some(answer) if cache.seen_by(answer.newest) => {
                            client.release(held, false, answer.updates.iter());
                        }
                        // A replica behind the live stream: what it has and
                        // what the cache has, and `partial`, as neither can
                        // vouch for the time between.
                        Some(answer) => {
                            debug!(
                                "the catch-up database's newest change is older than one \
                                 already received: it lags (a replica?); answering partial"
                            );
                            let mut merged = answer.updates;
                            for n in cache.since(&held.asked, &held.since) {
                                if !merged.contains(n) {
                                    merged.push(n.clone());
                                }
                            }
                            merged.sort_by(|a, b| a.when.cmp(&b.when));
                            client.release(held, true, merged.iter());
                        }
                        None => answer_from_cache(client, cache, held),
                    }
                    client.held = later;
                }
            }
        }
    }

    /// `conn` left: its catch-ups not yet sent to the worker are dropped
    /// (those sent are answered to nobody).
    pub fn left(&mut self, conn: ConnId, client: &Client) {
        if !client.held.is_empty() {
            self.unsent.retain(|job| job.conn != conn);
        }
    }

    /// Shutdown: lets the worker, which holds a sender to the hub, end, so
    /// that the hub can.
    pub fn stop(&mut self) {
        self.worker = None;
        self.unsent.clear();
    }

    /// Hands waiting jobs to the worker while it has room.
    fn hand_over(&mut self) {
        let Some(worker) = &self.worker else {
            return;
        };
        while let Some(job) = self.unsent.pop_front() {
            match worker.try_send(job) {
                Ok(()) => {}
                // Room comes back as the worker answers (`Answered`).
                Err(TrySendError::Full(job)) => return self.unsent.push_front(job),
                // The worker ended: only at shutdown.
                Err(TrySendError::Disconnected(_)) => return self.unsent.clear(),
            }
        }
    }
}

/// Answers `held` from the cache alone: `partial` unless the cache can
/// vouch for it. Then releases whatever was held.
fn answer_from_cache(client: &mut Client, cache: &Cache, held: Held) {
    let partial = !cache.complete_since(&held.since, Moment::from_system(SystemTime::now()));
    let answer = cache.since(&held.asked, &held.since);
    client.release(held, partial, answer.into_iter());
}
