//! A connection as the catch-up room sees it. Every frame for it passes
//! through its [`Client`], which holds them behind its catch-ups on their
//! way to the database, so that it sees answer, catch-up, then live, in the
//! order it asked; and remembers the pairs a database answer gave it. The
//! hub only queues frames through it. It must never wait for a client:
//! [`Outbox`] doesn't.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tungstenite::protocol::frame::coding::CloseCode;

use crate::notification::{BugId, ChangeTime, Notification};
use crate::outbox::{Bytes, Outbox, text_frame};
use crate::protocol::{self, Since};

/// One connection's way out.
pub struct Client {
    outbox: Arc<Outbox>,
    /// Database catch-ups on their way, oldest first: everything for this
    /// connection waits in the last one. At most
    /// [`super::CATCH_UPS_PER_CONNECTION`].
    pub(super) held: VecDeque<Held>,
    /// The pair a database catch-up answer gave each bug. The database is
    /// ahead of the live stream: the same pair may still be on its way (not
    /// yet polled, or in the broker's queue), and is not sent twice. Any
    /// other pair of the bug, earlier or later, is new and is sent. Bounded
    /// by the connection's subscriptions.
    answered: HashMap<BugId, ChangeTime>,
}

/// A `subscribe … since` waiting for the database.
pub(super) struct Held {
    /// The subscribe answer's list, as it was when the command came.
    pub subscribed: Vec<BugId>,
    /// What to answer from the cache if the database cannot.
    pub asked: HashSet<BugId>,
    pub since: Since,
    /// What came meanwhile, in order.
    pub waiting: Vec<Waiting>,
}

/// A frame held for a catch-up.
pub(super) enum Waiting {
    Reply(Bytes),
    /// A live update, kept with its notification so that the very pair
    /// the catch-up answer gave is not sent again.
    Update(Notification, Bytes),
}

impl Client {
    pub fn new(outbox: Arc<Outbox>) -> Client {
        Client {
            outbox,
            held: VecDeque::new(),
            answered: HashMap::new(),
        }
    }

    /// Where its frames end up: to close it, or see it closing.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Queues a reply or catch-up frame (never refused for being many).
    pub fn reply(&mut self, frame: Bytes) {
        match self.held.back_mut() {
            Some(held) => held.waiting.push(Waiting::Reply(frame)),
            None => self.outbox.push_reply(frame),
        }
    }

    /// Queues a live update; `false` if the client is too slow for it
    /// (closed with 1008), or a catch-up answer already gave it this very
    /// pair. At most `limit` updates wait behind a catch-up.
    pub fn update(&mut self, notification: &Notification, frame: Bytes, limit: usize) -> bool {
        let (bug, when) = (&notification.bug, &notification.when);
        if self.held.is_empty() && self.answered.get(bug) == Some(when) {
            // Its live copy comes only once: forgotten now.
            self.answered.remove(bug);
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

    /// The connection no longer follows `bug`: no live copy of a pair an
    /// answer gave it is owed.
    pub fn unsubscribed(&mut self, bug: BugId) {
        self.answered.remove(&bug);
    }

    /// Queues a `subscribe … since` answer: the ok reply listing
    /// `subscribed`, `partial` or not, then `updates`, oldest first.
    pub(super) fn answer<'a>(
        &mut self,
        subscribed: impl Iterator<Item = BugId>,
        partial: bool,
        updates: impl Iterator<Item = &'a Notification>,
    ) {
        self.reply(text_frame(protocol::subscribe_reply(subscribed, partial)));
        for update in updates {
            self.reply(text_frame(protocol::update(update)));
        }
    }

    /// Answers `held` with `answer`, then queues what it held, in its
    /// order, except live copies of pairs the answer gave. The answer's
    /// latest pair per bug stays with the connection for a live copy still
    /// on its way.
    pub(super) fn release<'a>(
        &mut self,
        held: Held,
        partial: bool,
        answer: impl Iterator<Item = &'a Notification> + Clone,
    ) {
        self.answer(held.subscribed.into_iter(), partial, answer.clone());
        let mut given = HashSet::new();
        for n in answer {
            given.insert(n);
            let time = self.answered.entry(n.bug).or_insert_with(|| n.when.clone());
            if n.when > *time {
                *time = n.when.clone();
            }
        }
        for item in held.waiting {
            match item {
                Waiting::Reply(frame) => self.outbox.push_reply(frame),
                Waiting::Update(n, frame) if !given.contains(&n) => {
                    self.outbox.push(frame);
                }
                Waiting::Update(..) => {}
            }
        }
    }
}
