//! The one fact bzpush moves around: bug N changed at time T.
//!
//! Every stage (poller, Pulse, hub, WebSocket) passes a [`Notification`] on.
//! It holds a bug id and a change time and nothing else: no field of a bug
//! ever leaves the database through bzpush. This module must never grow a
//! field that could carry bug content.

use std::fmt;

use time::macros::format_description;
use time::parsing::Parsed;
use time::{PrimitiveDateTime, UtcOffset};

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

/// A point in time: seconds and nanoseconds since 1970-01-01T00:00:00,
/// reading a time without a zone as UTC (Bugzilla's DATETIMEs carry none).
/// Change times and `since` are compared as these, never as text, so that
/// `2026-11-30 10:00:00`, `2026-11-30T10:00:00Z` and `2026-11-30T10:00:00.0`
/// are one time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Moment {
    secs: i64,
    nanos: u32,
}

impl Moment {
    /// `time` on this clock; the epoch for a clock set before 1970.
    pub fn from_system(time: std::time::SystemTime) -> Moment {
        let since_epoch = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Moment {
            secs: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
            nanos: since_epoch.subsec_nanos(),
        }
    }

    /// Whole seconds since the epoch.
    pub fn secs(self) -> i64 {
        self.secs
    }

    /// This time moved by `secs` seconds.
    pub fn plus_secs(self, secs: i64) -> Moment {
        Moment {
            secs: self.secs.saturating_add(secs),
            nanos: self.nanos,
        }
    }

    /// Reads `YYYY-MM-DD`, `T` or a space, `HH:MM:SS`, optional fractions
    /// of a second (up to nine digits), optional `Z` or `±HH:MM`. `None`
    /// for anything else, including dates that do not exist.
    pub fn parse(s: &str) -> Option<Moment> {
        let format = format_description!(
            version = 2,
            "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second]\
             [optional [.[subsecond]]][optional [[first [Z][z][[offset_hour sign:mandatory]:[offset_minute]]]]]"
        );
        // The time crate also takes a sign before the year, more than nine
        // digits of fraction (ignoring the rest) and offsets up to 25 hours.
        let fraction = s.split_once('.').map_or("", |(_, f)| f);
        if !s.starts_with(|c: char| c.is_ascii_digit())
            || fraction.bytes().take_while(u8::is_ascii_digit).count() > 9
        {
            return None;
        }
        let mut parsed = Parsed::new();
        if !parsed.parse_items(s.as_bytes(), format).ok()?.is_empty() {
            return None;
        }
        let offset = match parsed.offset_hour() {
            Some(_) => UtcOffset::try_from(parsed).ok()?,
            None => UtcOffset::UTC,
        };
        if offset.whole_hours().abs() > 23 {
            return None;
        }
        let at = PrimitiveDateTime::try_from(parsed)
            .ok()?
            .assume_offset(offset);
        Some(Moment {
            secs: at.unix_timestamp(),
            nanos: at.nanosecond(),
        })
    }
}

/// When a bug changed, exactly as its source wrote it.
///
/// From the database this is always `YYYY-MM-DDTHH:MM:SS` (the DATETIME as
/// stored, no zone). From Pulse it is whatever string the publisher sent:
/// clients compare it with Bugzilla's own history times, so the text is
/// passed on unchanged rather than reinterpreted. Comparisons, equality
/// and hashing use the time the text names ([`Moment`]), so two spellings
/// of one time are one time; a text that names no time (a publisher's
/// oddity) compares as text, before every readable time.
#[derive(Clone, Debug)]
pub struct ChangeTime {
    text: String,
    at: Option<Moment>,
}

impl ChangeTime {
    /// A change time as received; any string is kept verbatim.
    pub fn new(s: impl Into<String>) -> ChangeTime {
        let text = s.into();
        let at = Moment::parse(&text);
        ChangeTime { text, at }
    }

    /// The time as text, as received.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The time the text names, if it names one.
    pub fn at(&self) -> Option<Moment> {
        self.at
    }
}

