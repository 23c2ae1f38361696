//! What each client address may take of the hub: subscriptions, and the
//! hub's time. Owned by the hub's thread (no lock).
//!
//! Subscriptions are bounded over all connections
//! (`BZPUSH_MAX_SUBSCRIPTIONS_TOTAL`) and per address, by the share of
//! that total its `BZPUSH_MAX_CONNECTIONS_PER_ADDRESS` gives it. A
//! subscription costs 30 to 75 bytes in the hub (see [`super::index`]):
//! the total, not the number of connections, bounds that memory, and the
//! share keeps one client, however many connections it opens, from taking
//! it all.
//!
//! The hub's time: the commands of one address may keep the hub busy the
//! same share of the time as it may hold of the connections (a tenth by
//! default; at least [`MIN_TIME_SHARE`]), after a burst of [`TIME_BURST`];
//! the parsing of a big command, done on its connection's thread, counts
//! as the hub's time.
//! Past that
//! its connections wait before their next command goes to the hub
//! ([`super::Turn::not_before`]): a client that loops big commands slows
//! itself, not the updates of others, which the hub could otherwise only
//! put first between two of its commands. A debt outlives the address's
//! connections until it is repaid: leaving and coming back does not wipe
//! it. Each refusal is logged, a few lines a minute.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use log::warn;

use crate::address::ClientAddress;
use crate::logging::Throttle;

/// The least share of the hub's time one address's commands may take over
/// time, however few connections it may hold. A subscribe or unsubscribe
/// of 20,000 bugs takes the hub about 1.7 ms (measured: 0.29 s of its CPU
/// for 170 of them): at a tenth, the default, a client may send one every
/// 17 ms, and an update meets one of its commands in the hub one time in
/// ten at most; at this least share, one every 35 ms.
pub const MIN_TIME_SHARE: f64 = 0.05;
/// The hub's time one address may take at once before its share holds it
/// back: many times a big command, and a thousand connections of one NAT
/// subscribing to a few bugs each.
pub const TIME_BURST: Duration = Duration::from_millis(50);

/// Subscriptions and hub time, in all and by address, against their limits.
pub struct Budget {
    total_limit: usize,
    share_limit: usize,
    total: usize,
    /// The share of the hub's time one address may take.
    time_share: f64,
    by_address: HashMap<ClientAddress, Use>,
    /// `by_address`'s length after it was last swept of addresses that
    /// hold and owe nothing.
    swept: usize,
    refused_share: Throttle,
    refused_total: Throttle,
}

/// What one address holds and owes.
#[derive(Default)]
struct Use {
    connections: usize,
    subscriptions: usize,
    /// Hub time spent beyond what its share gave back, as of `at`.
    debt: Duration,
    at: Option<Instant>,
}

impl Budget {
    /// `total` subscriptions in all, and for each address the share its
    /// `per_address` of the `connections` gives it, of the subscriptions
    /// (at least one) and of the hub's time (at least 5 %):
    /// a tenth by default.
    pub fn new(total: usize, per_address: usize, connections: usize) -> Budget {
        let share = total as u128 * per_address as u128 / connections.max(1) as u128;
        let fraction = per_address as f64 / connections.max(1) as f64;
        Budget {
            total_limit: total,
            share_limit: usize::try_from(share).unwrap_or(usize::MAX).clamp(1, total),
            time_share: fraction.clamp(MIN_TIME_SHARE, 1.0),
            total: 0,
            by_address: HashMap::new(),
            swept: 0,
            refused_share: Throttle::new(),
            refused_total: Throttle::new(),
        }
    }

    /// The most subscriptions one address may hold.
    pub fn share(&self) -> usize {
        self.share_limit
    }

    /// A connection from `address` opened.
    pub fn connected(&mut self, address: ClientAddress) {
        self.by_address.entry(address).or_default().connections += 1;
        // Addresses that left owing hub time are kept until they have
        // repaid it (or leaving and coming back would wipe a debt); swept
        // whenever there are twice as many as at the last sweep.
        if self.by_address.len() > 2 * self.swept.max(512) {
            let now = Instant::now();
            let share = self.time_share;
            self.by_address.retain(|_, u| !u.idle(now, share));
            self.swept = self.by_address.len();
        }
    }

    /// A connection from `address` that held `subscriptions` closed.
    pub fn left(&mut self, address: ClientAddress, subscriptions: usize) {
        self.give_back(address, subscriptions);
        if let Some(used) = self.by_address.get_mut(&address) {
            used.connections = used.connections.saturating_sub(1);
            if used.idle(Instant::now(), self.time_share) {
                self.by_address.remove(&address);
            }
        }
    }

