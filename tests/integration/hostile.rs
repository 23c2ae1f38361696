//! Hostile input: nothing a client or a publisher sends crashes bzpush,
//! gets a wrong answer, or degrades the service for anyone else.
//!
//! Part 1 needs no service: a deterministic, seeded fuzz of the two
//! decoders of untrusted bytes, [`protocol::parse`] (client frames, README "The client protocol")
//! and [`pulse::decode`] (Pulse bodies, README "Pulse: poll and serve"). A corpus of nasty cases,
//! every `since` format variant, then mutated valid messages and random
//! JSON trees for a bounded time. Every result is checked against a small
//! model of the documented protocol written here, and every error must become a
//! well-formed reply carrying one of the documented texts. `FUZZ_SECS` (default
//! 2) sets the time per decoder and `FUZZ_SEED` the seed, for longer runs:
//! `FUZZ_SECS=600 cargo test --test integration hostile::fuzz`. A failure prints the
//! seed, the round and the input.
//!
//! Part 2 attacks a real `bzpush serve` over TCP: slowloris, handshake
//! floods, bad and oversize frames, huge subscribes, odd `since`, bad HTTP,
//! poison Pulse messages. Each attack gets its documented answer, and after
//! it a normal client still connects, subscribes and receives an update,
//! and `/health` answers 200.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::frames::{MASK, client_frame, server_frame};
use crate::util::serve::{
    Client, Stamps, healthy_server, http_get, metric, raw_handshake, update, version,
};
use crate::util::{Bzpush, Rng, TestBroker, datetime, rss_kib, wait_until};
use bzpush::notification::{BugId, ChangeTime, Notification};
use bzpush::protocol::{self, Command, ProtocolError, Since};
use bzpush::pulse;
use serde_json::{Map, Value, json};

const WAIT: Duration = Duration::from_secs(20);

// ======================================================================
// Part 1: the decoders
// ======================================================================

fn fuzz_budget() -> Duration {
    let secs = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.0))
}

fn fuzz_seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0b2f_5eed_2026_1128)
}

/// Runs `round` with a fresh deterministic generator per round until the
/// budget is spent (and at least `min_rounds` times); says which round and
/// seed failed. Returns the number of rounds.
fn fuzz_for(name: &str, min_rounds: u64, mut round: impl FnMut(&mut Rng)) -> u64 {
    let (budget, seed) = (fuzz_budget(), fuzz_seed());
    let start = Instant::now();
    let mut n = 0u64;
    while n < min_rounds || start.elapsed() < budget {
        let mut rng = Rng(seed ^ n.wrapping_mul(0xa076_1d64_78bd_642f));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| round(&mut rng)));
        if let Err(e) = outcome {
            eprintln!("{name}: round {n} failed (FUZZ_SEED={seed})");
            std::panic::resume_unwind(e);
        }
        n += 1;
    }
    eprintln!("{name}: {n} rounds in {:?}", start.elapsed());
    n
}

// ---- the model: the documented protocol as the test reads it ----

const INVALID_JSON: &str = "invalid JSON";
const INVALID_COMMAND: &str = "invalid command";
const MISSING_BUGS: &str = "missing mandatory arg: bugs";
const INVALID_BUG_ID: &str = "invalid bug id; must be integer";
const INVALID_SINCE: &str = "invalid since; expected YYYY-MM-DDTHH:MM:SS";
const DOCUMENTED_ERRORS: [&str; 5] = [
    INVALID_JSON,
    INVALID_COMMAND,
    MISSING_BUGS,
    INVALID_BUG_ID,
    INVALID_SINCE,
];

/// What a frame should parse to, in plain values.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Subscribe(BTreeSet<u32>, Option<String>),
    Unsubscribe(BTreeSet<u32>),
    Subscriptions,
    Version,
    Error(Option<String>, &'static str),
}

/// A bug id: a JSON integer or a string of ASCII digits, 1 to 2^32-1.
fn model_id(value: &Value) -> Option<u32> {
    let n = match value {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let significant = s.trim_start_matches('0');
            if significant.len() > 10 {
                return None;
            }
            significant.parse::<u64>().unwrap_or(0)
        }
        _ => return None,
    };
    u32::try_from(n).ok().filter(|&n| n > 0)
}

/// `YYYY-MM-DDTHH:MM:SS`, `T` or space, optional trailing `Z`, a real
/// calendar time; normalised to the `T` form.
fn model_since(s: &str) -> Option<String> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    const PATTERN: &[u8; 19] = b"dddd-dd-dd_dd:dd:dd";
    let b = s.as_bytes();
    if b.len() != PATTERN.len() {
        return None;
    }
    let shape = PATTERN.iter().zip(b).all(|(&p, &c)| match p {
        b'd' => c.is_ascii_digit(),
        b'_' => c == b'T' || c == b' ',
        _ => c == p,
    });
    if !shape {
        return None;
    }
    let n = |from: usize, to: usize| s[from..to].parse::<u32>().expect("digits");
    let (year, month, day) = (n(0, 4), n(5, 7), n(8, 10));
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1..=12).contains(&month)
        && day >= 1
        && day <= days[month as usize - 1]
        && n(11, 13) < 24
        && n(14, 16) < 60
        && n(17, 19) < 60;
    valid.then(|| format!("{}T{}", &s[..10], &s[11..]))
}

fn model_bugs(object: &Map<String, Value>) -> Result<BTreeSet<u32>, &'static str> {
    let given = match object.get("bugs") {
        None | Some(Value::Null) => object.get("bug"),
        bugs => bugs,
    };
    match given {
        None | Some(Value::Null) => Err(MISSING_BUGS),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| model_id(v).ok_or(INVALID_BUG_ID))
            .collect(),
        Some(one) => model_id(one)
            .map(|id| BTreeSet::from([id]))
            .ok_or(INVALID_BUG_ID),
    }
}

fn model_since_field(object: &Map<String, Value>) -> Result<Option<String>, &'static str> {
    match object.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => model_since(s).map(Some).ok_or(INVALID_SINCE),
        Some(_) => Err(INVALID_SINCE),
    }
}

fn model(text: &str) -> Expected {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Expected::Error(None, INVALID_JSON);
    };
    let Some(object) = value.as_object() else {
        return Expected::Error(None, INVALID_COMMAND);
    };
    let Some(Value::String(name)) = object.get("command") else {
        return Expected::Error(None, INVALID_COMMAND);
    };
    let fail = |text| Expected::Error(Some(name.clone()), text);
    match name.as_str() {
        "subscribe" => match (model_bugs(object), model_since_field(object)) {
            (Err(e), _) | (Ok(_), Err(e)) => fail(e),
            (Ok(bugs), Ok(since)) => Expected::Subscribe(bugs, since),
        },
        "unsubscribe" => match model_bugs(object) {
            Err(e) => fail(e),
            Ok(bugs) => Expected::Unsubscribe(bugs),
        },
        "subscriptions" => Expected::Subscriptions,
        "version" => Expected::Version,
        _ => fail(INVALID_COMMAND),
    }
}

/// Distinct ids, all positive.
fn id_set(bugs: &[BugId]) -> BTreeSet<u32> {
    let set: BTreeSet<u32> = bugs.iter().map(|b| b.get()).collect();
    assert_eq!(set.len(), bugs.len(), "duplicate ids in {bugs:?}");
    assert!(set.iter().all(|&id| id > 0), "{bugs:?}");
    set
}

fn check_since(since: &Since) -> String {
    let s = since.as_str();
    assert_eq!(
        Since::parse(s).as_ref(),
        Some(since),
        "a normalised since reads back as itself"
    );
    assert_eq!(s.len(), 19, "{s:?}");
    assert_eq!(&s[10..11], "T", "{s:?}");
    s.to_owned()
}

/// An error becomes a reply that is a JSON object of exactly `command`
/// (the command as sent, or null), `result` `error`, and a documented text.
fn check_error_reply(error: &ProtocolError) -> Expected {
    let reply = protocol::error_reply(error);
    let value: Value = serde_json::from_str(&reply)
        .unwrap_or_else(|e| panic!("error reply is not JSON ({e}): {reply}"));
    let object = value.as_object().expect("error reply is an object");
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 3, "{reply}");
    assert_eq!(object["result"], "error", "{reply}");
    let text = object["error"].as_str().expect("error text is a string");
    let spec = DOCUMENTED_ERRORS
        .iter()
        .find(|&&t| t == text)
        .unwrap_or_else(|| panic!("not a documented error text: {reply}"));
    assert_eq!(text, error.kind().to_string());
    match error.command() {
        Some(c) => assert_eq!(object["command"], c, "{reply}"),
        None => assert_eq!(object["command"], Value::Null, "{reply}"),
    }
    assert!(!reply.contains('\n'), "one line: {reply}");
    Expected::Error(error.command().map(str::to_owned), spec)
}

