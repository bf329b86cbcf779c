//! Topic names and topic filters: the rules that make them legal, and the
//! wildcard matching that pairs them (MQTT 3.1.1 sections 1.5.3 and 4.7).
//!
//! Two layers, each defined once:
//! - The MQTT rules, `check_name` and `check_filter`: non-empty
//!   [MQTT-4.7.3-1]; no wildcard in a topic name [MQTT-3.3.2-2]; in a
//!   filter, `+` and `#` fill a whole level and `#` comes last
//!   [MQTT-4.7.1-2], [MQTT-4.7.1-3]. The codec (`mqtt::packet`) enforces them
//!   on parse and on emit, beside its own string rules.
//! - AWS IoT Core's rules on top, `validate_topic` and `validate_filter`:
//!   the MQTT rules on raw bytes (UTF-8 without U+0000 [MQTT-1.5.3-1],
//!   [MQTT-1.5.3-2]), no control characters or Unicode non-characters
//!   [bus-topic-1] (MQTT 1.5.3 says a sender should not send them, and
//!   brokers close the connection on them), `$` reserved except `$aws/`, at most 256 bytes and 7
//!   slashes not counting Basic Ingest's `$aws/rules/<rule-name>/` prefix
//!   (spec/aws-iot-core.md, "Per message"). The bus service checks these
//!   before anything is queued [iotcored-bus-publish-1.1],
//!   [iotcored-bus-subscribe-1.1], so a client's bad topic is its own error
//!   and never a broken connection.
//!
//! `TopicError` names the first rule a string breaks; the core bus error
//! code each maps to is the service's (`service::params::topic_error_code`,
//! beside the other bus codes), so that this codec-level module knows
//! nothing of the bus.

use core::fmt;
use core::str;

/// Longest topic name or filter AWS IoT Core accepts, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Most forward slashes in a topic or filter, not counting the
/// `$aws/rules/<rule-name>/` prefix of Basic Ingest.
pub const MAX_SLASHES: usize = 7;

/// Why a topic name or filter is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicError {
    /// Not UTF-8 [MQTT-1.5.3-1].
    NotUtf8,
    /// Contains U+0000 [MQTT-1.5.3-2].
    Nul,
    /// Contains this control character (U+0001-U+001F, U+007F-U+009F) or
    /// Unicode non-character (U+FDD0-U+FDEF, U+xFFFE, U+xFFFF)
    /// [bus-topic-1].
    Forbidden(char),
    /// Empty [MQTT-4.7.3-1].
    Empty,
    /// A topic name containing `+` or `#` [MQTT-3.3.2-2].
    Wildcard,
    /// A filter with `+` or `#` not filling a level, or `#` not last
    /// [MQTT-4.7.1-2], [MQTT-4.7.1-3].
    BadWildcard,
    /// Starts with `$` but not with `$aws/` (reserved by AWS IoT Core).
    Reserved,
    /// Over `MAX_TOPIC_LEN` bytes.
    TooLong,
    /// Over `MAX_SLASHES` slashes.
    TooManyLevels,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let TopicError::Forbidden(c) = self {
            let what = if c.is_control() {
                "a control character"
            } else {
                "a unicode non-character"
            };
            return write!(f, "topic contains U+{:04X}, {what}", u32::from(*c));
        }
        f.write_str(match self {
            TopicError::NotUtf8 => "topic is not valid utf-8",
            TopicError::Nul => "topic contains u+0000",
            TopicError::Empty => "topic is empty",
            TopicError::Wildcard => "topic name contains a wildcard",
            TopicError::BadWildcard => "topic filter misplaces a wildcard",
            TopicError::Reserved => "topics starting with $ must start with $aws/",
            TopicError::TooLong => "topic is longer than 256 bytes",
            TopicError::TooManyLevels => "topic has more than 7 slashes",
            TopicError::Forbidden(_) => "topic contains a forbidden character",
        })
    }
}

impl std::error::Error for TopicError {}