    /// Takes `more` subscriptions for `address`, or refuses them all with
    /// the limit they would pass (the address's share first).
    pub fn take(&mut self, address: ClientAddress, more: usize) -> Result<(), usize> {
        let held = self.by_address.get(&address).map_or(0, |u| u.subscriptions);
        if held + more > self.share_limit {
            if let Some(skipped) = self.refused_share.allow() {
                warn!(
                    "{address} holds {held} subscriptions and asked for {more} more: past \
                     the share of one address ({}, from BZPUSH_MAX_SUBSCRIPTIONS_TOTAL and \
                     BZPUSH_MAX_CONNECTIONS_PER_ADDRESS): refused{skipped}",
                    self.share_limit
                );
            }
            return Err(self.share_limit);
        }
        if self.total + more > self.total_limit {
            if let Some(skipped) = self.refused_total.allow() {
                warn!(
                    "{address} asked for {more} subscriptions with {} held in all: past \
                     BZPUSH_MAX_SUBSCRIPTIONS_TOTAL ({}): refused{skipped}",
                    self.total, self.total_limit
                );
            }
            return Err(self.total_limit);
        }
        self.by_address.entry(address).or_default().subscriptions += more;
        self.total += more;
        Ok(())
    }

    /// Gives back `fewer` subscriptions of `address`.
    pub fn give_back(&mut self, address: ClientAddress, fewer: usize) {
        if let Some(used) = self.by_address.get_mut(&address) {
            used.subscriptions = used.subscriptions.saturating_sub(fewer);
        }
        self.total = self.total.saturating_sub(fewer);
    }

    /// A command of `address` kept the hub busy for `spent`, ending `now`:
    /// when its connections may send the next, if they must wait.
    pub fn spent(
        &mut self,
        address: ClientAddress,
        spent: Duration,
        now: Instant,
    ) -> Option<Instant> {
        let share = self.time_share;
        let used = self.by_address.entry(address).or_default();
        used.debt = used.debt(now, share) + spent;
        used.at = Some(now);
        if used.debt <= TIME_BURST {
            return None;
        }
        Some(now + (used.debt - TIME_BURST).div_f64(share))
    }
}

impl Use {
    /// What it owes at `now`, `share` of the time since `at` being
    /// repaid.
    fn debt(&self, now: Instant, share: f64) -> Duration {
        let repaid = self
            .at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at))
            .mul_f64(share);
        self.debt.saturating_sub(repaid)
    }

    /// Holds and owes nothing: it may be forgotten.
    fn idle(&self, now: Instant, share: f64) -> bool {
        self.connections == 0 && self.subscriptions == 0 && self.debt(now, share).is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(n: u8) -> ClientAddress {
        ClientAddress::of([192, 0, 2, n].into())
    }

    #[test]
    fn an_address_gets_its_share_and_everyone_the_total() {
        let (a, b, c, d, e) = (address(1), address(2), address(3), address(4), address(5));
        // 100 in all; an address with 1 of 4 connections: 25.
        let mut budget = Budget::new(100, 1, 4);
        assert_eq!(budget.share(), 25);
        assert_eq!(budget.take(a, 25), Ok(()));
        assert_eq!(budget.take(a, 1), Err(25));
        assert_eq!(budget.take(b, 25), Ok(()));
        assert_eq!(budget.take(c, 25), Ok(()));
        budget.give_back(a, 5);
        assert_eq!(budget.take(a, 5), Ok(()));
        assert_eq!(budget.take(d, 25), Ok(()));
        assert_eq!(budget.take(e, 1), Err(100));
        budget.connected(d);
        budget.left(d, 25);
        assert!(!budget.by_address.contains_key(&d), "it holds nothing");
        assert_eq!(budget.take(e, 1), Ok(()));
        assert_eq!(Budget::new(10, 5, 1).share(), 10);
        assert_eq!(Budget::new(10, 1, 1000).share(), 1);
    }

    #[test]
    fn past_its_burst_an_address_waits_for_its_share_of_the_hubs_time() {
        // One connection of 20 per address: 5 % of the hub's time.
        let mut budget = Budget::new(100, 1, 20);
        let (a, b) = (address(1), address(2));
        let start = Instant::now();
        let ms = Duration::from_millis;
        // Within the burst: no wait.
        assert_eq!(budget.spent(a, ms(30), start), None);
        assert_eq!(budget.spent(a, ms(20), start), None);
        // 10 ms past it: 10 ms / 5 % = 200 ms to wait.
        assert_eq!(budget.spent(a, ms(10), start), Some(start + ms(200)));
        // Another address owes nothing.
        assert_eq!(budget.spent(b, ms(10), start), None);
        // A second later, 50 ms were repaid: 10 ms under the burst.
        assert_eq!(budget.spent(a, ms(5), start + ms(1000)), None);
        // Leaving owing time does not wipe the debt.
        budget.connected(b);
        assert!(budget.spent(b, ms(60), Instant::now()).is_some());
        budget.left(b, 0);
        budget.connected(b);
        assert!(
            budget.spent(b, ms(1), Instant::now()).is_some(),
            "the debt stayed"
        );
    }
}