impl PartialEq for ChangeTime {
    fn eq(&self, other: &ChangeTime) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for ChangeTime {}

impl PartialOrd for ChangeTime {
    fn partial_cmp(&self, other: &ChangeTime) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ChangeTime {
    fn cmp(&self, other: &ChangeTime) -> std::cmp::Ordering {
        match (self.at, other.at) {
            (Some(a), Some(b)) => a.cmp(&b),
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(_), None) => std::cmp::Ordering::Greater,
            (None, None) => self.text.cmp(&other.text),
        }
    }
}

impl std::hash::Hash for ChangeTime {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Consistent with `eq`: equal times hash alike whatever their text.
        match self.at {
            Some(at) => at.hash(state),
            None => self.text.hash(state),
        }
    }
}

impl fmt::Display for ChangeTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Bug `bug` changed at `when`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Notification {
    pub bug: BugId,
    pub when: ChangeTime,
}

/// The notification of `bug` (not 0) at `when`, for unit tests.
#[cfg(test)]
pub(crate) fn n(bug: u32, when: &str) -> Notification {
    Notification {
        bug: BugId::new(bug).expect("nonzero"),
        when: ChangeTime::new(when),
    }
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

    #[test]
    fn change_times_compare_as_times_and_keep_their_text() {
        let plain = ChangeTime::new("2026-11-30T10:00:00");
        for same in [
            "2026-11-30 10:00:00",
            "2026-11-30T10:00:00Z",
            "2026-11-30T10:00:00.000",
            "2026-11-30T11:00:00+01:00",
            "2026-11-30T05:30:00-04:30",
        ] {
            let t = ChangeTime::new(same);
            assert_eq!(t, plain, "{same}");
            assert_eq!(t.as_str(), same, "the text is kept");
            let mut set = std::collections::HashSet::new();
            set.insert(plain.clone());
            assert!(set.contains(&t), "{same} hashes like {plain}");
        }
        // As text, "2026-11-30 10:00:05" < "2026-11-30T10:00:00".
        assert!(ChangeTime::new("2026-11-30 10:00:05") > plain);
        assert!(ChangeTime::new("2026-11-30T10:00:00.5") > plain);
        assert!(ChangeTime::new("2026-11-30T09:59:59.999Z") < plain);
        assert!(ChangeTime::new("2026-12-01T00:00:00") > ChangeTime::new("2026-11-30T23:59:59"));
        assert!(ChangeTime::new("2024-02-29T00:00:00") > ChangeTime::new("2024-02-28T23:59:59"));
        // Unreadable texts sort before times and compare among themselves.
        assert!(ChangeTime::new("yesterday") < ChangeTime::new("1970-01-01T00:00:00"));
        assert_ne!(ChangeTime::new("a"), ChangeTime::new("b"));
    }

    #[test]
    fn moments_refuse_what_names_no_time() {
        for bad in [
            "2026-11-30",
            "2026-11-31T10:00:00",
            "2026-11-30T24:00:00",
            "2026-11-30T10:00:00.",
            "2026-11-30T10:00:00.1234567890",
            "2026-11-30T10:00:00+1:00",
            "2026-11-30T10:00:00 ",
            "2026-11-30T10:00:00ZZ",
            "+2026-11-30T10:00:00",
            "2026-11-30T10:00:60",
            "2026-11-30T10:00:00+24:00",
            "2026-11-30T10:00:00+01:60",
            "2023-02-29T00:00:00",
        ] {
            assert_eq!(Moment::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Moment::parse("1970-01-01T00:00:01"),
            Some(Moment::from_system(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1)
            ))
        );
        assert_eq!(
            Moment::parse("2026-11-30T10:00:00").map(Moment::secs),
            Some(1_796_032_800)
        );
        assert_eq!(
            Moment::parse("2026-11-30T10:00:00.000000001+23:59").map(|m| (m.secs, m.nanos)),
            Some((1_796_032_800 - 86_340, 1))
        );
    }
}
