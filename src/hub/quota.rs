//! The subscription budget: subscriptions over all connections
//! (`BZPUSH_MAX_SUBSCRIPTIONS_TOTAL`) and each client address's share of
//! them. Owned by the hub's thread (no lock). A subscription costs 30 to
//! 75 bytes in the hub (see [`super::index`]): the budget, not the number
//! of connections, bounds that memory, and the share keeps one address
//! (so one client, or one client's many connections) from taking it all.
//! Each refusal is logged, a few lines a minute.

use std::collections::HashMap;

use log::warn;

use crate::address::ClientAddress;
use crate::logging::Throttle;

/// Subscriptions held, in all and by address, against their limits.
pub struct Quota {
    total_limit: usize,
    share_limit: usize,
    total: usize,
    by_address: HashMap<ClientAddress, usize>,
    refused_share: Throttle,
    refused_total: Throttle,
}

impl Quota {
    /// `total` in all, and for each address the share its `per_address`
    /// of the `connections` gives it (a tenth of the total by default),
    /// at least one subscription.
    pub fn new(total: usize, per_address: usize, connections: usize) -> Quota {
        let share = total as u128 * per_address as u128 / connections.max(1) as u128;
        Quota {
            total_limit: total,
            share_limit: usize::try_from(share).unwrap_or(usize::MAX).clamp(1, total),
            total: 0,
            by_address: HashMap::new(),
            refused_share: Throttle::new(),
            refused_total: Throttle::new(),
        }
    }

    /// The most subscriptions one address may hold.
    pub fn share(&self) -> usize {
        self.share_limit
    }

    /// Takes `more` subscriptions for `address`, or refuses them all with
    /// the limit they would pass (the address's share first).
    pub fn take(&mut self, address: ClientAddress, more: usize) -> Result<(), usize> {
        let held = self.by_address.get(&address).copied().unwrap_or(0);
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
        if more > 0 {
            *self.by_address.entry(address).or_default() += more;
            self.total += more;
        }
        Ok(())
    }

    /// Gives back `fewer` subscriptions of `address`.
    pub fn give_back(&mut self, address: ClientAddress, fewer: usize) {
        if let Some(held) = self.by_address.get_mut(&address) {
            *held = held.saturating_sub(fewer);
            if *held == 0 {
                self.by_address.remove(&address);
            }
        }
        self.total = self.total.saturating_sub(fewer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_and_everyone_the_total() {
        let a = ClientAddress::of("192.0.2.1".parse().expect("ip"));
        let b = ClientAddress::of("192.0.2.2".parse().expect("ip"));
        let c = ClientAddress::of("192.0.2.3".parse().expect("ip"));
        // 100 in all; an address with 1 of 4 connections: 25.
        let mut quota = Quota::new(100, 1, 4);
        assert_eq!(quota.share(), 25);
        assert_eq!(quota.take(a, 25), Ok(()));
        assert_eq!(quota.take(a, 1), Err(25));
        assert_eq!(quota.take(b, 25), Ok(()));
        assert_eq!(quota.take(c, 25), Ok(()));
        quota.give_back(a, 5);
        assert_eq!(quota.take(a, 5), Ok(()));
        let d = ClientAddress::of("192.0.2.4".parse().expect("ip"));
        let e = ClientAddress::of("192.0.2.5".parse().expect("ip"));
        assert_eq!(quota.take(d, 25), Ok(()));
        assert_eq!(quota.take(e, 1), Err(100));
        assert_eq!(Quota::new(10, 5, 1).share(), 10);
        assert_eq!(Quota::new(10, 1, 1000).share(), 1);
    }
}