impl TopicError {
    /// This refusal of `raw` explained for a person, naming the value as
    /// `what` ("publish topic", "topic filter", "response_topic", ...).
    pub fn explain(self, what: &'static str, raw: &[u8]) -> Explained {
        let text = str::from_utf8(raw).unwrap_or_default();
        let counted = basic_ingest_suffix(text).unwrap_or(text);
        Explained {
            what,
            error: self,
            len: raw.len(),
            slashes: counted.bytes().filter(|&b| b == b'/').count(),
        }
    }
}

/// A topic (or text) refusal with the numbers a person needs to fix it:
/// "publish topic is 304 bytes; AWS IoT Core allows 256".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Explained {
    /// What the value is.
    pub what: &'static str,
    /// The rule it breaks.
    pub error: TopicError,
    /// Its length in bytes.
    pub len: usize,
    /// Its slashes that count against AWS IoT Core's limit.
    pub slashes: usize,
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.what;
        match self.error {
            TopicError::NotUtf8 => write!(f, "{what} is not valid UTF-8"),
            TopicError::Nul => write!(f, "{what} contains U+0000 (NUL), which MQTT forbids"),
            TopicError::Forbidden(c) => {
                let kind = if c.is_control() {
                    "a control character"
                } else {
                    "a Unicode non-character"
                };
                write!(f, "{what} contains U+{:04X}, {kind}", u32::from(c))
            }
            TopicError::Empty => write!(f, "{what} is empty"),
            TopicError::Wildcard => write!(f, "wildcards (+ and #) are not allowed in a {what}"),
            TopicError::BadWildcard => write!(
                f,
                "{what}: a wildcard must fill a whole level (a/+/b), and # must be the last level (a/#)"
            ),
            TopicError::Reserved => write!(
                f,
                "{what} starts with $, which AWS IoT Core reserves: only $aws/ topics may be used"
            ),
            TopicError::TooLong if self.len > usize::from(u16::MAX) => {
                write!(f, "{what} is {} bytes; MQTT allows 65535", self.len)
            }
            TopicError::TooLong => write!(
                f,
                "{what} is {} bytes; AWS IoT Core allows {MAX_TOPIC_LEN}",
                self.len
            ),
            TopicError::TooManyLevels => write!(
                f,
                "{what} has {} slashes; AWS IoT Core allows {MAX_SLASHES} ({} levels)",
                self.slashes,
                MAX_SLASHES + 1
            ),
        }
    }
}

// ---- MQTT ---------------------------------------------------------------------