/// Parses `text`, checks the result's invariants and that it is what the
/// model expects.
fn check_parse(text: &str) {
    let result = protocol::parse(text);
    assert_eq!(result, protocol::parse(text), "parse is deterministic");
    let got = match &result {
        Ok(Command::Subscribe { bugs, since }) => {
            Expected::Subscribe(id_set(bugs), since.as_ref().map(check_since))
        }
        Ok(Command::Unsubscribe { bugs }) => Expected::Unsubscribe(id_set(bugs)),
        Ok(Command::Subscriptions) => Expected::Subscriptions,
        Ok(Command::Version) => Expected::Version,
        Err(e) => check_error_reply(e),
    };
    let expected = model(text);
    if got != expected {
        let shown: String = text.chars().take(300).collect();
        panic!("parse({shown:?}) gave {got:?}, the documented protocol says {expected:?}");
    }
}

fn pulse_model(body: &[u8]) -> Result<(u32, String), &'static str> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Err("body is not JSON");
    };
    let Some(payload) = value.as_object().and_then(|o| o.get("payload")) else {
        return Err("no payload");
    };
    let fields = payload.as_object();
    let Some(id) = fields.and_then(|p| p.get("id")).and_then(model_id) else {
        return Err("payload.id is not a bug id");
    };
    match fields.and_then(|p| p.get("delta_ts")) {
        Some(Value::String(when)) => Ok((id, when.clone())),
        _ => Err("payload.delta_ts is not a string"),
    }
}

fn check_decode(body: &[u8]) {
    let got = pulse::decode(body)
        .map(|n| (n.bug.get(), n.when.as_str().to_owned()))
        .map_err(|e| e.to_string());
    let expected = pulse_model(body).map_err(str::to_owned);
    if got != expected {
        let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        panic!("decode({shown:?}) gave {got:?}, the documented protocol says {expected:?}");
    }
    if let Ok((_, when)) = &got {
        // What a subscriber then receives is JSON carrying `when` verbatim.
        let n = pulse::decode(body).expect("decoded once");
        let frame: Value = serde_json::from_str(&protocol::update(&n)).expect("update is JSON");
        assert_eq!(frame["when"], when.as_str());
        assert_eq!(frame["bug"], n.bug.get());
    }
}

// ---- generators ----

/// Characters that break naive code: multi-byte, invisible, directional,
/// line separators, JSON syntax, digits from other scripts.
const ODD_CHARS: &[char] = &[
    'a',
    'Z',
    'T',
    ' ',
    '-',
    ':',
    '0',
    '1',
    '9',
    '"',
    '\\',
    '/',
    '{',
    '}',
    '[',
    ']',
    ',',
    'é',
    'ß',
    '😀',
    '\u{0}',
    '\u{1}',
    '\u{7f}',
    '\u{a0}',
    '\u{ad}',
    '\u{200b}',
    '\u{202e}',
    '\u{2028}',
    '\u{2029}',
    '\u{feff}',
    '\u{fffd}',
    '\u{ffff}',
    '\u{10ffff}',
    '٣',
    '０',
    '𝟙',
    '\n',
    '\t',
];

fn odd_string(rng: &mut Rng, max: usize) -> String {
    let len = rng.below(max + 1);
    (0..len).map(|_| *rng.pick(ODD_CHARS)).collect()
}

fn digits(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .map(|_| char::from(b'0' + rng.below(10) as u8))
        .collect()
}

/// Something that may or may not be a bug id.
fn id_like(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0..=4 => json!(1 + rng.below(100)),
        5 => json!((1 + rng.below(100)).to_string()),
        6 => json!(*rng.pick(&[0u64, u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX])),
        7 => json!(*rng.pick(&[-1i64, i64::MIN, -0])),
        8 => json!(*rng.pick(&[1.0f64, 1.5, 1e3, -0.0, 1e300, f64::MIN_POSITIVE])),
        9 => json!(*rng.pick(&[
            "",
            "0",
            " 1",
            "1 ",
            "+1",
            "-1",
            "1e3",
            "0x1",
            "١",
            "１",
            "1.0",
            "4294967295",
            "4294967296",
            "0004294967295",
            "00000000000000000000000000001",
        ])),
        10 => {
            let len = 1 + rng.below(25);
            json!(digits(rng, len))
        }
        11 => json!(odd_string(rng, 6)),
        12 => Value::Null,
        13 => json!(rng.one_in(2)),
        14 => json!([1 + rng.below(9)]),
        _ => json!({"id": 1}),
    }
}

/// Something that may or may not be a `since`.
fn since_like(rng: &mut Rng) -> String {
    let year = match rng.below(6) {
        0 => digits(rng, 4),
        1 => (*rng.pick(&["0000", "1900", "2000", "2024", "2100", "9999"])).to_string(),
        2 => {
            let len = 1 + rng.below(6);
            digits(rng, len)
        }
        _ => "2026".to_string(),
    };
    // Half the time the numbers are a real time; otherwise any two digits
    // (month 13, hour 25...), or some other number of digits.
    let real = rng.one_in(2);
    let field = |rng: &mut Rng, low: usize, high: usize, max: usize| {
        if real {
            format!("{:02}", low + rng.below(high - low + 1))
        } else if rng.one_in(8) {
            let len = rng.below(4);
            digits(rng, len)
        } else {
            format!("{:02}", rng.below(max))
        }
    };
    let (month, day) = (field(rng, 1, 12, 14), field(rng, 1, 28, 33));
    let hour = field(rng, 0, 23, 26);
    let (minute, second) = (field(rng, 0, 59, 62), field(rng, 0, 59, 62));
    let date_sep = if rng.one_in(10) {
        *rng.pick(&["/", ".", "", "--", "‐"])
    } else {
        "-"
    };
    let middle = if rng.one_in(4) {
        *rng.pick(&["t", "_", "", "  ", "\u{a0}", "Z", "T "])
    } else {
        *rng.pick(&["T", " "])
    };
    let time_sep = if rng.one_in(10) {
        *rng.pick(&[".", "-", "", "::"])
    } else {
        ":"
    };
    let suffix = if rng.one_in(3) {
        *rng.pick(&[
            "z", "ZZ", " ", "+00:00", "-05:00", ".000", ".5Z", "Z ", "\u{0}", "é",
        ])
    } else {
        *rng.pick(&["", "Z"])
    };
    let prefix = if rng.one_in(10) {
        *rng.pick(&[" ", "+", "0", "é", "\u{feff}"])
    } else {
        ""
    };
    let mut s = format!(
        "{prefix}{year}{date_sep}{month}{date_sep}{day}{middle}{hour}{time_sep}{minute}{time_sep}{second}{suffix}"
    );
    if rng.one_in(6) && !s.is_empty() {
        // One character swapped for an odd one (byte lengths change).
        let mut chars: Vec<char> = s.chars().collect();
        let at = rng.below(chars.len());
        chars[at] = *rng.pick(ODD_CHARS);
        s = chars.into_iter().collect();
    }
    s
}

