//! The one fact bzpush moves around: bug N changed at time T.
//!
//! Every stage (poller, Pulse, hub, WebSocket) passes a [`Notification`] on.
//! It holds a bug id and a change time and nothing else: no field of a bug
//! ever leaves the database through bzpush. This module must never grow a
//! field that could carry bug content.

use std::fmt;

/// A Bugzilla bug id: a positive integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BugId(u32);

impl BugId {
    /// A bug id from a number; `None` for zero (no bug has id 0).
    pub fn new(id: u32) -> Option<BugId> {
        (id > 0).then_some(BugId(id))
    }

    /// A bug id from a JSON value: a positive integer, or a string of
    /// decimal digits (bugzfeed clients and some Pulse publishers send those).
    pub fn from_json(value: &serde_json::Value) -> Option<BugId> {
        match value {
            serde_json::Value::Number(n) => n.as_u64().and_then(BugId::from_u64),
            serde_json::Value::String(s) => BugId::parse_decimal(s),
            _ => None,
        }
    }

    /// A bug id from a string of ASCII decimal digits only (no sign, no
    /// spaces, no exponent), as Bugzilla writes ids in URLs.
    pub fn parse_decimal(s: &str) -> Option<BugId> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok().and_then(BugId::from_u64)
    }

    fn from_u64(id: u64) -> Option<BugId> {
        u32::try_from(id).ok().and_then(BugId::new)
    }

    /// The id as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for BugId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// When a bug changed, exactly as its source wrote it.
///
/// From the database this is always `YYYY-MM-DDTHH:MM:SS` (the DATETIME as
/// stored, no zone). From Pulse it is whatever string the publisher sent:
/// clients compare it with Bugzilla's own history times, so it is passed on
/// unchanged rather than reinterpreted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeTime(String);

impl ChangeTime {
    /// A change time as received; any string is kept verbatim.
    pub fn new(s: impl Into<String>) -> ChangeTime {
        ChangeTime(s.into())
    }

    /// The time as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChangeTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bug `bug` changed at `when`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Notification {
    pub bug: BugId,
    pub when: ChangeTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bug_ids_from_json() {
        assert_eq!(BugId::from_json(&json!(1234)), BugId::new(1234));
        assert_eq!(BugId::from_json(&json!("1234")), BugId::new(1234));
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("12a"),
            json!(""),
            json!(" 12"),
            json!("+12"),
            json!("1e3"),
            json!(4294967296u64),
            json!("99999999999999999999999"),
            json!(null),
            json!([1]),
            json!(true),
        ] {
            assert_eq!(BugId::from_json(&bad), None, "{bad} must not be a bug id");
        }
    }
}
