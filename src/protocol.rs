//! The WebSocket client protocol (bugzfeed's wire format): a client's text
//! frame in, a [`Command`] or a [`ProtocolError`] out, and the JSON text of
//! every frame the server sends (ok answers, errors, updates).
//!
//! This module owns the wire format and nothing else: it does no I/O, keeps
//! no state and starts no threads. It must never panic on any input — a
//! frame is untrusted text from the network, and whatever it holds ends in
//! a [`Command`] or an error reply that keeps the connection open.
//!
//! | client sends | parsed as |
//! |---|---|
//! | `{"command":"subscribe","bugs":[1234,"5678"],"since":"2026-11-28T01:00:00"}` | [`Command::Subscribe`] |
//! | `{"command":"unsubscribe","bugs":1234}` | [`Command::Unsubscribe`] |
//! | `{"command":"subscriptions"}` | [`Command::Subscriptions`] |
//! | `{"command":"version"}` | [`Command::Version`] |
//!
//! Fields a command does not use are ignored.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::notification::{BugId, ChangeTime, Moment, Notification};

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `{"command":"subscribe","bugs":[1234,5678],"since":"2026-11-28T01:00:00"}`:
    /// add these bugs to the connection's subscriptions; with `since`, also
    /// send the cached updates of these bugs at or after that time.
    ///
    /// `bugs` holds no duplicates, in no particular order; it may be empty
    /// (the answer then just lists the current subscriptions).
    Subscribe {
        bugs: Vec<BugId>,
        since: Option<Since>,
    },
    /// `{"command":"unsubscribe","bugs":[1234]}`: drop these bugs from the
    /// connection's subscriptions. `bugs` as for [`Command::Subscribe`].
    Unsubscribe { bugs: Vec<BugId> },
    /// `{"command":"subscriptions"}`: list the connection's subscriptions.
    Subscriptions,
    /// `{"command":"version"}`: the server's version.
    Version,
}

impl Command {
    /// The command's name on the wire, as replies echo it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Subscribe { .. } => SUBSCRIBE,
            Command::Unsubscribe { .. } => UNSUBSCRIBE,
            Command::Subscriptions => SUBSCRIPTIONS,
            Command::Version => VERSION,
        }
    }
}

const SUBSCRIBE: &str = "subscribe";
const UNSUBSCRIBE: &str = "unsubscribe";
const SUBSCRIPTIONS: &str = "subscriptions";
const VERSION: &str = "version";

/// A client's `since`: its text normalised to `YYYY-MM-DDTHH:MM:SS` (for
/// SQL), and the time it names, which is what it is compared by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Since(String, Moment);

impl Since {
    /// A time as clients write it: `YYYY-MM-DDTHH:MM:SS`, with `T` or a
    /// space between date and time, optionally followed by `Z`. `None` for
    /// anything else, including dates that do not exist (month 13,
    /// February 30, 25:00:00).
    pub fn parse(s: &str) -> Option<Since> {
        let s = s.strip_suffix('Z').unwrap_or(s);
        // Only the plain form: `Moment::parse` would also take fractions
        // and offsets, which clients never sent to bugzfeed.
        if s.len() != 19 {
            return None;
        }
        let at = Moment::parse(s)?;
        // Read as a time, all 19 bytes are ASCII: the slices fall on char
        // boundaries.
        Some(Since(format!("{}T{}", &s[..10], &s[11..]), at))
    }

    /// The time as `YYYY-MM-DDTHH:MM:SS`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The time it names.
    pub fn at(&self) -> Moment {
        self.1
    }

    /// Whether a change at `when` is at or after this time. A text that
    /// names no time cannot be placed: it counts as after, since a client
    /// would rather hear of a change twice than miss it.
    pub fn covers(&self, when: &ChangeTime) -> bool {
        when.at().is_none_or(|at| at >= self.1)
    }
}

impl fmt::Display for Since {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a frame was refused; the connection stays open and gets
/// [`error_reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    command: Option<String>,
    kind: ErrorKind,
}

/// What was wrong with a frame. Its `Display` is the error text clients see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The frame is not JSON.
    InvalidJson,
    /// The frame is not an object, or `command` is missing or unknown.
    InvalidCommand,
    /// `subscribe` or `unsubscribe` without `bugs` (or with `"bugs": null`).
    MissingBugs,
    /// An id in `bugs` is not a positive integer or a decimal string.
    InvalidBugId,
    /// `since` is not a time we read.
    InvalidSince,
    /// A subscribe would take the connection past its limit.
    TooManySubscriptions { limit: usize },
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::InvalidJson => f.write_str("invalid JSON"),
            ErrorKind::InvalidCommand => f.write_str("invalid command"),
            ErrorKind::MissingBugs => f.write_str("missing mandatory arg: bugs"),
            ErrorKind::InvalidBugId => f.write_str("invalid bug id; must be integer"),
            ErrorKind::InvalidSince => f.write_str("invalid since; expected YYYY-MM-DDTHH:MM:SS"),
            ErrorKind::TooManySubscriptions { limit } => {
                write!(f, "too many subscriptions (limit {limit})")
            }
        }
    }
}