/// A JSON tree: any shape, sometimes deeper than serde_json's recursion
/// limit (128).
fn json_tree(rng: &mut Rng, depth: usize) -> Value {
    if depth >= 4 || rng.one_in(2) {
        return match rng.below(7) {
            0 => Value::Null,
            1 => json!(rng.one_in(2)),
            2 => id_like(rng),
            3 => json!(odd_string(rng, 12)),
            4 => json!(since_like(rng)),
            5 => json!(f64::from_bits(rng.next())),
            _ => json!(rng.next() as i64),
        };
    }
    match rng.below(8) {
        0 => {
            // A deep chain around a leaf, around the recursion limit.
            let levels = *rng.pick(&[60usize, 126, 127, 128, 129, 200]);
            let mut v = json_tree(rng, 5);
            for i in 0..levels {
                // Not `json!([v])`: that copies `v` each time.
                v = if i % 2 == 0 {
                    Value::Array(vec![v])
                } else {
                    Value::Object(Map::from_iter([("a".to_string(), v)]))
                };
            }
            v
        }
        1..=3 => {
            let len = rng.below(5);
            Value::Array((0..len).map(|_| json_tree(rng, depth + 1)).collect())
        }
        _ => {
            let len = rng.below(5);
            let mut map = Map::new();
            for _ in 0..len {
                let key = if rng.one_in(2) {
                    (*rng.pick(&[
                        "command", "bugs", "bug", "since", "payload", "id", "delta_ts", "_meta",
                    ]))
                    .to_string()
                } else {
                    odd_string(rng, 6)
                };
                map.insert(key, json_tree(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

/// A client command, mostly well-formed, with random fields.
fn command_like(rng: &mut Rng) -> Value {
    let mut map = Map::new();
    let command = match rng.below(12) {
        0..=3 => json!("subscribe"),
        4..=5 => json!("unsubscribe"),
        6 => json!("subscriptions"),
        7 => json!("version"),
        8 => json!(*rng.pick(&[
            "Subscribe",
            "subscribe ",
            "",
            "SUBSCRIBE",
            "update",
            "subscribé"
        ])),
        9 => json!(odd_string(rng, 8)),
        10 => json_tree(rng, 3),
        _ => Value::Null,
    };
    if !rng.one_in(12) {
        map.insert("command".into(), command);
    }
    let bugs = |rng: &mut Rng| match rng.below(6) {
        0 => id_like(rng),
        1..=3 => {
            let len = if rng.one_in(20) { 2000 } else { rng.below(8) };
            // Often all good ids (with repeats), so that commands succeed.
            let good = rng.one_in(2);
            Value::Array(
                (0..len)
                    .map(|_| match (good, rng.below(2)) {
                        (true, 0) => json!(1 + rng.below(50)),
                        (true, _) => json!((1 + rng.below(50)).to_string()),
                        (false, _) => id_like(rng),
                    })
                    .collect(),
            )
        }
        4 => Value::Null,
        _ => json_tree(rng, 2),
    };
    if !rng.one_in(6) {
        map.insert("bugs".into(), bugs(rng));
    }
    if rng.one_in(5) {
        map.insert("bug".into(), bugs(rng));
    }
    if rng.one_in(2) {
        let since = match rng.below(8) {
            0 => Value::Null,
            1 => json!(""),
            2 => json_tree(rng, 3),
            _ => json!(since_like(rng)),
        };
        map.insert("since".into(), since);
    }
    for _ in 0..rng.below(3) {
        map.insert(odd_string(rng, 5), json_tree(rng, 2));
    }
    Value::Object(map)
}

/// A Pulse body, mostly well-formed.
fn pulse_like(rng: &mut Rng) -> Vec<u8> {
    if rng.one_in(3) {
        let bug = BugId::new(1 + rng.next() as u32 % u32::MAX).expect("positive");
        let when = if rng.one_in(2) {
            since_like(rng)
        } else {
            odd_string(rng, 20)
        };
        let n = Notification {
            bug,
            when: ChangeTime::new(when),
        };
        return pulse::encode(&n, "exchange/bugzilla/simple", "2026-11-28T02:04:51+00:00");
    }
    let mut payload = Map::new();
    if !rng.one_in(8) {
        payload.insert("id".into(), id_like(rng));
    }
    if !rng.one_in(8) {
        let when = match rng.below(5) {
            0 => json_tree(rng, 3),
            1 => json!(odd_string(rng, 10)),
            _ => json!(since_like(rng)),
        };
        payload.insert("delta_ts".into(), when);
    }
    for _ in 0..rng.below(3) {
        payload.insert(odd_string(rng, 5), json_tree(rng, 2));
    }
    let payload = if rng.one_in(10) {
        json_tree(rng, 2)
    } else {
        Value::Object(payload)
    };
    let mut body = json!({"_meta": {"exchange": "exchange/bugzilla/simple", "serializer": "json"}});
    if !rng.one_in(10) {
        body["payload"] = payload;
    }
    if rng.one_in(10) {
        body = json_tree(rng, 0);
    }
    body.to_string().into_bytes()
}

/// Tokens spliced into messages: JSON that stresses number, string and
/// nesting handling.
const TOKENS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "-0.0",
    "18446744073709551616",
    "4294967296",
    "NaN",
    "Infinity",
    "null",
    "true",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "\"\\uZZZZ\"",
    "\"\\\"",
    "[[[[[[[[[[[[",
    "]]]]]]]]",
    "{\"command\":",
    ",\"bugs\":",
    ",\"since\":",
    "\"\"",
    "\u{feff}",
    "\u{2028}",
    "\\",
    "\"",
    "\u{0}",
    "99999999999999999999999999999999999999",
];

/// Mutates `bytes` a few times: bit flips, odd bytes, spliced tokens,
/// deletions, truncation, duplication, splicing with `other`.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        let at = if len == 0 { 0 } else { rng.below(len + 1) };
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                bytes[i] = *rng.pick(&[
                    b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'0', b'9', b'-', b'e', b'.',
                    b' ', 0, 0x7f, 0x80, 0xc3, 0xed, 0xf4, 0xff,
                ]);
            }
            2 => {
                let token = rng.pick(TOKENS).as_bytes();
                bytes.splice(at..at, token.iter().copied());
            }
            3 if len > 0 => {
                let end = (at + 1 + rng.below(8)).min(len);
                bytes.drain(at.min(len - 1)..end);
            }
            4 => bytes.truncate(at),
            5 if len > 0 => {
                let from = rng.below(len);
                let end = (from + 1 + rng.below(32)).min(len);
                let copy = bytes[from..end].to_vec();
                let times = if rng.one_in(8) { 100 } else { 1 };
                for _ in 0..times {
                    bytes.splice(at..at, copy.iter().copied());
                }
            }
            6 if !other.is_empty() => {
                let cut = rng.below(other.len());
                bytes.truncate(at);
                bytes.extend_from_slice(&other[cut..]);
            }
            _ => {
                let odd = odd_string(rng, 3);
                bytes.splice(at..at, odd.bytes());
            }
        }
    }
}

/// Frames that have broken parsers before, and what the documented protocol says of some.
fn protocol_corpus() -> Vec<String> {
    let mut corpus: Vec<String> = [
        r#"{"command":"subscribe","bugs":[1234,5678]}"#,
        r#"{"command":"subscribe","bugs":[42],"since":"2026-11-28T01:00:00"}"#,
        r#"{"command":"unsubscribe","bugs":[1234]}"#,
        r#"{"command":"subscriptions"}"#,
        r#"{"command":"version"}"#,
        r#"{"command":"subscribe","bugs":"42","since":""}"#,
        r#"{"command":"subscribe","bug":[1,2],"since":null}"#,
        r#"{"command":"subscribe","bugs":null,"bug":7}"#,
        r#"{"command":"subscribe","bugs":[]}"#,
        r#"{"command":"subscribe","bugs":[1,1,"1","0001"]}"#,
        r#"{"command":"subscribe","bugs":[4294967295,"4294967295"]}"#,
        r#"{"command":"subscribe","bugs":[4294967296]}"#,
        r#"{"command":"subscribe","bugs":[0]}"#,
        r#"{"command":"subscribe","bugs":[-0]}"#,
        r#"{"command":"subscribe","bugs":[1.0]}"#,
        r#"{"command":"subscribe","bugs":[1e2]}"#,
        r#"{"command":"subscribe","bugs":1e400}"#,
        r#"{"command":"subscribe","bugs":[18446744073709551616]}"#,
        r#"{"command":"subscribe","bugs":["18446744073709551616"]}"#,
        r#"{"command":"subscribe","bugs":["١٢"]}"#,
        r#"{"command":"subscribe","bugs":[true]}"#,
        r#"{"command":"subscribe","bugs":[[1]]}"#,
        r#"{"command":"subscribe","bugs":{"0":1}}"#,
        r#"{"command":"subscribe","bugs":[1],"since":0}"#,
        r#"{"command":"subscribe","bugs":[1],"since":["2026-11-28T01:00:00"]}"#,
        r#"{"command":"subscribe","bugs":["x"],"since":"x"}"#,
        r#"{"command":"unsubscribe","bugs":[1],"since":"garbage"}"#,
        r#"{"command":"version","command":"subscribe","bugs":1}"#,
        r#"{"comm\u0061nd":"vers\u0069on"}"#,
        r#"{"command":"subscribe\u0000","bugs":1}"#,
        r#"{"command":"\ud83d\ude00"}"#,
        r#"{"command":"\ud800"}"#,
        r#"{"command":null}"#,
        r#"{"command":["version"]}"#,
        r#"{"Command":"version"}"#,
        "{\"command\":\"version\"}\u{a0}",
        "\u{feff}{\"command\":\"version\"}",
        " \t\r\n{\"command\":\"version\"} \t\r\n",
        r#"{"command":"version"}{"command":"version"}"#,
        r#"{"command":"version"},"#,
        "",
        " ",
        "null",
        "[]",
        "\"version\"",
        "{",
        "}",
        "{}",
        "NaN",
        "1e99999",
        "\u{0}",
        "\u{2028}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for depth in [126, 127, 128, 129, 5_000] {
        corpus.push(format!(
            r#"{{"command":"version","x":{}0{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ));
        corpus.push(format!(
            r#"{{"command":"subscribe","bugs":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ));
        corpus.push(format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth)));
        corpus.push("[".repeat(depth));
    }
    corpus.push(format!(r#"{{"command":"{}"}}"#, "é".repeat(100_000)));
    corpus.push(format!(
        r#"{{"command":"subscribe","bugs":[{}]}}"#,
        "9".repeat(100_000)
    ));
    corpus.push(format!(
        r#"{{"command":"subscribe","bugs":[1],"since":"{}"}}"#,
        "2".repeat(100_000)
    ));
    let many: Vec<String> = (1..=100_000)
        .map(|i| (i % 50_000 + 1).to_string())
        .collect();
    corpus.push(format!(
        r#"{{"command":"subscribe","bugs":[{}]}}"#,
        many.join(",")
    ));
    corpus
}

/// Every combination of the parts of a `since`: only `YYYY-MM-DD`, `T` or
/// space, `HH:MM:SS`, optional `Z`, and a real date is accepted.
#[test]
fn every_since_format_variant() {
    let dates = [
        ("2026-11-28", "01:02:03", true),
        ("2024-02-29", "23:59:59", true),
        ("2000-02-29", "00:00:00", true),
        ("0000-01-01", "00:00:00", true),
        ("9999-12-31", "23:59:59", true),
        ("1900-02-29", "00:00:00", false),
        ("2026-02-29", "00:00:00", false),
        ("2026-04-31", "00:00:00", false),
        ("2026-13-01", "00:00:00", false),
        ("2026-00-10", "00:00:00", false),
        ("2026-11-00", "00:00:00", false),
        ("2026-11-28", "24:00:00", false),
        ("2026-11-28", "23:60:00", false),
        ("2026-11-28", "23:59:60", false),
    ];
    let prefixes = ["", " ", "+", "0", "\u{feff}"];
    let middles = ["T", " ", "t", "_", "", "  ", "\u{a0}", "TT", "Z"];
    let suffixes = [
        "", "Z", "z", "ZZ", " ", "Z ", "+00:00", ".000", ".000Z", "\u{0}",
    ];
    let mut accepted = 0;
    for (date, time, real) in dates {
        for prefix in prefixes {
            for middle in middles {
                for suffix in suffixes {
                    let since = format!("{prefix}{date}{middle}{time}{suffix}");
                    let ok = real
                        && prefix.is_empty()
                        && (middle == "T" || middle == " ")
                        && (suffix.is_empty() || suffix == "Z");
                    let expected = ok.then(|| format!("{date}T{time}"));
                    assert_eq!(model_since(&since), expected, "model: {since:?}");
                    assert_eq!(
                        Since::parse(&since).as_ref().map(Since::as_str),
                        expected.as_deref(),
                        "{since:?}"
                    );
                    let text = json!({"command": "subscribe", "bugs": [1], "since": since});
                    check_parse(&text.to_string());
                    accepted += usize::from(ok);
                }
            }
        }
    }
    assert_eq!(accepted, 5 * 2 * 2);
    // Every day of a leap and a common year, and the days after the last.
    for year in ["2023", "2024", "1900", "2000"] {
        for month in 0..=13u32 {
            for day in 0..=32u32 {
                let since = format!("{year}-{month:02}-{day:02}T12:00:00");
                assert_eq!(
                    Since::parse(&since).map(|s| s.as_str().to_owned()),
                    model_since(&since),
                    "{since}"
                );
            }
        }
    }
    // Absent, null and "" mean no catch-up; any other type is an error.
    for since in [json!(null), json!("")] {
        check_parse(&json!({"command": "subscribe", "bugs": 1, "since": since}).to_string());
    }
    for since in [
        json!(0),
        json!(true),
        json!([]),
        json!({}),
        json!(1764291600),
    ] {
        let text = json!({"command": "subscribe", "bugs": 1, "since": since}).to_string();
        assert_eq!(
            model(&text),
            Expected::Error(Some("subscribe".into()), INVALID_SINCE)
        );
        check_parse(&text);
    }
}

#[test]
fn fuzz_the_protocol_decoder() {
    let corpus = protocol_corpus();
    for text in &corpus {
        check_parse(text);
    }
    // Spot checks of what the documented protocol says about some of them.
    let spec = |text: &str| model(text);
    assert_eq!(
        spec(r#"{"command":"version","command":"subscribe","bugs":1}"#),
        { Expected::Subscribe(BTreeSet::from([1]), None) }
    );
    assert_eq!(
        spec(r#"{"comm\u0061nd":"vers\u0069on"}"#),
        Expected::Version
    );
    assert_eq!(
        spec(r#"{"command":"subscribe","bugs":[1,1,"1","0001"]}"#),
        Expected::Subscribe(BTreeSet::from([1]), None)
    );
    assert_eq!(
        spec(r#"{"command":"unsubscribe","bugs":[1],"since":"garbage"}"#),
        Expected::Unsubscribe(BTreeSet::from([1]))
    );
    assert_eq!(
        spec(r#"{"command":"subscribe","bugs":["x"],"since":"x"}"#),
        Expected::Error(Some("subscribe".into()), INVALID_BUG_ID)
    );
    assert_eq!(
        spec(r#"{"command":"\ud800"}"#),
        Expected::Error(None, INVALID_JSON)
    );
    assert_eq!(
        spec("\u{feff}{\"command\":\"version\"}"),
        Expected::Error(None, INVALID_JSON)
    );
    for depth in [126, 127] {
        let deep = format!(
            r#"{{"command":"version","x":{}0{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(
            spec(&deep),
            if depth < 127 {
                Expected::Version
            } else {
                Expected::Error(None, INVALID_JSON)
            },
            "{depth}"
        );
    }

    let seeds: Vec<Vec<u8>> = corpus
        .iter()
        .filter(|s| s.len() < 4096)
        .map(|s| s.clone().into_bytes())
        .collect();
    let rounds = fuzz_for("protocol", 2_000, |rng| {
        let text = match rng.below(3) {
            // A random command, as JSON text.
            0 => command_like(rng).to_string(),
            // A random command, mangled.
            1 => {
                let mut bytes = command_like(rng).to_string().into_bytes();
                let other = rng.pick(&seeds).clone();
                mutate(rng, &mut bytes, &other);
                String::from_utf8_lossy(&bytes).into_owned()
            }
            // A corpus entry, mangled.
            _ => {
                let mut bytes = rng.pick(&seeds).clone();
                let other = command_like(rng).to_string().into_bytes();
                mutate(rng, &mut bytes, &other);
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        check_parse(&text);
        // Error replies echo any command string as valid JSON.
        let odd = json!({"command": odd_string(rng, 40)}).to_string();
        check_parse(&odd);
    });
    assert!(rounds >= 2_000);
}

#[test]
fn fuzz_the_pulse_decoder() {
    let n = |bug: u32, when: &str| Notification {
        bug: BugId::new(bug).expect("positive"),
        when: ChangeTime::new(when),
    };
    let mozillapulse = pulse::encode(
        &n(123456, "2026-11-28T02:04:50"),
        "exchange/bugzilla/simple",
        "2026-11-28T02:04:51+00:00",
    );
    let mut corpus: Vec<Vec<u8>> = vec![
        mozillapulse.clone(),
        br#"{"payload":{"id":"5","delta_ts":"x"},"_meta":{}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":""}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":"2026-11-28 02:04:50.123+01:00"}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":"\u0000\ud83d\ude00"}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":"\ud800"}}"#.to_vec(),
        br#"{"payload":{"id":0,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":-5,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":5.0,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":4294967296,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":1e400,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":" 5","delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":[5],"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":null}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":1764291600}}"#.to_vec(),
        br#"{"payload":[5,"x"]}"#.to_vec(),
        br#"{"payload":null}"#.to_vec(),
        br#"{"payload":"{\"id\":5,\"delta_ts\":\"x\"}"}"#.to_vec(),
        br#"[{"payload":{"id":5,"delta_ts":"x"}}]"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":"a"},"payload":{"id":6,"delta_ts":"b"}}"#.to_vec(),
        b"".to_vec(),
        b"null".to_vec(),
        b"\xff\xfe{}".to_vec(),
        b"{\"payload\":{\"id\":5,\"delta_ts\":\"\xc3\"}}".to_vec(),
        b"\xef\xbb\xbf{\"payload\":{\"id\":5,\"delta_ts\":\"x\"}}".to_vec(),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        format!(
            r#"{{"payload":{{"id":5,"delta_ts":"x","deep":{}0{}}}}}"#,
            "[".repeat(126),
            "]".repeat(126)
        )
        .into_bytes(),
        format!(
            r#"{{"payload":{{"id":5,"delta_ts":"{}"}}}}"#,
            "é".repeat(500_000)
        )
        .into_bytes(),
    ];
    for body in &corpus {
        check_decode(body);
    }
    // mozillapulse's own body, and ids as strings, are notifications.
    assert_eq!(
        pulse::decode(&mozillapulse),
        Ok(n(123456, "2026-11-28T02:04:50"))
    );
    assert_eq!(pulse_model(&corpus[1]), Ok((5, "x".into())));
    // Duplicate keys: the last one wins, as in any JSON reader here.
    assert_eq!(pulse_model(&corpus[19]), Ok((6, "b".into())));
    corpus.retain(|b| b.len() < 4096);

    let rounds = fuzz_for("pulse", 2_000, |rng| {
        // What the poller encodes decodes to the same notification.
        let bug = 1 + rng.next() as u32 % u32::MAX;
        let when = odd_string(rng, 30);
        let sent = odd_string(rng, 5);
        let original = n(bug, &when);
        let body = pulse::encode(&original, &odd_string(rng, 10), &sent);
        assert_eq!(pulse::decode(&body), Ok(original));

        let mut body = match rng.below(3) {
            0 => pulse_like(rng),
            _ => rng.pick(&corpus).clone(),
        };
        check_decode(&body);
        let other = pulse_like(rng);
        mutate(rng, &mut body, &other);
        check_decode(&body);
        // Random bytes, often not UTF-8.
        let len = rng.below(64);
        let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        check_decode(&noise);
    });
    assert!(rounds >= 2_000);
}

// ======================================================================
// Part 2: a running server under attack
// ======================================================================

fn t(secs: u32) -> String {
    datetime(secs).1
}

fn ok(command: &str, bugs: &[u64]) -> Value {
    json!({"command": command, "result": "ok", "bugs": bugs})
}

fn error(command: Option<&str>, text: &str) -> Value {
    json!({"command": command, "result": "error", "error": text})
}

/// After an attack: `/health` is 200, and a new client connects,
/// subscribes and receives a published update. `probe` makes the bug and
/// time unique per call.
fn assert_still_serves(server: &Bzpush, broker: &TestBroker, probe: u32) {
    let addr = server.listen_addr();
    let (status, body) = http_get(&addr, "/health");
    assert_eq!(
        status,
        200,
        "/health after an attack: {body}\n{}",
        server.log()
    );
    let bug = 900_000 + u64::from(probe);
    let mut c = Client::connect(&server.ws_url("/"));
    assert_eq!(
        c.request(json!({"command": "subscribe", "bugs": [bug]})),
        ok("subscribe", &[bug])
    );
    broker.publish(bug, &t(probe));
    assert_eq!(c.recv(WAIT), update(bug, &t(probe)), "{}", server.log());
}

// ---- a WebSocket client that sends whatever bytes it is told to ----

/// How a read from the server ended.
#[derive(Debug)]
enum Got {
    Frame {
        opcode: u8,
        payload: Vec<u8>,
    },
    /// The server closed the TCP connection (or reset it).
    Eof,
    Timeout,
}

/// A WebSocket client over a plain socket that writes any frame, valid or
/// not, and reads the server's frames one by one.
struct Raw {
    socket: TcpStream,
    pending: Vec<u8>,
    mask: u32,
}

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

fn fin(opcode: u8) -> u8 {
    0x80 | opcode
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        Raw::handshake(addr, "/").unwrap_or_else(|status| panic!("handshake refused: {status}"))
    }

    /// A WebSocket handshake on `path`; `Err(status line)` if refused.
    fn handshake(addr: &str, path: &str) -> Result<Raw, String> {
        Raw::handshake_then(addr, path, &[])
    }

    /// A WebSocket handshake with `early` bytes in the same write.
    fn handshake_then(addr: &str, path: &str, early: &[u8]) -> Result<Raw, String> {
        let socket = TcpStream::connect(addr).expect("connect");
        let socket = raw_handshake(socket, addr, path, "", early)?;
        Ok(Raw {
            socket,
            pending: Vec::new(),
            mask: 0x1234_5678,
        })
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.socket.write_all(bytes)
    }

    /// One masked frame.
    fn frame(&mut self, first: u8, payload: &[u8]) {
        self.mask = self.mask.rotate_left(7) ^ 0x9e37_79b9;
        let bytes = client_frame(first, payload, Some(self.mask.to_be_bytes()));
        self.send_bytes(&bytes).expect("send a frame");
    }

    fn text(&mut self, text: &str) {
        self.frame(fin(TEXT), text.as_bytes());
    }

    fn read(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((opcode, payload, used)) = server_frame(&self.pending) {
                let payload = payload.to_vec();
                self.pending.drain(..used);
                return Got::Frame { opcode, payload };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            self.socket.set_read_timeout(Some(left)).expect("timeout");
            let mut chunk = [0u8; 64 * 1024];
            match self.socket.read(&mut chunk) {
                Ok(0) => return Got::Eof,
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Got::Eof,
            }
        }
    }

    /// The next text frame as JSON, skipping pings and pongs.
    fn reply(&mut self) -> Value {
        loop {
            match self.read(WAIT) {
                Got::Frame {
                    opcode: TEXT,
                    payload,
                } => {
                    return serde_json::from_slice(&payload).expect("the server sends JSON");
                }
                Got::Frame {
                    opcode: PING | PONG,
                    ..
                } => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    fn request(&mut self, text: &str) -> Value {
        self.text(text);
        self.reply()
    }

    /// Reads until the server ends the connection: the text frames before,
    /// every close frame's code (a close frame without a code is 1005), and
    /// whether the TCP connection then ended.
    fn ending(&mut self) -> (Vec<Value>, Vec<u16>, bool) {
        let (mut texts, mut closes) = (Vec::new(), Vec::new());
        loop {
            let wait = if closes.is_empty() {
                WAIT
            } else {
                Duration::from_secs(3)
            };
            match self.read(wait) {
                Got::Frame {
                    opcode: TEXT,
                    payload,
                } => texts.push(serde_json::from_slice(&payload).expect("JSON")),
                Got::Frame {
                    opcode: CLOSE,
                    payload,
                } => closes.push(if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                }),
                Got::Frame { .. } => {}
                Got::Eof => return (texts, closes, true),
                Got::Timeout => return (texts, closes, false),
            }
        }
    }

    /// The server closes with exactly one close frame, `code`, then ends
    /// the TCP connection.
    fn expect_close(&mut self, code: u16, case: &str) {
        let (texts, closes, ended) = self.ending();
        assert_eq!(
            closes,
            [code],
            "{case}: close frames (texts before: {texts:?})"
        );
        assert!(
            ended,
            "{case}: the server kept the socket open after closing"
        );
    }
}

// ---- frames ----

/// What a connection should get after a case's bytes.
enum Expect {
    /// These answers, in order; the connection stays open.
    Answers(Vec<Value>),
    /// One close frame with this code, then the end of the connection.
    Close(u16),
}

struct Case {
    name: &'static str,
    send: Vec<Vec<u8>>,
    expect: Expect,
}

/// Masked frames with a fixed key.
fn m(first: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(first, payload, Some(MASK))
}

fn frame_cases() -> Vec<Case> {
    let subscribe = br#"{"command":"subscribe","bugs":[1,2,3]}"#;
    let (a, rest) = subscribe.split_at(10);
    let (b, c) = rest.split_at(12);
    let accented = r#"{"command":"é"}"#.as_bytes();
    let split_char = accented.iter().position(|&x| x == 0xc3).expect("é") + 1;
    let version_text = br#"{"command":"version"}"#;
    let byte_fragments: Vec<Vec<u8>> = version_text
        .iter()
        .enumerate()
        .map(|(i, byte)| {
            let opcode = if i == 0 { TEXT } else { CONTINUATION };
            let last = i + 1 == version_text.len();
            m(if last { fin(opcode) } else { opcode }, &[*byte])
        })
        .collect();
    let mut huge_header = vec![fin(TEXT), 0x80 | 127];
    huge_header.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    huge_header.extend_from_slice(&[1, 2, 3, 4]);
    let mut two_mib_header = vec![fin(TEXT), 0x80 | 127];
    two_mib_header.extend_from_slice(&(2u64 << 20).to_be_bytes());
    two_mib_header.extend_from_slice(&[1, 2, 3, 4]);
    let chunk = vec![b' '; 64 * 1024];
    let mut growing = vec![m(TEXT, b"{\"command\":\"version\",\"pad\":\"")];
    growing.extend((0..17).map(|_| m(CONTINUATION, &chunk)));
    let close_with = |code: u16, reason: &[u8]| {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        m(fin(CLOSE), &payload)
    };
    vec![
        Case {
            name: "a text message in three fragments",
            send: vec![m(TEXT, a), m(CONTINUATION, b), m(fin(CONTINUATION), c)],
            expect: Expect::Answers(vec![ok("subscribe", &[1, 2, 3])]),
        },
        Case {
            name: "fragments with a ping between them",
            send: vec![
                m(TEXT, a),
                m(fin(PING), b"between"),
                m(CONTINUATION, b),
                m(fin(CONTINUATION), c),
            ],
            expect: Expect::Answers(vec![ok("subscribe", &[1, 2, 3])]),
        },
        Case {
            name: "a UTF-8 character split across fragments",
            send: vec![
                m(TEXT, &accented[..split_char]),
                m(fin(CONTINUATION), &accented[split_char..]),
            ],
            expect: Expect::Answers(vec![error(Some("é"), INVALID_COMMAND)]),
        },
        Case {
            name: "one message in one-byte fragments",
            send: byte_fragments,
            expect: Expect::Answers(vec![version()]),
        },
        Case {
            name: "a binary frame holding a command",
            send: vec![m(fin(BINARY), version_text)],
            expect: Expect::Answers(vec![version()]),
        },
        Case {
            name: "a fragmented binary message",
            send: vec![m(BINARY, a), m(CONTINUATION, b), m(fin(CONTINUATION), c)],
            expect: Expect::Answers(vec![ok("subscribe", &[1, 2, 3])]),
        },
        Case {
            name: "a binary frame that is not UTF-8",
            send: vec![m(fin(BINARY), b"\xff\xfe{\"command\":\"version\"}")],
            expect: Expect::Answers(vec![error(None, INVALID_JSON)]),
        },
        Case {
            name: "an empty text frame",
            send: vec![m(fin(TEXT), b"")],
            expect: Expect::Answers(vec![error(None, INVALID_JSON)]),
        },
        Case {
            name: "a ping of 125 bytes, then a command",
            send: vec![m(fin(PING), &[b'p'; 125]), m(fin(TEXT), version_text)],
            expect: Expect::Answers(vec![version()]),
        },
        Case {
            name: "an unsolicited pong, then a command",
            send: vec![m(fin(PONG), b"x"), m(fin(TEXT), version_text)],
            expect: Expect::Answers(vec![version()]),
        },
        Case {
            name: "JSON nested 127 deep (serde_json's limit)",
            send: vec![m(
                fin(TEXT),
                format!(
                    r#"{{"command":"version","x":{}0{}}}"#,
                    "[".repeat(126),
                    "]".repeat(126)
                )
                .as_bytes(),
            )],
            expect: Expect::Answers(vec![version()]),
        },
        Case {
            name: "objects nested 127 deep",
            send: vec![m(
                fin(TEXT),
                format!(
                    r#"{{"command":"subscribe","bugs":1,"x":{}0{}}}"#,
                    r#"{"a":"#.repeat(126),
                    "}".repeat(126)
                )
                .as_bytes(),
            )],
            expect: Expect::Answers(vec![ok("subscribe", &[1])]),
        },
        Case {
            name: "JSON nested 100,000 deep",
            send: vec![m(fin(TEXT), "[".repeat(100_000).as_bytes())],
            expect: Expect::Answers(vec![error(None, INVALID_JSON)]),
        },
        Case {
            name: "invalid UTF-8 in a text frame",
            send: vec![m(fin(TEXT), b"{\"command\":\"\xff\xfe\"}")],
            expect: Expect::Close(1007),
        },
        Case {
            name: "a UTF-16 surrogate encoded as UTF-8 in a text frame",
            send: vec![m(fin(TEXT), b"{\"command\":\"\xed\xa0\x80\"}")],
            expect: Expect::Close(1007),
        },
        Case {
            name: "an overlong UTF-8 encoding in a text frame",
            send: vec![m(fin(TEXT), b"{\"command\":\"\xc0\xaf\"}")],
            expect: Expect::Close(1007),
        },
        Case {
            name: "invalid UTF-8 in the last fragment of a text message",
            send: vec![
                m(TEXT, b"{\"command\":\""),
                m(fin(CONTINUATION), b"\xe2\x82\"}"),
            ],
            expect: Expect::Close(1007),
        },
        Case {
            name: "an unmasked frame",
            send: vec![client_frame(fin(TEXT), version_text, None)],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a reserved data opcode (3)",
            send: vec![m(fin(0x3), version_text)],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a reserved control opcode (0xB)",
            send: vec![m(fin(0xb), b"")],
            expect: Expect::Close(1002),
        },
        Case {
            name: "RSV1 set without an extension",
            send: vec![m(fin(TEXT) | 0x40, version_text)],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a continuation frame with nothing to continue",
            send: vec![m(fin(CONTINUATION), version_text)],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a new text frame inside a fragmented message",
            send: vec![m(TEXT, a), m(fin(TEXT), version_text)],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a ping of 126 bytes",
            send: vec![m(fin(PING), &[b'p'; 126])],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a fragmented ping",
            send: vec![m(PING, b"a")],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a close frame of one byte",
            send: vec![m(fin(CLOSE), b"\x03")],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a close frame with a reserved code (1005)",
            send: vec![close_with(1005, b"")],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a close frame with code 999",
            send: vec![close_with(999, b"")],
            expect: Expect::Close(1002),
        },
        Case {
            name: "a close frame whose reason is not UTF-8",
            send: vec![close_with(1000, b"\xff")],
            expect: Expect::Close(1007),
        },
        Case {
            name: "a normal close in the middle of a fragmented message",
            send: vec![m(TEXT, a), close_with(1000, b"bye")],
            expect: Expect::Close(1000),
        },
        Case {
            name: "a frame header claiming 2^63-1 bytes",
            send: vec![huge_header],
            expect: Expect::Close(1009),
        },
        Case {
            name: "a frame header claiming 2 MiB, and no payload",
            send: vec![two_mib_header],
            expect: Expect::Close(1009),
        },
        Case {
            name: "fragments growing past 1 MiB",
            send: growing,
            expect: Expect::Close(1009),
        },
    ]
}

#[test]
fn bad_frames_get_their_documented_answer() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    let cases = frame_cases();
    // Every case on its own connection, all at once.
    let outcomes: Vec<Result<(), String>> = thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|case| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mut c = Raw::connect(&addr);
                    for bytes in &case.send {
                        // The server may close before taking everything.
                        if c.send_bytes(bytes).is_err() {
                            break;
                        }
                    }
                    match &case.expect {
                        Expect::Answers(answers) => {
                            for answer in answers {
                                assert_eq!(&c.reply(), answer, "{}", case.name);
                            }
                            // Still open and answering.
                            assert_eq!(c.request(r#"{"command":"version"}"#), version());
                        }
                        Expect::Close(code) => c.expect_close(*code, case.name),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(&cases)
            .map(|(h, case)| {
                h.join().map_err(|e| {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("{}: {why}", case.name)
                })
            })
            .collect()
    });
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(failed.is_empty(), "failed cases:\n{failed:#?}");

    // Frames in the same packet as the handshake are not lost.
    let early = [
        m(fin(TEXT), br#"{"command":"version"}"#),
        m(fin(TEXT), br#"{"command":"subscribe","bugs":5}"#),
    ]
    .concat();
    let mut c = Raw::handshake_then(&addr, "/", &early).expect("handshake");
    assert_eq!(c.reply(), version());
    assert_eq!(c.reply(), ok("subscribe", &[5]));
    drop(c);

    // Garbage right after the handshake: whatever it gets, nobody else
    // notices.
    let mut rng = Rng(fuzz_seed());
    for _ in 0..20 {
        let mut c = Raw::connect(&addr);
        let noise: Vec<u8> = (0..1 + rng.below(2048)).map(|_| rng.next() as u8).collect();
        let _ = c.send_bytes(&noise);
    }
    assert_still_serves(&server, &broker, 1);
    assert!(
        wait_until(WAIT, || metric(&addr, "bzpush_connections") == 0),
        "connections leaked: {}",
        metric(&addr, "bzpush_connections")
    );
}

// ---- huge subscribes ----

fn subscribe_text(bugs: impl Iterator<Item = u64>) -> String {
    let list: Vec<String> = bugs.map(|b| b.to_string()).collect();
    format!(r#"{{"command":"subscribe","bugs":[{}]}}"#, list.join(","))
}

#[test]
fn huge_subscribes_get_1009_or_the_subscription_limit() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();

    // A million ids: ~6.9 MB, past the default 1 MiB message size.
    let million = subscribe_text(1..=1_000_000);
    assert!(million.len() > 1 << 20);
    let mut c = Raw::connect(&addr);
    let bytes = m(fin(TEXT), million.as_bytes());
    let mut writer = c.socket.try_clone().expect("clone");
    let sending = thread::spawn(move || {
        // The server stops reading at the header: this write may fail.
        let _ = writer.write_all(&bytes);
    });
    c.expect_close(1009, "a million ids");
    sending.join().expect("writer");

    // 30,000 ids fit in 1 MiB but not in the default 20,000 subscriptions:
    // refused whole, and the connection goes on.
    let mut c = Raw::connect(&addr);
    assert_eq!(
        c.request(&subscribe_text(1..=30_000)),
        error(Some("subscribe"), "too many subscriptions (limit 20000)")
    );
    assert_eq!(
        c.request(r#"{"command":"subscriptions"}"#),
        ok("subscriptions", &[])
    );
    // Duplicates count once: 30,000 ids naming 20,000 bugs are fine.
    let all: Vec<u64> = (1..=20_000).collect();
    assert_eq!(
        c.request(&subscribe_text((1..=20_000).chain(1..=10_000))),
        ok("subscribe", &all)
    );
    assert_eq!(
        c.request(&subscribe_text(15_000..=20_000)),
        ok("subscribe", &all),
        "subscribing again to what one has adds nothing"
    );
    assert_eq!(
        c.request(&subscribe_text(20_001..=20_001)),
        error(Some("subscribe"), "too many subscriptions (limit 20000)")
    );
    assert_eq!(metric(&addr, "bzpush_subscriptions"), 20_000);
    // The full connection still gets its updates.
    broker.publish(20_000, &t(7));
    assert_eq!(c.reply(), update(20_000, &t(7)));
    drop(c);
    assert!(wait_until(WAIT, || metric(&addr, "bzpush_subscriptions") == 0));
    assert_still_serves(&server, &broker, 2);
}

// ---- since ----

#[test]
fn since_in_strange_formats() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let mut c = Client::connect(&server.ws_url("/"));
    assert_eq!(
        c.request(json!({"command": "subscribe", "bugs": [7]})),
        ok("subscribe", &[7])
    );
    // The cache vouches for what is stamped after it started consuming.
    let stamps = Stamps::after_start();
    stamps.wait_past(2);
    for offset in [1, 2] {
        broker.publish(7, &stamps.at(offset));
        assert_eq!(c.recv(WAIT), update(7, &stamps.at(offset)));
    }
    let caught_up = json!({"command": "subscribe", "result": "ok", "bugs": [7]});
    let at = stamps.at(2);
    let spaced = at.replace('T', " ");
    let accepted = [
        at.clone(),
        spaced.clone(),
        format!("{at}Z"),
        format!("{spaced}Z"),
    ];
    for since in accepted {
        c.send(json!({"command": "subscribe", "bugs": [7], "since": since}));
        assert_eq!(c.recv(WAIT), caught_up, "{since}");
        assert_eq!(c.recv(WAIT), update(7, &at), "{since}");
        assert_eq!(
            c.request(json!({"command": "version"})),
            version(),
            "{since}"
        );
    }
    // No catch-up at all.
    for since in [json!(null), json!("")] {
        c.send(json!({"command": "subscribe", "bugs": [7], "since": since}));
        assert_eq!(c.recv(WAIT), caught_up, "{since}");
        assert_eq!(
            c.request(json!({"command": "version"})),
            version(),
            "{since}"
        );
    }
    let rejected = [
        json!("2026-01-01T00:00:05.000"),
        json!("2026-01-01T00:00:05+00:00"),
        json!("2026-01-01t00:00:05"),
        json!("2026-01-01T00:00:05z"),
        json!("2026-01-01T00:00:05ZZ"),
        json!("2026-01-01_00:00:05"),
        json!("2026-01-01\u{a0}00:00:05"),
        json!(" 2026-01-01T00:00:05"),
        json!("2026-01-01T00:00:05 "),
        json!("2026-01-01"),
        json!("2026-1-1T0:0:5"),
        json!("２０２６-01-01T00:00:05"),
        json!("2026-02-29T00:00:00"),
        json!("2026-01-01T24:00:00"),
        json!("1767225605"),
        json!("yesterday"),
        json!(1767225605),
        json!(true),
        json!(["2026-01-01T00:00:05"]),
        json!({"since": "2026-01-01T00:00:05"}),
    ];
    for since in rejected {
        assert_eq!(
            c.request(json!({"command": "subscribe", "bugs": [7], "since": since})),
            error(Some("subscribe"), INVALID_SINCE),
            "{since}"
        );
    }
    // A bad id is reported before a bad since; unsubscribe ignores since.
    assert_eq!(
        c.request(json!({"command": "subscribe", "bugs": ["x"], "since": "x"})),
        error(Some("subscribe"), INVALID_BUG_ID)
    );
    assert_eq!(
        c.request(json!({"command": "unsubscribe", "bugs": [8], "since": "x"})),
        ok("unsubscribe", &[7])
    );
    // Before the cache's start: partial, with what it has.
    c.send(json!({"command": "subscribe", "bugs": [7], "since": "2026-01-01 00:00:01Z"}));
    assert_eq!(
        c.recv(WAIT),
        json!({"command": "subscribe", "result": "ok", "bugs": [7], "partial": true})
    );
    assert_eq!(c.recv(WAIT), update(7, &stamps.at(1)));
    assert_eq!(c.recv(WAIT), update(7, &stamps.at(2)));
    assert_still_serves(&server, &broker, 3);
}

// ---- slowloris and floods ----

/// Whether the server has neither closed `socket` nor sent anything on it
/// yet: a look without waiting.
fn still_open(socket: &TcpStream) -> bool {
    socket.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 1];
    let open = matches!(socket.peek(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    socket.set_nonblocking(false).expect("blocking");
    open
}

/// Reads until the server closes; `true` if it did within `timeout`
/// (having sent nothing, or anything).
fn closed_within(socket: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        socket.set_read_timeout(Some(left)).expect("timeout");
        match socket.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// The server's request-head timeout (`HEAD_TIMEOUT` in src/server.rs).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn slowloris_does_not_starve_other_clients() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    // Silent sockets, and sockets stuck in the middle of a request head.
    let mut silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let mut partial: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            let head = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {i}");
            s.write_all(head.as_bytes()).expect("write");
            s
        })
        .collect();
    // One that keeps its head coming, a byte every 300 ms: a per-read
    // timeout alone would never end it.
    let mut drip = TcpStream::connect(&addr).expect("connect");
    let stop_dripping = Arc::new(AtomicBool::new(false));
    let dripping = {
        let mut drip = drip.try_clone().expect("clone");
        let stop = Arc::clone(&stop_dripping);
        thread::spawn(move || {
            let head = b"GET /health HTTP/1.1\r\nX-Drip: ";
            for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                if stop.load(Ordering::Relaxed) || drip.write_all(&[*byte]).is_err() {
                    return;
                }
                // The drip's pace: what makes it a slow client.
                thread::sleep(Duration::from_millis(300));
            }
        })
    };

    // Meanwhile everyone else is served, while every slow socket still
    // holds on: nobody waited for the slow ones to time out.
    assert_still_serves(&server, &broker, 4);
    assert_eq!(http_get(&addr, "/metrics").0, 200);
    let held = silent.iter().chain(&partial).chain([&drip]);
    assert_eq!(
        held.filter(|s| !still_open(s)).count(),
        0,
        "others were served only after slow sockets went"
    );

    // Each slow socket is closed by its head timeout (10 s; the bound here
    // only keeps a broken server from hanging the test), the dripping one
    // included; none of them got an answer.
    let bound = HEAD_TIMEOUT + WAIT;
    let closed = closed_within(&mut drip, bound);
    stop_dripping.store(true, Ordering::Relaxed);
    dripping.join().expect("dripper");
    assert!(closed, "the dripping socket stayed open");
    for (i, s) in silent.iter_mut().chain(partial.iter_mut()).enumerate() {
        assert!(closed_within(s, bound), "slow socket {i} stayed open");
    }
    drop((silent, partial));
    assert_still_serves(&server, &broker, 5);
}

#[test]
fn a_handshake_flood_past_the_connection_limit_gets_503() {
    let broker = TestBroker::new();
    // Every client here has one address: the per-address limit (a tenth
    // of the connection limit by default) is not what this test is about.
    let server = healthy_server(
        &broker,
        &[
            ("BZPUSH_MAX_CONNECTIONS", "20".into()),
            ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "1000".into()),
        ],
    );
    let addr = server.listen_addr();
    let url = server.ws_url("/");
    let mut clients: Vec<Client> = (0..20u64)
        .map(|i| {
            let mut c = Client::connect(&url);
            assert_eq!(
                c.request(json!({"command": "subscribe", "bugs": [100 + i]})),
                ok("subscribe", &[100 + i])
            );
            c
        })
        .collect();
    // 8 threads, 25 handshakes each, as fast as they go.
    let refused: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let addr = addr.clone();
                s.spawn(move || {
                    (0..25)
                        .map(|_| match Raw::handshake(&addr, "/") {
                            Ok(_) => 101,
                            Err(status) => status
                                .split(' ')
                                .nth(1)
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0),
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("flood thread"))
            .collect()
    });
    assert_eq!(refused.len(), 200);
    assert!(refused.iter().all(|&s| s == 503), "{refused:?}");
    // A tungstenite client sees the same refusal.
    match Client::try_connect(&url) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("a 21st connection was accepted"),
    }
    assert_eq!(metric(&addr, "bzpush_connections"), 20);
    assert_eq!(http_get(&addr, "/health").0, 200);
    // The twenty are untouched.
    let updates: Vec<(u64, String)> = (0..20).map(|i| (100 + i, t(10))).collect();
    broker.publish_many(&updates);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv(WAIT), update(100 + i as u64, &t(10)));
    }
    // One leaves: exactly one place frees up.
    let mut leaving = clients.pop().expect("a client");
    leaving.ws.close(None).expect("close");
    assert_eq!(leaving.close_code(WAIT), Some(1000));
    assert!(wait_until(WAIT, || metric(&addr, "bzpush_connections") == 19));
    clients.push(Client::connect(&url));
    assert!(Client::try_connect(&url).is_err(), "a 21st connection");
    drop(clients);
    assert!(wait_until(WAIT, || metric(&addr, "bzpush_connections") == 0));
    assert_still_serves(&server, &broker, 7);
}

// ---- HTTP ----

/// Sends `request` (any bytes) and reads the response until the server
/// closes: its status code (0 for none) and the whole text.
fn http_bytes(addr: &str, request: &[u8]) -> (u16, String) {
    let mut socket = TcpStream::connect(addr).expect("connect for HTTP");
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    // The server may answer and close before it has read everything.
    let _ = socket.write_all(request);
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match socket.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[test]
fn bad_http_requests_get_4xx() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    let upgrade = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        )
    };
    let padded = |len: usize| {
        let head = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nX-Pad: \r\n\r\n");
        format!(
            "GET /health HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(len - head.len())
        )
    };
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a head of 8 KiB less a byte",
            padded(8 * 1024 - 1).into_bytes(),
            200,
        ),
        ("a head over 8 KiB", padded(8 * 1024 + 1).into_bytes(), 431),
        ("a head of 1 MiB", padded(1 << 20).into_bytes(), 431),
        (
            "200 headers",
            format!("GET /health HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            400,
        ),
        (
            "a request line of garbage",
            b"GARBAGE\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a request line without a target",
            b"GET\r\n\r\n".to_vec(),
            400,
        ),
        ("HTTP/2.0", b"GET /health HTTP/2.0\r\n\r\n".to_vec(), 400),
        (
            "a NUL in the path",
            b"GET /hea\0lth HTTP/1.1\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a header without a colon",
            b"GET /health HTTP/1.1\r\nBroken\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
            400,
        ),
        ("binary garbage", vec![0xff; 64], 400),
        (
            "POST /health",
            b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
            405,
        ),
        ("PUT /health", b"PUT /health HTTP/1.1\r\n\r\n".to_vec(), 405),
        (
            "DELETE /metrics",
            b"DELETE /metrics HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\n\r\n".to_vec(), 405),
        (
            "HEAD /health",
            b"HEAD /health HTTP/1.1\r\n\r\n".to_vec(),
            200,
        ),
        (
            "an HTTP/1.0 health check",
            b"GET /health HTTP/1.0\r\n\r\n".to_vec(),
            200,
        ),
        (
            "POST with Upgrade: websocket",
            upgrade(
                "/",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            )
            .replacen("GET", "POST", 1)
            .into_bytes(),
            405,
        ),
        (
            "a WebSocket handshake without a key",
            upgrade("/", "Sec-WebSocket-Version: 13\r\n").into_bytes(),
            400,
        ),
        (
            "a WebSocket handshake of version 8",
            upgrade(
                "/",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n",
            )
            .into_bytes(),
            400,
        ),
        (
            "a WebSocket handshake on an unknown path",
            upgrade(
                "/nope",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            )
            .into_bytes(),
            404,
        ),
        (
            "an unknown path",
            b"GET /../../etc/passwd HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
    ];
    let results: Vec<(u16, String)> = thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(_, request, _)| s.spawn(|| http_bytes(&addr, request)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request"))
            .collect()
    });
    let mut wrong = Vec::new();
    for ((name, _, expected), (status, text)) in cases.iter().zip(&results) {
        if status != expected {
            let shown: String = text.chars().take(200).collect();
            wrong.push(format!(
                "{name}: expected {expected}, got {status}: {shown:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // A head that arrives in pieces, quickly, is fine.
    let mut socket = TcpStream::connect(&addr).expect("connect");
    for byte in format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").bytes() {
        socket.write_all(&[byte]).expect("write");
        thread::sleep(Duration::from_millis(2));
    }
    let mut response = String::new();
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = socket.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // A socket that connects and goes away costs nothing.
    for _ in 0..50 {
        drop(TcpStream::connect(&addr).expect("connect"));
    }
    assert_still_serves(&server, &broker, 8);
}

// ---- Pulse ----

#[test]
fn poison_pulse_messages_are_dropped_and_valid_ones_delivered() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    let mut c = Client::connect(&server.ws_url("/"));
    let max = u64::from(u32::MAX);
    assert_eq!(
        c.request(json!({"command": "subscribe", "bugs": [5, max]})),
        ok("subscribe", &[5, max])
    );
    let poison: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\xff\xfe\x00".to_vec(),
        b"null".to_vec(),
        br#"{"id":5,"delta_ts":"x"}"#.to_vec(),
        br#"{"payload":{"id":0,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":-5,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":5.5,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":4294967296,"delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":"5 ","delta_ts":"x"}}"#.to_vec(),
        br#"{"payload":{"id":5,"delta_ts":null}}"#.to_vec(),
        br#"{"payload":[5,"x"]}"#.to_vec(),
        "[".repeat(200_000).into_bytes(),
        format!("{}{}", "[".repeat(127), "]".repeat(127)).into_bytes(),
        b"{\"payload\":{\"id\":5,\"delta_ts\":\"\xc3\"}}".to_vec(),
    ];
    for body in &poison {
        assert!(pulse::decode(body).is_err());
        broker.publish_raw("5", body);
    }
    // Valid, if odd: passed through verbatim.
    let odd_when = "\u{0}😀\"}{\u{2028}".to_string() + &"é".repeat(10_000);
    let valid: Vec<(Vec<u8>, Value)> = vec![
        (
            json!({"payload": {"id": max.to_string(), "delta_ts": odd_when}})
                .to_string()
                .into_bytes(),
            update(max, &odd_when),
        ),
        (
            format!(
                r#"{{"payload":{{"id":5,"delta_ts":"{}","deep":{}0{}}}}}"#,
                t(9),
                "[".repeat(120),
                "]".repeat(120)
            )
            .into_bytes(),
            update(5, &t(9)),
        ),
    ];
    for (body, _) in &valid {
        broker.publish_raw("5", body);
    }
    for (_, expected) in &valid {
        assert_eq!(&c.recv(WAIT), expected);
    }
    assert!(wait_until(WAIT, || {
        metric(&addr, "bzpush_poison_messages_total") == poison.len() as u64
    }));
    assert_eq!(
        c.request(json!({"command": "subscriptions"})),
        ok("subscriptions", &[5, max])
    );
    assert_still_serves(&server, &broker, 9);
}

#[test]
fn a_client_close_gets_exactly_one_close_frame() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    // Echoed codes, a close without a code, and codes no client may send
    // (answered 1002), many times over: a second close frame after the
    // first would be a protocol error.
    let cases: [(Option<u16>, u16); 5] = [
        (Some(1000), 1000),
        (Some(1001), 1001),
        (Some(4321), 4321),
        (None, 1000),
        (Some(1006), 1002),
    ];
    thread::scope(|s| {
        for worker in 0..4 {
            let addr = &addr;
            s.spawn(move || {
                for i in 0..50 {
                    let (sent, expected) = cases[(worker + i) % cases.len()];
                    let mut c = Raw::connect(addr);
                    let payload = sent.map(u16::to_be_bytes);
                    c.frame(fin(CLOSE), payload.as_ref().map_or(&[][..], |p| &p[..]));
                    c.expect_close(expected, &format!("close {sent:?}"));
                }
            });
        }
    });
    assert_still_serves(&server, &broker, 10);
}

// ---- a client that asks and never reads ----

/// Sends `flood` on `c` and never reads: the server must give up on the
/// client (1008, a slow-client close) before its memory grows by 96 MiB,
/// and then end the connection.
fn flood_without_reading(server: &Bzpush, c: &mut Raw, flood: &[u8]) {
    let addr = server.listen_addr();
    let closes_before = metric(&addr, "bzpush_slow_client_closes_total");
    let before = rss_kib(server.pid()) * 1024;
    let mut peak = before;
    thread::scope(|s| {
        // The server stops reading once it gives up: this may fail.
        let mut writer = c.socket.try_clone().expect("clone");
        s.spawn(move || {
            let _ = writer.write_all(flood);
        });
        // Its address is held to its share of the hub's time too, which
        // the answers' encoding takes: in a debug build, the outbox's
        // 16 MiB of `subscriptions` answers come in about 35 s.
        let gave_up = wait_until(WAIT * 5, || {
            peak = peak.max(rss_kib(server.pid()) * 1024);
            metric(&addr, "bzpush_slow_client_closes_total") == closes_before + 1
        });
        assert!(
            gave_up,
            "the server still queues for a client that never reads"
        );
        let grown = peak.saturating_sub(before);
        assert!(
            grown < 96 << 20,
            "the server grew by {} MiB for one client",
            grown >> 20
        );
        // What it then reads ends with the connection (with a 1008 close
        // frame if there was room for one).
        let (_, closes, ended) = c.ending();
        assert!(ended, "the connection stayed open");
        assert!(closes.is_empty() || closes == [1008], "{closes:?}");
    });
}

#[test]
fn clients_that_ask_and_never_read_are_closed_with_bounded_memory() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    // 28 bytes of `subscriptions` ask for 110 KB of answer with 20,000
    // subscriptions: 2,000 of them, never read, would be 220 MB queued.
    let mut c = Raw::connect(&addr);
    let all: Vec<u64> = (1..=20_000).collect();
    assert_eq!(
        c.request(&subscribe_text(1..=20_000)),
        ok("subscribe", &all)
    );
    let ask = m(fin(TEXT), br#"{"command":"subscriptions"}"#);
    flood_without_reading(&server, &mut c, &ask.repeat(2_000));
    assert!(wait_until(WAIT, || metric(&addr, "bzpush_subscriptions") == 0));
    // Pings of 125 bytes, whose pongs are never read: 300,000 of them
    // would be 38 MB of pongs.
    let mut c = Raw::connect(&addr);
    let ping = m(fin(PING), &[b'p'; 125]);
    flood_without_reading(&server, &mut c, &ping.repeat(300_000));
    assert_still_serves(&server, &broker, 11);
}