/// The MQTT rules for a topic name: non-empty [MQTT-4.7.3-1] and free of
/// wildcards [MQTT-3.3.2-2].
pub fn check_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// The MQTT rules for a topic filter: non-empty [MQTT-4.7.3-1]; `+` fills a
/// whole level, `#` too and only the last [MQTT-4.7.1-2], [MQTT-4.7.1-3].
pub fn check_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "+" => true,
            "#" => levels.peek().is_none(),
            _ => !level.contains(['+', '#']),
        };
        if !ok {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (MQTT 3.1.1 section 4.7): `+` is one
/// level, `#` any number including none (`a/#` matches `a`), and a filter
/// starting with a wildcard does not match a `$` topic [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

// ---- AWS IoT Core -------------------------------------------------------------

/// Checks a PUBLISH topic name against MQTT and AWS IoT Core's limits.
pub fn validate_topic(bytes: &[u8]) -> Result<&str, TopicError> {
    validate(bytes, check_name)
}

/// Checks a topic filter against MQTT and AWS IoT Core's limits.
pub fn validate_filter(bytes: &[u8]) -> Result<&str, TopicError> {
    validate(bytes, check_filter)
}

/// The text rules, the reserved prefix, then `mqtt` (the name or filter
/// rules), then the limits: the first rule broken is the error.
fn validate(bytes: &[u8], mqtt: fn(&str) -> Result<(), TopicError>) -> Result<&str, TopicError> {
    let s = str::from_utf8(bytes).map_err(|_| TopicError::NotUtf8)?;
    // Only the empty string is empty, and it breaks no other rule: the MQTT
    // layer reports it after the U+0000 and `$` checks just the same.
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    // Printable ASCII, the usual case, needs no look at the characters.
    if s.bytes().any(|b| !(0x20..0x7F).contains(&b)) {
        if let Some(c) = s.chars().find(|&c| is_forbidden(c)) {
            return Err(TopicError::Forbidden(c));
        }
    }
    if s.starts_with('$') && !s.starts_with("$aws/") {
        return Err(TopicError::Reserved);
    }
    mqtt(s)?;
    check_limits(s)?;
    Ok(s)
}

/// An MQTT 5 string property value (user property, content type): UTF-8
/// with none of the characters [bus-topic-1] forbids in topics, which
/// brokers may close the connection on.
pub fn validate_text(bytes: &[u8]) -> Result<&str, TopicError> {
    let s = str::from_utf8(bytes).map_err(|_| TopicError::NotUtf8)?;
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    if let Some(c) = s.chars().find(|&c| is_forbidden(c)) {
        return Err(TopicError::Forbidden(c));
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    Ok(s)
}

/// A control character or a Unicode non-character [bus-topic-1] (U+0000
/// is `Nul`, checked before).
fn is_forbidden(c: char) -> bool {
    let n = u32::from(c);
    matches!(n, 0x01..=0x1F | 0x7F..=0x9F | 0xFDD0..=0xFDEF) || n & 0xFFFE == 0xFFFE
}

fn check_limits(s: &str) -> Result<(), TopicError> {
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    let counted = basic_ingest_suffix(s).unwrap_or(s);
    if counted.bytes().filter(|&b| b == b'/').count() > MAX_SLASHES {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// What follows a `$aws/rules/<rule-name>/` prefix, if `s` has one.
fn basic_ingest_suffix(s: &str) -> Option<&str> {
    let (rule, rest) = s.strip_prefix("$aws/rules/")?.split_once('/')?;
    (!rule.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Validate = fn(&[u8]) -> Result<&str, TopicError>;
    /// Accepted, or the rule broken.
    type Verdict = Result<(), TopicError>;

    #[test]
    fn topic_names_and_filters_are_validated_rule_by_rule() {
        use TopicError::*;
        let long = "a".repeat(256);
        let too_long = "a".repeat(257);
        // Each input, then what it is as a topic name and as a filter.
        let cases: &[(&[u8], Verdict, Verdict)] = &[
            (b"a", Ok(()), Ok(())),
            (b"a/b", Ok(()), Ok(())),
            (b"/", Ok(()), Ok(())),
            (b"a//b", Ok(()), Ok(())),
            ("é/ü".as_bytes(), Ok(()), Ok(())),
            (b"$aws/things/t/shadow/update", Ok(()), Ok(())),
            (b"a/b/c/d/e/f/g/h", Ok(()), Ok(())),
            (b"$aws/things/a/b/c/d/e/f", Ok(()), Ok(())),
            (b"$aws/rules/r/a/b/c/d/e/f/g/h", Ok(()), Ok(())),
            (long.as_bytes(), Ok(()), Ok(())),
            (b"#", Err(Wildcard), Ok(())),
            (b"+", Err(Wildcard), Ok(())),
            (b"+/+", Err(Wildcard), Ok(())),
            (b"/+", Err(Wildcard), Ok(())),
            (b"+/", Err(Wildcard), Ok(())),
            (b"a/+/b", Err(Wildcard), Ok(())),
            (b"a/+", Err(Wildcard), Ok(())),
            (b"a/#", Err(Wildcard), Ok(())),
            (b"/#", Err(Wildcard), Ok(())),
            (b"$aws/things/+/shadow/#", Err(Wildcard), Ok(())),
            (b"a/b/c/d/e/f/g/#", Err(Wildcard), Ok(())),
            (b"$aws/rules/r/a/b/c/d/e/f/g/+", Err(Wildcard), Ok(())),
            (b"", Err(Empty), Err(Empty)),
            (b"\xff", Err(NotUtf8), Err(NotUtf8)),
            (b"\xc3", Err(NotUtf8), Err(NotUtf8)),
            (b"a/\xc3", Err(NotUtf8), Err(NotUtf8)),
            (b"\0", Err(Nul), Err(Nul)),
            (b"a\0b", Err(Nul), Err(Nul)),
            // [bus-topic-1] at each end of each forbidden range, and the
            // characters just outside them.
            (b"a\x01b", Err(Forbidden('\u{1}')), Err(Forbidden('\u{1}'))),
            (b"\x1f", Err(Forbidden('\u{1f}')), Err(Forbidden('\u{1f}'))),
            (
                b"a/\x7f",
                Err(Forbidden('\u{7f}')),
                Err(Forbidden('\u{7f}')),
            ),
            (
                "\u{80}".as_bytes(),
                Err(Forbidden('\u{80}')),
                Err(Forbidden('\u{80}')),
            ),
            (
                "a\u{9f}".as_bytes(),
                Err(Forbidden('\u{9f}')),
                Err(Forbidden('\u{9f}')),
            ),
            ("\u{a0}/~ ".as_bytes(), Ok(()), Ok(())),
            ("\u{fdcf}\u{fdf0}".as_bytes(), Ok(()), Ok(())),
            (
                "\u{fdd0}".as_bytes(),
                Err(Forbidden('\u{fdd0}')),
                Err(Forbidden('\u{fdd0}')),
            ),
            (
                "\u{fdef}".as_bytes(),
                Err(Forbidden('\u{fdef}')),
                Err(Forbidden('\u{fdef}')),
            ),
            ("\u{fffd}".as_bytes(), Ok(()), Ok(())),
            (
                "t/\u{fffe}".as_bytes(),
                Err(Forbidden('\u{fffe}')),
                Err(Forbidden('\u{fffe}')),
            ),
            (
                "\u{ffff}".as_bytes(),
                Err(Forbidden('\u{ffff}')),
                Err(Forbidden('\u{ffff}')),
            ),
            (
                "\u{1fffe}".as_bytes(),
                Err(Forbidden('\u{1fffe}')),
                Err(Forbidden('\u{1fffe}')),
            ),
            (
                "\u{10ffff}".as_bytes(),
                Err(Forbidden('\u{10ffff}')),
                Err(Forbidden('\u{10ffff}')),
            ),
            ("\u{1fffd}".as_bytes(), Ok(()), Ok(())),
            (b"a+b", Err(Wildcard), Err(BadWildcard)),
            (b"a#", Err(Wildcard), Err(BadWildcard)),
            (b"a/#/b", Err(Wildcard), Err(BadWildcard)),
            (b"#/a", Err(Wildcard), Err(BadWildcard)),
            (b"a+/b", Err(Wildcard), Err(BadWildcard)),
            (b"++", Err(Wildcard), Err(BadWildcard)),
            (b"$SYS/broker", Err(Reserved), Err(Reserved)),
            (b"$SYS/#", Err(Reserved), Err(Reserved)),
            (b"$aws", Err(Reserved), Err(Reserved)),
            (b"$", Err(Reserved), Err(Reserved)),
            (b"a/b/c/d/e/f/g/h/i", Err(TooManyLevels), Err(TooManyLevels)),
            (b"a/b/c/d/e/f/g/h/#", Err(Wildcard), Err(TooManyLevels)),
            (
                b"$aws/things/a/b/c/d/e/f/g",
                Err(TooManyLevels),
                Err(TooManyLevels),
            ),
            (
                b"$aws/rules/r/a/b/c/d/e/f/g/h/i",
                Err(TooManyLevels),
                Err(TooManyLevels),
            ),
            (
                b"$aws/rules//a/b/c/d/e/f",
                Err(TooManyLevels),
                Err(TooManyLevels),
            ),
            (too_long.as_bytes(), Err(TooLong), Err(TooLong)),
        ];
        for &(bytes, as_name, as_filter) in cases {
            // Accepted input comes back as the same text.
            let text = str::from_utf8(bytes);
            let expect = |v: Verdict| v.map(|()| text.unwrap());
            assert_eq!(validate_topic(bytes), expect(as_name), "{bytes:?}");
            assert_eq!(validate_filter(bytes), expect(as_filter), "{bytes:?}");
        }
    }

    #[test]
    fn the_first_rule_broken_is_the_one_reported() {
        let long_wild = format!("{}+", "a".repeat(300));
        let long_deep = format!("a/b/c/d/e/f/g/h/i/{}", "a".repeat(300));
        let cases: &[(Validate, &[u8], TopicError)] = &[
            (validate_topic, b"\xff+\0", TopicError::NotUtf8),
            (validate_topic, b"$SYS/\0", TopicError::Nul),
            (validate_topic, b"$SYS/+", TopicError::Reserved),
            (validate_filter, b"$SYS/a#", TopicError::Reserved),
            (validate_topic, long_wild.as_bytes(), TopicError::Wildcard),
            (
                validate_filter,
                long_wild.as_bytes(),
                TopicError::BadWildcard,
            ),
            (validate_topic, long_deep.as_bytes(), TopicError::TooLong),
        ];
        for (validate, bytes, err) in cases {
            assert_eq!(validate(bytes), Err(*err), "{bytes:?}");
        }
    }

    #[test]
    fn the_mqtt_rules_alone_allow_what_only_aws_refuses() {
        let long = "a".repeat(300);
        for name in ["$SYS/x", "a/b/c/d/e/f/g/h/i", long.as_str()] {
            assert_eq!(check_name(name), Ok(()), "{name:?}");
            assert_eq!(check_filter(name), Ok(()), "{name:?}");
        }
        assert_eq!(check_name(""), Err(TopicError::Empty));
        assert_eq!(check_name("a/+"), Err(TopicError::Wildcard));
        assert_eq!(check_filter(""), Err(TopicError::Empty));
        assert_eq!(check_filter("a/#/b"), Err(TopicError::BadWildcard));
        assert_eq!(check_filter("$SYS/#"), Ok(()));
    }

    #[test]
    fn errors_display_the_rule_broken() {
        assert_eq!(
            TopicError::Reserved.to_string(),
            "topics starting with $ must start with $aws/"
        );
        assert_eq!(
            TopicError::TooManyLevels.to_string(),
            "topic has more than 7 slashes"
        );
        assert_eq!(
            TopicError::Forbidden('\u{1}').to_string(),
            "topic contains U+0001, a control character"
        );
        assert_eq!(
            TopicError::Forbidden('\u{ffff}').to_string(),
            "topic contains U+FFFF, a unicode non-character"
        );
    }

    // ---- matching -----------------------------------------------------------

    #[test]
    fn the_matcher_follows_the_examples_of_mqtt_section_4_7() {
        let cases = [
            // 4.7.1.2 multi-level wildcard
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/tennis/player1/#", "sport/tennis/player2", false),
            ("sport/#", "sport", true),
            ("#", "sport/tennis", true),
            ("#", "/", true),
            // 4.7.1.3 single-level wildcard
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player2", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("+/tennis/#", "sport/tennis/player1", true),
            // empty levels
            ("+/+", "/", true),
            ("a/+/c", "a//c", true),
            ("+", "a", true),
            // 4.7.3 literal levels are case-sensitive and exact
            ("ACCOUNTS", "Accounts", false),
            ("a/b", "a/b/", false),
            ("a/b/", "a/b", false),
            ("a/b", "a/b", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/monitor/Clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches(
            "+/things/t/shadow/update",
            "$aws/things/t/shadow/update"
        ));
        assert!(matches(
            "$aws/things/+/shadow/#",
            "$aws/things/t/shadow/update"
        ));
    }
}