impl ProtocolError {
    fn new(command: Option<&str>, kind: ErrorKind) -> ProtocolError {
        ProtocolError {
            command: command.map(str::to_owned),
            kind,
        }
    }

    /// The refusal of a command that would take a connection past `limit`
    /// subscriptions.
    pub fn too_many_subscriptions(command: &str, limit: usize) -> ProtocolError {
        ProtocolError::new(Some(command), ErrorKind::TooManySubscriptions { limit })
    }

    /// The command as the client sent it, if it was a string.
    pub fn command(&self) -> Option<&str> {
        self.command.as_deref()
    }

    /// What was wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.command {
            Some(command) => write!(f, "command {command:?}: {}", self.kind),
            None => self.kind.fmt(f),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A client's text frame as a command.
pub fn parse(text: &str) -> Result<Command, ProtocolError> {
    let value: Value =
        serde_json::from_str(text).map_err(|_| ProtocolError::new(None, ErrorKind::InvalidJson))?;
    let Value::Object(object) = value else {
        return Err(ProtocolError::new(None, ErrorKind::InvalidCommand));
    };
    let Some(Value::String(name)) = object.get("command") else {
        return Err(ProtocolError::new(None, ErrorKind::InvalidCommand));
    };
    let name = name.as_str();
    let fail = |kind| ProtocolError::new(Some(name), kind);
    match name {
        SUBSCRIBE => Ok(Command::Subscribe {
            bugs: bugs(&object).map_err(fail)?,
            since: since(&object).map_err(fail)?,
        }),
        UNSUBSCRIBE => Ok(Command::Unsubscribe {
            bugs: bugs(&object).map_err(fail)?,
        }),
        SUBSCRIPTIONS => Ok(Command::Subscriptions),
        VERSION => Ok(Command::Version),
        _ => Err(fail(ErrorKind::InvalidCommand)),
    }
}

/// `bugs`: one id or a list of ids, deduplicated. Early bugzfeed clients
/// (its first example page, older BzDeck) send the same as `bug`; it is
/// read when `bugs` is absent, so they keep working.
fn bugs(object: &Map<String, Value>) -> Result<Vec<BugId>, ErrorKind> {
    let given = match object.get("bugs") {
        None | Some(Value::Null) => object.get("bug"),
        bugs => bugs,
    };
    let ids = match given {
        None | Some(Value::Null) => return Err(ErrorKind::MissingBugs),
        Some(Value::Array(list)) => list
            .iter()
            .map(BugId::from_json)
            .collect::<Option<BTreeSet<BugId>>>(),
        Some(one) => BugId::from_json(one).map(|id| BTreeSet::from([id])),
    };
    ids.map(Vec::from_iter).ok_or(ErrorKind::InvalidBugId)
}

/// `since`: absent, `null` or `""` mean no catch-up.
fn since(object: &Map<String, Value>) -> Result<Option<Since>, ErrorKind> {
    match object.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Since::parse(s).map(Some).ok_or(ErrorKind::InvalidSince),
        Some(_) => Err(ErrorKind::InvalidSince),
    }
}

/// An ok answer listing a connection's subscriptions:
/// `{"command":<command>,"result":"ok","bugs":[...]}`, ids ascending.
pub fn subscriptions_reply(command: &str, bugs: impl IntoIterator<Item = BugId>) -> String {
    bugs_reply(command, bugs, false)
}

/// The ok answer to `subscribe`: `{"command":"subscribe","result":"ok","bugs":[...]}`,
/// ids ascending, plus `"partial":true` when the catch-up may have missed
/// updates since the client's `since`.
pub fn subscribe_reply(bugs: impl IntoIterator<Item = BugId>, partial: bool) -> String {
    bugs_reply(SUBSCRIBE, bugs, partial)
}

fn bugs_reply(command: &str, bugs: impl IntoIterator<Item = BugId>, partial: bool) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        command: &'a str,
        result: &'static str,
        bugs: Vec<u32>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
    }
    let bugs: BTreeSet<BugId> = bugs.into_iter().collect();
    encode(&Reply {
        command,
        result: "ok",
        bugs: bugs.into_iter().map(BugId::get).collect(),
        partial,
    })
}

