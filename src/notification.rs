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
    /// A time of day on a date, both already checked to exist.
    pub fn from_civil(
        year: u32,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> Moment {
        let days = days_from_civil(i64::from(year), i64::from(month), i64::from(day));
        Moment {
            secs: days * 86_400 + i64::from(hour * 3600 + minute * 60 + second),
            nanos: 0,
        }
    }

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
        let b = s.as_bytes();
        if b.len() < 19
            || b[4] != b'-'
            || b[7] != b'-'
            || !(b[10] == b'T' || b[10] == b' ')
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let year = digits(&b[0..4])?;
        let month = digits(&b[5..7])?;
        let day = digits(&b[8..10])?;
        let hour = digits(&b[11..13])?;
        let minute = digits(&b[14..16])?;
        let second = digits(&b[17..19])?;
        let valid = (1..=12).contains(&month)
            && (1..=days_in_month(year, month)).contains(&day)
            && hour < 24
            && minute < 60
            && second < 60;
        if !valid {
            return None;
        }
        let mut moment = Moment::from_civil(year, month, day, hour, minute, second);
        let mut rest = &b[19..];
        if let Some((b'.', fraction)) = rest.split_first() {
            let len = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
            if len == 0 || len > 9 {
                return None;
            }
            moment.nanos = digits(&fraction[..len])? * 10u32.pow(9 - len as u32);
            rest = &fraction[len..];
        }
        match rest {
            [] | [b'Z' | b'z'] => Some(moment),
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let hours = digits(&[*h1, *h2])?;
                let minutes = digits(&[*m1, *m2])?;
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let offset = i64::from(hours * 3600 + minutes * 60);
                // Local time minus its offset is UTC.
                Some(moment.plus_secs(if *sign == b'+' { -offset } else { offset }))
            }
            _ => None,
        }
    }
}

/// The value of a run of ASCII decimal digits; `None` if any byte is not one.
fn digits(bytes: &[u8]) -> Option<u32> {
    if bytes.len() > 9 {
        return None;
    }
    bytes.iter().try_fold(0u32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    }
}