/// The answer to `version`: `{"command":"version","result":"ok","version":"0.1.0"}`.
pub fn version_reply() -> String {
    #[derive(Serialize)]
    struct Reply {
        command: &'static str,
        result: &'static str,
        version: &'static str,
    }
    encode(&Reply {
        command: VERSION,
        result: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// An error answer: `{"command":<as sent, or null>,"result":"error","error":"<text>"}`.
pub fn error_reply(error: &ProtocolError) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        command: Option<&'a str>,
        result: &'static str,
        error: String,
    }
    encode(&Reply {
        command: error.command(),
        result: "error",
        error: error.kind.to_string(),
    })
}

/// The frame telling a subscriber that a bug changed:
/// `{"command":"update","bug":1234,"when":"2026-11-28T02:04:50"}`, `when`
/// passed through verbatim.
pub fn update(notification: &Notification) -> String {
    #[derive(Serialize)]
    struct Update<'a> {
        command: &'static str,
        bug: u32,
        when: &'a str,
    }
    encode(&Update {
        command: "update",
        bug: notification.bug.get(),
        when: notification.when.as_str(),
    })
}

/// JSON text of a reply. The reply types above are plain structs of
/// strings, integers, booleans and integer lists, which serde_json always
/// serialises (it fails only on non-string map keys or a failing custom
/// `Serialize`), so the `expect` cannot fire.
fn encode(reply: &impl Serialize) -> String {
    serde_json::to_string(reply).expect("reply structs always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bug(id: u32) -> BugId {
        BugId::new(id).unwrap()
    }

    fn since(s: &str) -> Since {
        Since::parse(s).unwrap()
    }

    /// The error `parse` gives for `text`, as (command, text).
    fn error(text: &str) -> (Option<String>, String) {
        let e = parse(text).expect_err(text);
        (e.command().map(str::to_owned), e.kind().to_string())
    }

    fn err(command: Option<&str>, text: &str) -> (Option<String>, String) {
        (command.map(str::to_owned), text.to_owned())
    }

    fn subscribe_bugs(text: &str) -> Vec<BugId> {
        match parse(text) {
            Ok(Command::Subscribe { mut bugs, .. }) => {
                bugs.sort();
                bugs
            }
            other => panic!("{text}: {other:?}"),
        }
    }

    fn subscribe_since(text: &str) -> Option<Since> {
        match parse(text) {
            Ok(Command::Subscribe { since, .. }) => since,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    // ---- parse: the commands of the README's "The client protocol" ----

    #[test]
    fn parses_the_four_commands() {
        assert_eq!(
            parse(r#"{"command":"subscribe","bugs":[1234,5678]}"#),
            Ok(Command::Subscribe {
                bugs: vec![bug(1234), bug(5678)],
                since: None
            })
        );
        assert_eq!(
            parse(r#"{"command":"unsubscribe","bugs":[1234]}"#),
            Ok(Command::Unsubscribe {
                bugs: vec![bug(1234)]
            })
        );
        assert_eq!(
            parse(r#"{"command":"subscriptions"}"#),
            Ok(Command::Subscriptions)
        );
        assert_eq!(parse(r#"{"command":"version"}"#), Ok(Command::Version));
    }

    #[test]
    fn subscribe_with_since() {
        assert_eq!(
            parse(r#"{"command":"subscribe","bugs":[42],"since":"2026-11-28T01:00:00"}"#),
            Ok(Command::Subscribe {
                bugs: vec![bug(42)],
                since: Some(since("2026-11-28T01:00:00"))
            })
        );
    }

    #[test]
    fn command_names_round_trip() {
        for command in [
            Command::Subscribe {
                bugs: vec![],
                since: None,
            },
            Command::Unsubscribe { bugs: vec![] },
            Command::Subscriptions,
            Command::Version,
        ] {
            let text = json!({"command": command.name(), "bugs": []}).to_string();
            assert_eq!(parse(&text).unwrap().name(), command.name());
        }
    }

    #[test]
    fn bugs_may_be_one_id_or_a_list_of_integers_or_strings() {
        let one = vec![bug(7)];
        assert_eq!(subscribe_bugs(r#"{"command":"subscribe","bugs":7}"#), one);
        assert_eq!(subscribe_bugs(r#"{"command":"subscribe","bugs":"7"}"#), one);
        assert_eq!(subscribe_bugs(r#"{"command":"subscribe","bugs":[7]}"#), one);
        assert_eq!(
            subscribe_bugs(r#"{"command":"subscribe","bugs":["7"]}"#),
            one
        );
        assert_eq!(
            subscribe_bugs(r#"{"command":"subscribe","bugs":[3,"1",2]}"#),
            vec![bug(1), bug(2), bug(3)]
        );
        assert_eq!(
            subscribe_bugs(r#"{"command":"subscribe","bugs":[4294967295]}"#),
            vec![bug(u32::MAX)]
        );
    }

    #[test]
    fn bugs_are_deduplicated() {
        assert_eq!(
            subscribe_bugs(r#"{"command":"subscribe","bugs":[5,"5",5,6,"6"]}"#),
            vec![bug(5), bug(6)]
        );
        match parse(r#"{"command":"unsubscribe","bugs":[9,"9",9]}"#) {
            Ok(Command::Unsubscribe { bugs }) => assert_eq!(bugs, vec![bug(9)]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_bug_list_is_allowed() {
        assert_eq!(
            parse(r#"{"command":"subscribe","bugs":[]}"#),
            Ok(Command::Subscribe {
                bugs: vec![],
                since: None
            })
        );
        assert_eq!(
            parse(r#"{"command":"unsubscribe","bugs":[]}"#),
            Ok(Command::Unsubscribe { bugs: vec![] })
        );
    }

    #[test]
    fn extra_fields_are_ignored() {
        assert_eq!(
            parse(r#"{"command":"version","bugs":"nonsense","since":13,"x":{"y":[]}}"#),
            Ok(Command::Version)
        );
        assert_eq!(
            parse(r#"{"command":"subscriptions","bugs":[0],"since":"garbage"}"#),
            Ok(Command::Subscriptions)
        );
        // unsubscribe has no `since`, so a bad one does not matter.
        assert_eq!(
            parse(r#"{"command":"unsubscribe","bugs":[1],"since":"garbage"}"#),
            Ok(Command::Unsubscribe { bugs: vec![bug(1)] })
        );
        assert_eq!(
            parse(r#"{"id":1,"command":"subscribe","bugs":1,"extra":null}"#),
            Ok(Command::Subscribe {
                bugs: vec![bug(1)],
                since: None
            })
        );
    }

    #[test]
    fn whitespace_around_json_is_fine() {
        assert_eq!(
            parse(" \n\t{ \"command\" : \"version\" }\r\n "),
            Ok(Command::Version)
        );
    }

    #[test]
    fn duplicate_keys_take_the_last() {
        // serde_json keeps the last value of a repeated key; either choice
        // would be acceptable, but it must not be an error or a panic.
        assert_eq!(
            parse(r#"{"command":"subscribe","command":"version"}"#),
            Ok(Command::Version)
        );
    }

    // ---- parse: errors ----

    #[test]
    fn unparsable_text_is_invalid_json() {
        for text in [
            "",
            " ",
            "{",
            "}",
            "{\"command\":\"version\"",
            "{command:version}",
            "{'command':'version'}",
            "{\"command\":\"version\",}",
            "{\"command\":\"version\"} {}",
            "{\"command\":\"version\"}x",
            "version",
            "NaN",
            "Infinity",
            "-Infinity",
            "undefined",
            "\u{feff}{\"command\":\"version\"}",
            "{\"command\":\"\\ud800\"}",
            "[1e999999]",
        ] {
            assert_eq!(error(text), err(None, "invalid JSON"), "{text:?}");
        }
    }

    #[test]
    fn json_that_is_not_an_object_is_invalid_command() {
        for text in [
            "null",
            "true",
            "1",
            "-0",
            "1e300",
            "\"version\"",
            "[]",
            "[{\"command\":\"version\"}]",
        ] {
            assert_eq!(error(text), err(None, "invalid command"), "{text:?}");
        }
    }

    #[test]
    fn missing_or_non_string_command_is_invalid_command_with_null() {
        for text in [
            "{}",
            r#"{"bugs":[1]}"#,
            r#"{"Command":"version"}"#,
            r#"{"command":null}"#,
            r#"{"command":1}"#,
            r#"{"command":true}"#,
            r#"{"command":["version"]}"#,
            r#"{"command":{"name":"version"}}"#,
        ] {
            assert_eq!(error(text), err(None, "invalid command"), "{text}");
        }
    }

    #[test]
    fn unknown_command_is_echoed() {
        for (text, sent) in [
            (r#"{"command":"frobnicate"}"#, "frobnicate"),
            (r#"{"command":""}"#, ""),
            (r#"{"command":"Version"}"#, "Version"),
            (r#"{"command":"version "}"#, "version "),
            (r#"{"command":"update","bug":1}"#, "update"),
            (r#"{"command":"sübscribe"}"#, "sübscribe"),
            (r#"{"command":"a\"b\\c\u0000"}"#, "a\"b\\c\0"),
        ] {
            assert_eq!(error(text), err(Some(sent), "invalid command"), "{text}");
        }
    }

    #[test]
    fn early_bugzfeed_clients_send_bug() {
        assert_eq!(
            parse(r#"{"command":"subscribe","bug":"42"}"#),
            Ok(Command::Subscribe {
                bugs: vec![bug(42)],
                since: None
            })
        );
        assert_eq!(
            parse(r#"{"command":"unsubscribe","bug":[1,2]}"#),
            Ok(Command::Unsubscribe {
                bugs: vec![bug(1), bug(2)]
            })
        );
        // `bugs` wins when both are sent.
        assert_eq!(
            parse(r#"{"command":"unsubscribe","bugs":1,"bug":2}"#),
            Ok(Command::Unsubscribe { bugs: vec![bug(1)] })
        );
    }

    #[test]
    fn missing_bugs() {
        for command in ["subscribe", "unsubscribe"] {
            for text in [
                json!({"command": command}),
                json!({"command": command, "bugs": null}),
                json!({"command": command, "bug": null}),
                json!({"command": command, "since": "2026-11-28T01:00:00"}),
            ] {
                assert_eq!(
                    error(&text.to_string()),
                    err(Some(command), "missing mandatory arg: bugs"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn bad_bug_ids() {
        for command in ["subscribe", "unsubscribe"] {
            for bugs in [
                json!(0),
                json!(-1),
                json!(1.5),
                json!(1.0),
                json!(4294967296u64),
                json!(u64::MAX),
                json!(i64::MIN),
                json!("0"),
                json!("abc"),
                json!(""),
                json!(" 1"),
                json!("1 "),
                json!("+1"),
                json!("-1"),
                json!("1e3"),
                json!("0x10"),
                json!("١٢٣"),
                json!("99999999999999999999999999999999"),
                json!(true),
                json!({}),
                json!({"id": 1}),
                json!([null]),
                json!([[1]]),
                json!([1, 2, 0]),
                json!([1, "x"]),
                json!([1, 2, 3, null]),
            ] {
                let text = json!({"command": command, "bugs": bugs}).to_string();
                assert_eq!(
                    error(&text),
                    err(Some(command), "invalid bug id; must be integer"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn huge_numbers_are_bad_bug_ids_not_panics() {
        for number in [
            "1e300",
            "123456789012345678901234567890",
            "-123456789012345678901234567890",
            "1.7976931348623157e308",
            "5e-324",
        ] {
            let text = format!(r#"{{"command":"subscribe","bugs":[{number}]}}"#);
            assert_eq!(
                error(&text),
                err(Some("subscribe"), "invalid bug id; must be integer"),
                "{text}"
            );
        }
    }

    #[test]
    fn numbers_beyond_f64_are_invalid_json() {
        // serde_json refuses a number it cannot hold even as an f64.
        for number in ["1e400", "-1e400", &"9".repeat(400)] {
            let text = format!(r#"{{"command":"subscribe","bugs":[{number}]}}"#);
            assert_eq!(error(&text), err(None, "invalid JSON"), "{number}");
        }
    }

    #[test]
    fn bad_since() {
        for value in [
            json!("garbage"),
            json!("2026-11-28"),
            json!("2026-11-28T01:00"),
            json!("2026-11-28T01:00:00.5"),
            json!("2026-13-01T00:00:00"),
            json!(0),
            json!(1764291600),
            json!(false),
            json!([]),
            json!(["2026-11-28T01:00:00"]),
            json!({}),
            json!(" "),
        ] {
            let text = json!({"command": "subscribe", "bugs": [1], "since": value}).to_string();
            assert_eq!(
                error(&text),
                err(
                    Some("subscribe"),
                    "invalid since; expected YYYY-MM-DDTHH:MM:SS"
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn bugs_are_checked_before_since() {
        assert_eq!(
            error(r#"{"command":"subscribe","bugs":["x"],"since":"x"}"#),
            err(Some("subscribe"), "invalid bug id; must be integer")
        );
        assert_eq!(
            error(r#"{"command":"subscribe","since":"x"}"#),
            err(Some("subscribe"), "missing mandatory arg: bugs")
        );
    }

    #[test]
    fn absent_null_or_empty_since_means_no_catch_up() {
        for text in [
            r#"{"command":"subscribe","bugs":[1]}"#,
            r#"{"command":"subscribe","bugs":[1],"since":null}"#,
            r#"{"command":"subscribe","bugs":[1],"since":""}"#,
        ] {
            assert_eq!(subscribe_since(text), None, "{text}");
        }
    }

    #[test]
    fn since_is_normalised() {
        for text in [
            r#"{"command":"subscribe","bugs":[1],"since":"2026-11-28T01:02:03"}"#,
            r#"{"command":"subscribe","bugs":[1],"since":"2026-11-28 01:02:03"}"#,
            r#"{"command":"subscribe","bugs":[1],"since":"2026-11-28T01:02:03Z"}"#,
            r#"{"command":"subscribe","bugs":[1],"since":"2026-11-28 01:02:03Z"}"#,
        ] {
            assert_eq!(
                subscribe_since(text).as_ref().map(Since::as_str),
                Some("2026-11-28T01:02:03"),
                "{text}"
            );
        }
    }

    // ---- Since ----

    #[test]
    fn since_accepts_t_space_and_z() {
        for s in [
            "2026-11-28T01:02:03",
            "2026-11-28 01:02:03",
            "2026-11-28T01:02:03Z",
            "2026-11-28 01:02:03Z",
        ] {
            assert_eq!(Since::parse(s).unwrap().as_str(), "2026-11-28T01:02:03");
        }
    }

    #[test]
    fn since_accepts_the_edges_of_real_dates() {
        for s in [
            "0000-01-01T00:00:00",
            "9999-12-31T23:59:59",
            "2026-01-31T00:00:00",
            "2026-03-31T00:00:00",
            "2026-04-30T00:00:00",
            "2024-02-29T12:00:00",
            "2000-02-29T12:00:00",
            "2026-02-28T23:59:59",
        ] {
            assert_eq!(Since::parse(s).map(|t| t.0), Some(s.to_owned()), "{s}");
        }
    }

    #[test]
    fn since_rejects_impossible_times() {
        for s in [
            "2026-13-01T00:00:00",
            "2026-00-01T00:00:00",
            "2026-01-00T00:00:00",
            "2026-01-32T00:00:00",
            "2026-04-31T00:00:00",
            "2026-06-31T00:00:00",
            "2026-09-31T00:00:00",
            "2026-11-31T00:00:00",
            "2026-02-29T00:00:00",
            "1900-02-29T00:00:00",
            "2024-02-30T00:00:00",
            "2026-11-28T24:00:00",
            "2026-11-28T25:00:00",
            "2026-11-28T23:60:00",
            "2026-11-28T23:59:60",
            "2026-11-28T99:99:99",
        ] {
            assert_eq!(Since::parse(s), None, "{s}");
        }
    }

    #[test]
    fn since_rejects_other_formats() {
        for s in [
            "",
            "Z",
            "2026-11-28",
            "2026-11-28T01:02",
            "2026-11-28T01:02:03ZZ",
            "2026-11-28t01:02:03",
            "2026-11-28T01:02:03z",
            "2026-11-28_01:02:03",
            "2026-11-28T01:02:03.000",
            "2026-11-28T01:02:03+00:00",
            "2026-11-28T01:02:03 ",
            " 2026-11-28T01:02:03",
            "2026/11/28T01:02:03",
            "2026-11-28T01-02-03",
            "26-11-28T01:02:03",
            "+2026-11-28T01:02:03",
            "02026-11-28T01:02:03",
            "2026-1-28T01:02:03",
            "2026-11-28T1:02:03",
            "2026-1a-28T01:02:03",
            "２０２６-11-28T01:02:03",
            "2026-11-28T01:02:0é",
            "é026-11-28T01:02:03",
            "2026-11-28T01:02:03\u{0}",
            "1764291600",
            "yesterday",
        ] {
            assert_eq!(Since::parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn since_orders_like_change_times() {
        let earlier = since("2026-11-28 01:02:03Z");
        let later = since("2026-11-28T01:02:04");
        assert!(earlier < later);
        let at = ChangeTime::new("2026-11-28T01:02:03");
        assert!(earlier.covers(&at));
        assert!(!later.covers(&at));
        // Other spellings of the same time, as Pulse publishers send them,
        // compare as that time, not as text.
        for other in [
            "2026-11-28 01:02:03",
            "2026-11-28T01:02:03Z",
            "2026-11-28T01:02:03.25",
        ] {
            assert!(earlier.covers(&ChangeTime::new(other)), "{other}");
            assert!(!later.covers(&ChangeTime::new(other)), "{other}");
        }
        assert!(later.covers(&ChangeTime::new("2026-11-28 01:02:05")));
        assert_eq!(earlier.to_string(), "2026-11-28T01:02:03");
    }

    // ---- replies ----

    #[test]
    fn subscriptions_reply_lists_bugs_ascending_without_duplicates() {
        let text = subscriptions_reply("unsubscribe", [bug(5678), bug(12), bug(5678), bug(1234)]);
        assert_eq!(
            text,
            r#"{"command":"unsubscribe","result":"ok","bugs":[12,1234,5678]}"#
        );
        assert_eq!(
            subscriptions_reply("subscriptions", []),
            r#"{"command":"subscriptions","result":"ok","bugs":[]}"#
        );
        let set = BTreeSet::from([bug(3), bug(1)]);
        assert_eq!(
            json(&subscriptions_reply("subscriptions", set.iter().copied())),
            json!({"command": "subscriptions", "result": "ok", "bugs": [1, 3]})
        );
    }

    #[test]
    fn subscribe_reply_adds_partial_only_when_partial() {
        assert_eq!(
            subscribe_reply([bug(5678), bug(1234)], false),
            r#"{"command":"subscribe","result":"ok","bugs":[1234,5678]}"#
        );
        assert_eq!(
            subscribe_reply([bug(42)], true),
            r#"{"command":"subscribe","result":"ok","bugs":[42],"partial":true}"#
        );
    }

    #[test]
    fn version_reply_carries_the_crate_version() {
        assert_eq!(
            json(&version_reply()),
            json!({"command": "version", "result": "ok", "version": env!("CARGO_PKG_VERSION")})
        );
        assert!(version_reply().starts_with(r#"{"command":"version","#));
    }

    #[test]
    fn error_reply_texts() {
        let cases = [
            ("not json", None, "invalid JSON"),
            ("[]", None, "invalid command"),
            (r#"{"command":7}"#, None, "invalid command"),
            (r#"{"command":"nope"}"#, Some("nope"), "invalid command"),
            (
                r#"{"command":"subscribe"}"#,
                Some("subscribe"),
                "missing mandatory arg: bugs",
            ),
            (
                r#"{"command":"unsubscribe","bugs":"x"}"#,
                Some("unsubscribe"),
                "invalid bug id; must be integer",
            ),
            (
                r#"{"command":"subscribe","bugs":1,"since":"x"}"#,
                Some("subscribe"),
                "invalid since; expected YYYY-MM-DDTHH:MM:SS",
            ),
        ];
        for (text, command, message) in cases {
            let reply = error_reply(&parse(text).unwrap_err());
            assert_eq!(
                json(&reply),
                json!({"command": command, "result": "error", "error": message}),
                "{text}"
            );
            assert!(reply.starts_with(r#"{"command":"#), "{reply}");
        }
    }

    #[test]
    fn error_reply_for_null_command_is_exact() {
        assert_eq!(
            error_reply(&parse("{").unwrap_err()),
            r#"{"command":null,"result":"error","error":"invalid JSON"}"#
        );
    }

    #[test]
    fn too_many_subscriptions() {
        let e = ProtocolError::too_many_subscriptions("subscribe", 1000);
        assert_eq!(e.command(), Some("subscribe"));
        assert_eq!(e.kind(), ErrorKind::TooManySubscriptions { limit: 1000 });
        assert_eq!(
            error_reply(&e),
            r#"{"command":"subscribe","result":"error","error":"too many subscriptions (limit 1000)"}"#
        );
    }

    #[test]
    fn error_reply_escapes_the_echoed_command() {
        let text = r#"{"command":"<\"quote\">\\\n\u0001\u2028😀"}"#;
        let e = parse(text).unwrap_err();
        assert_eq!(e.command(), Some("<\"quote\">\\\n\u{1}\u{2028}😀"));
        let reply = error_reply(&e);
        assert_eq!(
            json(&reply),
            json!({"command": "<\"quote\">\\\n\u{1}\u{2028}😀", "result": "error", "error": "invalid command"})
        );
        assert!(!reply.contains('\n'), "{reply}");
    }

    #[test]
    fn protocol_error_display_names_the_command() {
        assert_eq!(
            parse(r#"{"command":"subscribe"}"#).unwrap_err().to_string(),
            r#"command "subscribe": missing mandatory arg: bugs"#
        );
        assert_eq!(parse("x").unwrap_err().to_string(), "invalid JSON");
    }

    #[test]
    fn update_frame() {
        let n = Notification {
            bug: bug(1234),
            when: ChangeTime::new("2026-11-28T02:04:50"),
        };
        assert_eq!(
            update(&n),
            r#"{"command":"update","bug":1234,"when":"2026-11-28T02:04:50"}"#
        );
    }

    #[test]
    fn update_passes_when_through_verbatim_and_escaped() {
        for when in [
            "2026-11-28 02:04:50",
            "2026-11-28T02:04:50.123+01:00",
            "",
            "\"}{\\",
            "naïve\u{0}\u{7f}",
        ] {
            let n = Notification {
                bug: bug(u32::MAX),
                when: ChangeTime::new(when),
            };
            assert_eq!(
                json(&update(&n)),
                json!({"command": "update", "bug": u32::MAX, "when": when})
            );
        }
    }

    // ---- robustness ----

    #[test]
    fn nasty_inputs_never_panic() {
        let deep_arrays = "[".repeat(10_000);
        let deep_closed = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_objects = "{\"a\":".repeat(10_000);
        let deep_bugs = format!(
            r#"{{"command":"subscribe","bugs":{}1{}}}"#,
            "[".repeat(5_000),
            "]".repeat(5_000)
        );
        let deep_since = format!(
            r#"{{"command":"subscribe","bugs":1,"since":{}"x"{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        let deep_extra = format!(
            r#"{{"command":"version","x":{}0{}}}"#,
            "[".repeat(120),
            "]".repeat(120)
        );
        let long_command = format!(r#"{{"command":"{}"}}"#, "x".repeat(1 << 20));
        let many_bugs = format!(
            r#"{{"command":"subscribe","bugs":[{}]}}"#,
            (1..=100_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let long_number = format!(r#"{{"command":"subscribe","bugs":[{}]}}"#, "9".repeat(300));
        let long_since = format!(
            r#"{{"command":"subscribe","bugs":1,"since":"{}"}}"#,
            "2".repeat(100_000)
        );
        let mut inputs: Vec<String> = vec![
            deep_arrays,
            deep_closed,
            deep_objects,
            deep_bugs,
            deep_since,
            deep_extra,
            long_command,
            many_bugs,
            long_number,
            long_since,
        ];
        for s in [
            "",
            "\0",
            "\u{feff}",
            "NaN",
            "nan",
            "-nan",
            "inf",
            "1e99999",
            "-1e99999",
            "0.0000000000000000000000000000000000001",
            "18446744073709551616",
            &"9".repeat(100_000),
            &format!("0.{}1", "0".repeat(100_000)),
            "-9223372036854775809",
            "\"\\ud83d\"",
            "\"\\udc00\\ud800\"",
            "\"\\u0000\"",
            "\"\\uZZZZ\"",
            "{\"command\":\"subscribe\",\"bugs\":[NaN]}",
            "{\"command\":\"subscribe\",\"bugs\":[Infinity]}",
            "{\"command\":\"subscribe\",\"bugs\":\"NaN\"}",
            "{\"command\":\"subscribe\",\"bugs\":\"1e400\"}",
            "{\"command\":\"subscribe\",\"bugs\":1e400}",
            "{\"command\":\"subscribe\",\"bugs\":-0}",
            "{\"command\":\"subscribe\",\"bugs\":-0.0}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"2026-02-31T00:00:00\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"é2026-11-28T01:02:0\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"2026-11-28T01:02:0é\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"2026-11-28T01:02é\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"😀😀😀😀😀Z\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"ééééééééé\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1],\"since\":\"ééééééééé\u{0}Z\"}",
            "{\"command\":\"subscribe\",\"bugs\":[\"١\"]}",
            "{\"command\":\"subscribe\",\"bugs\":[\"𝟙\"]}",
            "{\"command\":\"\u{202e}ebircsbus\"}",
            "{\"command\":\"subscribe\",\"bugs\":{\"bugs\":[1]}}",
            "{\"command\":{\"command\":\"subscribe\"}}",
            "{\"\":\"\"}",
            "{\"command\":\"subscribe\",\"bugs\":[1]}\0",
            "\u{0}{\"command\":\"version\"}",
            "{\"command\":\"version\"}\u{2028}",
            "[\"command\",\"version\"]",
            "{\"command\":\"version\"",
            "{\"command\":\"version\" \"x\":1}",
            "{\"command\":\"version\",\"command\"}",
            "{{}}",
            "}{",
            "\"unterminated",
            "tru",
            "nul",
            "-",
            "+1",
            "01",
            "1.",
            ".5",
            "0x1F",
        ] {
            inputs.push(s.to_owned());
        }
        for input in &inputs {
            // Any result is fine; what matters is that it returns and that
            // an error becomes a well-formed reply.
            match parse(input) {
                Ok(_) => {}
                Err(e) => {
                    let reply = json(&error_reply(&e));
                    assert_eq!(reply["result"], "error");
                }
            }
        }
        // Spot checks on the deep and the long ones.
        assert_eq!(error(&inputs[0]), err(None, "invalid JSON"));
        assert_eq!(error(&inputs[1]), err(None, "invalid JSON"));
        assert_eq!(error(&inputs[3]), err(None, "invalid JSON"));
        assert_eq!(parse(&inputs[5]), Ok(Command::Version));
        assert_eq!(subscribe_bugs(&inputs[7]).len(), 100_000);
        assert_eq!(
            error(&inputs[8]),
            err(Some("subscribe"), "invalid bug id; must be integer")
        );
        assert_eq!(
            error(&inputs[9]),
            err(
                Some("subscribe"),
                "invalid since; expected YYYY-MM-DDTHH:MM:SS"
            )
        );
    }

    #[test]
    fn since_parse_never_panics_on_mangled_times() {
        // A valid time with one character replaced (multi-byte ones
        // included) at each position, and every prefix of that.
        let base: Vec<char> = "2026-11-28T01:02:03Z".chars().collect();
        for position in 0..base.len() {
            for c in ['é', '😀', '\0', ' ', 'Z', 'T', '-', ':', '0', '9', 'a'] {
                let mut chars = base.clone();
                chars[position] = c;
                for len in 0..=chars.len() {
                    let s: String = chars[..len].iter().collect();
                    let _ = Since::parse(&s);
                }
            }
        }
        for len in 0..25 {
            let _ = Since::parse(&"é".repeat(len));
            let _ = Since::parse(&"9".repeat(len));
        }
    }
}
