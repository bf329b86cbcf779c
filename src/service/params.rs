//! The `aws_iot_mqtt` interface's requests, as data: method names, and each
//! method's parameters read from the request map and validated against the
//! MQTT rules and AWS IoT Core's limits before anything is queued or sent.
//!
//! [iotcored-bus-publish-1..3], [iotcored-bus-subscribe-1..3]; core-bus.md
//! section 6. A bad parameter is INVALID, a value outside AWS IoT Core's
//! limits is RANGE [bus-err-3]: one client's mistake never costs the shared
//! connection.

use crate::bus;
use crate::bus::frame::{ErrorCode, RequestType};
use crate::bus::object::{Map, Object};
use crate::mqtt::packet::QoS;
use crate::mqtt::topic::{self, TopicError};
use crate::router::{SubscribeError, MAX_FILTERS_PER_REQUEST};

/// AWS IoT Core's largest PUBLISH payload.
pub const MAX_PAYLOAD: usize = 128 * 1024;

/// Why a request is refused: its bus error code, and the reason for a
/// person (logged by the daemon; the bus carries only the code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The code answered [bus-err-3].
    pub code: ErrorCode,
    /// The reason.
    pub why: Why,
}

/// The reason of a `Refusal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Said in full.
    Text(&'static str),
    /// A topic, filter or text value breaking a rule, with its numbers.
    Topic(topic::Explained),
    /// `what` is `len` bytes where `whose` limit allows `max`.
    Long {
        what: &'static str,
        len: usize,
        max: usize,
        whose: &'static str,
    },
    /// The subscription tables said no.
    Subscribe(SubscribeError),
    /// The frame was malformed.
    Frame(bus::frame::Error),
    /// The parameters were not a valid object.
    Object(bus::object::Error),
}

impl Refusal {
    /// A refusal with a fixed reason.
    pub const fn new(code: ErrorCode, why: &'static str) -> Self {
        Self {
            code,
            why: Why::Text(why),
        }
    }

    /// INVALID, with a fixed reason.
    pub const fn invalid(why: &'static str) -> Self {
        Self::new(ErrorCode::Invalid, why)
    }

    /// RANGE: `what` is `len` bytes where `whose` limit allows `max`.
    pub const fn long(what: &'static str, len: usize, max: usize, whose: &'static str) -> Self {
        Self {
            code: ErrorCode::Range,
            why: Why::Long {
                what,
                len,
                max,
                whose,
            },
        }
    }

    /// `raw`, a `what`, broke a topic rule.
    pub fn topic(what: &'static str, raw: &[u8], e: TopicError) -> Self {
        Self {
            code: topic_error_code(e),
            why: Why::Topic(e.explain(what, raw)),
        }
    }

    /// The subscription tables refused.
    pub fn subscribe(e: SubscribeError) -> Self {
        Self {
            code: subscribe_error_code(e),
            why: Why::Subscribe(e),
        }
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.why {
            Why::Text(t) => f.write_str(t),
            Why::Topic(e) => e.fmt(f),
            Why::Long {
                what,
                len,
                max,
                whose,
            } => write!(f, "{what} is {len} bytes; {whose} allows {max}"),
            Why::Subscribe(e) => e.fmt(f),
            Why::Frame(e) => write!(f, "malformed request: {e}"),
            Why::Object(e) => write!(f, "malformed parameters: {e}"),
        }
    }
}

/// The methods of the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Send a message to AWS IoT Core (call or notify).
    Publish,
    /// Receive messages (subscribe, or call with `response_endpoint`).
    Subscribe,
    /// End a `response_endpoint` subscription (call).
    Unsubscribe,
    /// Follow the connection state (subscribe).
    ConnectionStatus,
    /// Counters (call).
    Stats,
}

impl Method {
    /// The method's request name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Publish => "publish",
            Method::Subscribe => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::ConnectionStatus => "connection_status",
            Method::Stats => "stats",
        }
    }

    /// The method of a request name, if known (else NOENTRY).
    pub fn from_name(name: &[u8]) -> Option<Method> {
        Some(match name {
            b"publish" => Method::Publish,
            b"subscribe" => Method::Subscribe,
            b"unsubscribe" => Method::Unsubscribe,
            b"connection_status" => Method::ConnectionStatus,
            b"stats" => Method::Stats,
            _ => return None,
        })
    }

    /// Whether `kind` is a valid request type for the method [bus-req-5]
    /// (call and notify are interchangeable; subscribe with a
    /// `response_endpoint` is made as a call).
    pub fn accepts(self, kind: RequestType, has_endpoint: bool) -> bool {
        let call = matches!(kind, RequestType::Call | RequestType::Notify);
        match self {
            Method::Publish | Method::Unsubscribe | Method::Stats => call,
            Method::Subscribe if has_endpoint => call,
            Method::Subscribe | Method::ConnectionStatus => kind == RequestType::Subscribe,
        }
    }
}

/// A validated `publish`.
#[derive(Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    /// MQTT topic name.
    pub topic: &'a str,
    /// Payload; empty when not given [iotcored-bus-publish-2.2].
    pub payload: &'a [u8],
    /// QoS 0 (default) or 1 [iotcored-bus-publish-3].
    pub qos: QoS,
    /// MQTT retain flag.
    pub retain: bool,
    /// When the call is answered [bus-confirm-1].
    pub confirm: Confirm,
    /// Seconds it stays worth sending [bus-expiry-1].
    pub expiry: Option<u32>,
    /// MQTT 5 properties to send with it (core-bus.md section 6).
    pub properties: PublishProperties<'a>,
}

/// The MQTT 5 properties a `publish` may give, validated.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PublishProperties<'a> {
    /// `user_properties`: a map of buffer to buffer, sent in map order.
    pub user: Option<Map<'a>>,
    pub content_type: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
}

/// The most bytes of user properties a message may carry (AWS IoT Core:
/// 8 KiB in total).
pub const MAX_USER_PROPERTIES: usize = 8 * 1024;
/// The most bytes of `content_type` and of `correlation_data` each.
pub const MAX_PROPERTY: usize = 1024;
/// The largest property block a publish may make: the user properties
/// and the other three at their own limits.
pub const MAX_PROPERTIES: usize = MAX_USER_PROPERTIES + 3 * 1024;

impl PublishProperties<'_> {
    /// Encodes them as an MQTT 5 property block into `b`; RANGE if they do
    /// not fit (`MAX_PROPERTIES`).
    pub fn encode<const N: usize>(
        &self,
        b: &mut crate::mqtt::props::Builder<N>,
    ) -> Result<(), Refusal> {
        use crate::mqtt::props::id;
        let full = |_| {
            Refusal::new(
                ErrorCode::Range,
                "the MQTT 5 properties together are too long",
            )
        };
        if let Some(t) = self.content_type {
            b.string(id::CONTENT_TYPE, t).map_err(full)?;
        }
        if let Some(t) = self.response_topic {
            b.string(id::RESPONSE_TOPIC, t).map_err(full)?;
        }
        if let Some(d) = self.correlation_data {
            b.binary(id::CORRELATION_DATA, d).map_err(full)?;
        }
        if let Some(map) = self.user {
            for (k, v) in map.iter() {
                // Checked by `publish`.
                let (Ok(k), Some(Ok(v))) = (
                    core::str::from_utf8(k),
                    v.as_buf().map(core::str::from_utf8),
                ) else {
                    return Err(Refusal::invalid("a user property is not valid UTF-8"));
                };
                b.pair(k, v).map_err(full)?;
            }
        }
        Ok(())
    }
}

/// When a `publish` call is answered [bus-confirm-1].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// Once queued (the default).
    Queued,
    /// Once on disk and synced (a QoS 1 message, with a disk spool).
    Stored,
    /// Once the broker acknowledged it (QoS 1).
    Acked,
}

/// A validated `subscribe`.
#[derive(Debug, PartialEq, Eq)]
pub struct Subscribe<'a> {
    /// Distinct topic filters, in request order.
    pub filters: heapless::Vec<&'a str, MAX_FILTERS_PER_REQUEST>,
    /// Requested QoS [iotcored-bus-subscribe-2].
    pub qos: QoS,
    /// Deliver by notify to this interface instead of streaming.
    pub endpoint: Option<&'a str>,
    /// Match locally only; send nothing to the broker (GGL's `virtual`).
    pub virtual_only: bool,
    /// Messages carry their MQTT 5 properties (`properties`).
    pub properties: bool,
}

/// A validated `unsubscribe`.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    /// The filters of the subscription to end, in request order.
    pub filters: heapless::Vec<&'a str, MAX_FILTERS_PER_REQUEST>,
    /// Its response endpoint.
    pub endpoint: &'a str,
}

/// Reads `publish` parameters.
pub fn publish<'a>(params: &Map<'a>) -> Result<Publish<'a>, Refusal> {
    let topic = match params.get(b"topic") {
        Some(Object::Buf(t)) => {
            topic::validate_topic(t).map_err(|e| Refusal::topic("publish topic", t, e))?
        }
        None | Some(Object::Null) => return Err(Refusal::invalid("topic is missing")),
        Some(_) => return Err(Refusal::invalid("topic is not a buffer")),
    };
    let payload = match params.get(b"payload") {
        None | Some(Object::Null) => &[][..],
        Some(Object::Buf(p)) => p,
        Some(_) => return Err(Refusal::invalid("payload is not a buffer")),
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::long(
            "payload",
            payload.len(),
            MAX_PAYLOAD,
            "AWS IoT Core",
        ));
    }
    let qos = qos(params)?;
    let confirm = match params.get(b"confirm") {
        None | Some(Object::Null) => Confirm::Queued,
        Some(Object::Buf(b"queued")) => Confirm::Queued,
        Some(Object::Buf(b"stored")) => Confirm::Stored,
        Some(Object::Buf(b"acked")) => Confirm::Acked,
        Some(_) => {
            return Err(Refusal::invalid(
                "confirm must be \"queued\", \"stored\" or \"acked\"",
            ))
        }
    };
    // Only a QoS 1 message is acknowledged, or stored on disk.
    if confirm != Confirm::Queued && qos == QoS::AtMostOnce {
        return Err(Refusal::invalid(
            "confirm \"stored\" or \"acked\" needs qos 1",
        ));
    }
    let expiry = match params.get(b"expiry") {
        None | Some(Object::Null) => None,
        Some(Object::I64(s)) => Some(
            u32::try_from(s)
                .ok()
                .filter(|&s| s > 0)
                .ok_or(Refusal::invalid("expiry must be 1 to 4294967295 seconds"))?,
        ),
        Some(_) => return Err(Refusal::invalid("expiry is not an integer")),
    };
    let text = |key: &'static str| -> Result<Option<&'a str>, Refusal> {
        match params.get(key.as_bytes()) {
            None | Some(Object::Null) => Ok(None),
            Some(Object::Buf(b)) => topic::validate_text(b)
                .map(Some)
                .map_err(|e| Refusal::topic(key, b, e)),
            Some(_) => Err(Refusal::invalid("a text property is not a buffer")),
        }
    };
    let user = match params.get(b"user_properties") {
        None | Some(Object::Null) => None,
        Some(Object::Map(m)) => {
            let mut total = 0usize;
            for (k, v) in m.iter() {
                let Some(v) = v.as_buf() else {
                    return Err(Refusal::invalid("a user_properties value is not a buffer"));
                };
                topic::validate_text(k).map_err(|e| Refusal::topic("user property name", k, e))?;
                topic::validate_text(v).map_err(|e| Refusal::topic("user property value", v, e))?;
                total = total.saturating_add(k.len() + v.len());
            }
            if total > MAX_USER_PROPERTIES {
                return Err(Refusal::long(
                    "user_properties",
                    total,
                    MAX_USER_PROPERTIES,
                    "AWS IoT Core",
                ));
            }
            Some(m)
        }
        Some(_) => return Err(Refusal::invalid("user_properties is not a map")),
    };
    let response_topic = match params.get(b"response_topic") {
        None | Some(Object::Null) => None,
        Some(Object::Buf(t)) => {
            Some(topic::validate_topic(t).map_err(|e| Refusal::topic("response_topic", t, e))?)
        }
        Some(_) => return Err(Refusal::invalid("response_topic is not a buffer")),
    };
    let correlation_data = match params.get(b"correlation_data") {
        None | Some(Object::Null) => None,
        Some(Object::Buf(d)) if d.len() <= MAX_PROPERTY => Some(d),
        Some(Object::Buf(d)) => {
            return Err(Refusal::long(
                "correlation_data",
                d.len(),
                MAX_PROPERTY,
                "iotcored",
            ))
        }
        Some(_) => return Err(Refusal::invalid("correlation_data is not a buffer")),
    };
    let content_type = text("content_type")?;
    if let Some(t) = content_type.filter(|t| t.len() > MAX_PROPERTY) {
        return Err(Refusal::long(
            "content_type",
            t.len(),
            MAX_PROPERTY,
            "iotcored",
        ));
    }
    let properties = PublishProperties {
        user,
        content_type,
        response_topic,
        correlation_data,
    };
    Ok(Publish {
        topic,
        payload,
        qos,
        retain: flag(params, b"retain", "retain is not a boolean")?,
        confirm,
        expiry,
        properties,
    })
}

/// Reads `subscribe` parameters.
pub fn subscribe<'a>(params: &Map<'a>) -> Result<Subscribe<'a>, Refusal> {
    Ok(Subscribe {
        filters: filters(params)?,
        qos: qos(params)?,
        endpoint: match params.get(b"response_endpoint") {
            None | Some(Object::Null) => None,
            Some(Object::Buf(e)) => Some(endpoint(e)?),
            Some(_) => return Err(Refusal::invalid("response_endpoint is not a buffer")),
        },
        virtual_only: flag(params, b"virtual", "virtual is not a boolean")?,
        properties: flag(params, b"properties", "properties is not a boolean")?,
    })
}

/// Reads `unsubscribe` parameters.
pub fn unsubscribe<'a>(params: &Map<'a>) -> Result<Unsubscribe<'a>, Refusal> {
    Ok(Unsubscribe {
        filters: filters(params)?,
        endpoint: match params.get(b"response_endpoint") {
            Some(Object::Buf(e)) => endpoint(e)?,
            _ => return Err(Refusal::invalid(
                "response_endpoint is missing (unsubscribe ends a response_endpoint subscription)",
            )),
        },
    })
}

fn qos(params: &Map<'_>) -> Result<QoS, Refusal> {
    match params.get(b"qos") {
        None | Some(Object::Null) => Ok(QoS::AtMostOnce),
        Some(Object::I64(0)) => Ok(QoS::AtMostOnce),
        Some(Object::I64(1)) => Ok(QoS::AtLeastOnce),
        // QoS 2 (and anything else) is not supported [iotcored-bus-publish-3.3].
        Some(_) => Err(Refusal::invalid(
            "qos must be 0 or 1 (AWS IoT Core has no qos 2)",
        )),
    }
}

fn flag(params: &Map<'_>, key: &[u8], wrong: &'static str) -> Result<bool, Refusal> {
    match params.get(key) {
        None | Some(Object::Null) => Ok(false),
        Some(Object::Bool(b)) => Ok(b),
        Some(_) => Err(Refusal::invalid(wrong)),
    }
}

fn filters<'a>(
    params: &Map<'a>,
) -> Result<heapless::Vec<&'a str, MAX_FILTERS_PER_REQUEST>, Refusal> {
    let mut out = heapless::Vec::new();
    let mut add = |raw: &'a [u8]| -> Result<(), Refusal> {
        let f = topic::validate_filter(raw).map_err(|e| Refusal::topic("topic filter", raw, e))?;
        if out.contains(&f) {
            return Ok(());
        }
        out.push(f)
            .map_err(|_| Refusal::subscribe(SubscribeError::TooManyFilters))
    };
    match params.get(b"topic_filter") {
        Some(Object::Buf(f)) => add(f)?,
        Some(Object::List(list)) => {
            for item in list.iter() {
                match item {
                    Object::Buf(f) => add(f)?,
                    _ => return Err(Refusal::invalid("a topic_filter item is not a buffer")),
                }
            }
        }
        None | Some(Object::Null) => return Err(Refusal::invalid("topic_filter is missing")),
        Some(_) => {
            return Err(Refusal::invalid(
                "topic_filter is not a buffer or a list of buffers",
            ))
        }
    }
    if out.is_empty() {
        return Err(Refusal::invalid("topic_filter is an empty list"));
    }
    Ok(out)
}

// The one mapping of the cores' refusals to bus error codes [bus-err-3]:
// a malformed value is INVALID, one outside AWS IoT Core's limits RANGE, a
// full table NOMEM.

/// The bus error code of a refused topic name or filter.
pub fn topic_error_code(e: TopicError) -> ErrorCode {
    match e {
        TopicError::TooLong | TopicError::TooManyLevels => ErrorCode::Range,
        TopicError::NotUtf8
        | TopicError::Nul
        | TopicError::Forbidden(_)
        | TopicError::Empty
        | TopicError::Wildcard
        | TopicError::BadWildcard
        | TopicError::Reserved => ErrorCode::Invalid,
    }
}

/// The bus error code of a refused subscribe.
pub fn subscribe_error_code(e: SubscribeError) -> ErrorCode {
    match e {
        SubscribeError::Filter(e) => topic_error_code(e),
        SubscribeError::NoFilters => ErrorCode::Invalid,
        SubscribeError::TooManyFilters => ErrorCode::Range,
        SubscribeError::TableFull | SubscribeError::NoRoom | SubscribeError::ProcessQuota => {
            ErrorCode::NoMem
        }
    }
}

/// A `response_endpoint` names a bus interface [bus-sock-1].
fn endpoint(raw: &[u8]) -> Result<&str, Refusal> {
    core::str::from_utf8(raw)
        .ok()
        .filter(|name| bus::is_interface_name(name))
        .ok_or(Refusal::invalid(
            "response_endpoint is not an interface name (1 to 50 bytes, no '/')",
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::object::{parse_params, Encoder};

    fn with_params<R>(entries: &[(&str, Val<'_>)], f: impl FnOnce(&Map<'_>) -> R) -> R {
        let mut buf = vec![0u8; 16 * 1024];
        let mut e = Encoder::new(&mut buf);
        e.map(entries.len()).unwrap();
        for (k, v) in entries {
            e.key(k.as_bytes()).unwrap();
            match v {
                Val::Buf(b) => {
                    e.buf(b).unwrap();
                }
                Val::I64(i) => {
                    e.i64(*i).unwrap();
                }
                Val::Bool(b) => {
                    e.bool(*b).unwrap();
                }
                Val::List(items) => {
                    e.list(items.len()).unwrap();
                    for i in items.iter() {
                        e.buf(i).unwrap();
                    }
                }
                Val::Map(pairs) => {
                    e.map(pairs.len()).unwrap();
                    for (k, v) in pairs.iter() {
                        e.key(k).unwrap().buf(v).unwrap();
                    }
                }
            }
        }
        let n = e.written();
        let params = parse_params(&buf[..n]).unwrap();
        f(&params)
    }

    #[derive(Clone)]
    enum Val<'a> {
        Buf(&'a [u8]),
        I64(i64),
        Bool(bool),
        List(&'a [&'a [u8]]),
        Map(&'a [(&'a [u8], &'a [u8])]),
    }

    #[test]
    fn publish_reads_the_mqtt5_keys_and_encodes_them_as_properties() {
        // core-bus.md section 6: expiry, user_properties (in map order),
        // content_type, response_topic, correlation_data.
        let user: &[(&[u8], &[u8])] = &[(b"b", b"1"), (b"a", b"2"), (b"b", b"3")];
        let entries = [
            ("topic", Val::Buf(b"a/b")),
            ("expiry", Val::I64(30)),
            ("user_properties", Val::Map(user)),
            ("content_type", Val::Buf(b"application/json")),
            ("response_topic", Val::Buf(b"reply/here")),
            ("correlation_data", Val::Buf(&[0, 1, 2])),
        ];
        with_params(&entries, |m| {
            let p = publish(m).unwrap();
            assert_eq!(p.expiry, Some(30));
            let mut b = crate::mqtt::props::Builder::<256>::new();
            p.properties.encode(&mut b).unwrap();
            let props =
                crate::mqtt::props::Props::parse(b.props().bytes(), crate::mqtt::props::Context(3))
                    .unwrap();
            use crate::mqtt::props::id;
            assert_eq!(props.string(id::CONTENT_TYPE), Some("application/json"));
            assert_eq!(props.string(id::RESPONSE_TOPIC), Some("reply/here"));
            assert_eq!(props.binary(id::CORRELATION_DATA), Some(&[0u8, 1, 2][..]));
            assert_eq!(
                props.user_properties().collect::<Vec<_>>(),
                [("b", "1"), ("a", "2"), ("b", "3")]
            );
        });
    }

    #[test]
    fn bad_mqtt5_keys_are_invalid_or_range() {
        // [bus-expiry-1] [bus-topic-1]
        let big = vec![b'v'; MAX_USER_PROPERTIES];
        let too_many: &[(&[u8], &[u8])] = &[(b"k", &big)];
        let control: &[(&[u8], &[u8])] = &[(b"k", b"a\x01")];
        let cases: &[(&str, Val<'_>, ErrorCode)] = &[
            ("expiry", Val::I64(0), ErrorCode::Invalid),
            ("expiry", Val::I64(-5), ErrorCode::Invalid),
            ("expiry", Val::I64(1 << 33), ErrorCode::Invalid),
            ("expiry", Val::Buf(b"10"), ErrorCode::Invalid),
            ("user_properties", Val::Buf(b"k"), ErrorCode::Invalid),
            ("user_properties", Val::Map(control), ErrorCode::Invalid),
            ("user_properties", Val::Map(too_many), ErrorCode::Range),
            ("content_type", Val::Buf(b"\xff"), ErrorCode::Invalid),
            ("response_topic", Val::Buf(b"a/#"), ErrorCode::Invalid),
            ("response_topic", Val::I64(1), ErrorCode::Invalid),
            ("correlation_data", Val::Bool(true), ErrorCode::Invalid),
        ];
        for (key, value, code) in cases {
            let entries = [("topic", Val::Buf(b"a/b")), (*key, value.clone())];
            with_params(&entries, |m| {
                assert_eq!(
                    publish(m).map(|_| ()).map_err(|r| r.code),
                    Err(*code),
                    "{key}"
                );
            });
        }
    }

    #[test]
    fn publish_defaults_to_qos_0_empty_payload_no_retain_and_confirm_queued() {
        // [iotcored-bus-publish-2.2] [iotcored-bus-publish-3.2]
        with_params(&[("topic", Val::Buf(b"a/b"))], |m| {
            assert_eq!(
                publish(m),
                Ok(Publish {
                    properties: PublishProperties::default(),
                    expiry: None,
                    topic: "a/b",
                    payload: b"",
                    qos: QoS::AtMostOnce,
                    retain: false,
                    confirm: Confirm::Queued,
                })
            );
        });
    }

    #[test]
    fn publish_reads_every_parameter() {
        let entries = [
            ("topic", Val::Buf(b"a/b")),
            ("payload", Val::Buf(b"hi")),
            ("qos", Val::I64(1)),
            ("retain", Val::Bool(true)),
        ];
        with_params(&entries, |m| {
            let p = publish(m).unwrap();
            assert_eq!(
                (p.topic, p.payload, p.qos, p.retain),
                ("a/b", &b"hi"[..], QoS::AtLeastOnce, true)
            );
        });
    }

    #[test]
    fn publish_refuses_qos_2_missing_topics_and_wrong_types() {
        // [iotcored-bus-publish-3.3] [iotcored-bus-publish-1]
        let cases: [&[(&str, Val<'_>)]; 6] = [
            &[("topic", Val::Buf(b"a")), ("qos", Val::I64(2))],
            &[("topic", Val::Buf(b"a")), ("qos", Val::I64(-1))],
            &[("payload", Val::Buf(b"x"))],
            &[("topic", Val::I64(3))],
            &[("topic", Val::Buf(b"a")), ("payload", Val::I64(1))],
            &[("topic", Val::Buf(b"a")), ("retain", Val::I64(1))],
        ];
        for entries in cases {
            with_params(entries, |m| {
                assert_eq!(publish(m).map_err(|r| r.code), Err(ErrorCode::Invalid))
            });
        }
    }

    #[test]
    fn refusals_say_why_in_words_a_user_can_act_on() {
        let long = [b'x'; 304];
        let deep = b"a/b/c/d/e/f/g/h/i";
        let cases: [(&[(&str, Val<'_>)], &str); 7] = [
            (
                &[("topic", Val::Buf(b"a/+"))],
                "wildcards (+ and #) are not allowed in a publish topic",
            ),
            (&[("topic", Val::Buf(b""))], "publish topic is empty"),
            (
                &[("topic", Val::Buf(&long))],
                "publish topic is 304 bytes; AWS IoT Core allows 256",
            ),
            (
                &[("topic", Val::Buf(deep))],
                "publish topic has 8 slashes; AWS IoT Core allows 7 (8 levels)",
            ),
            (
                &[("topic", Val::Buf(b"$SYS/x"))],
                "publish topic starts with $, which AWS IoT Core reserves: only $aws/ topics may be used",
            ),
            (
                &[("topic", Val::Buf(b"a")), ("qos", Val::I64(2))],
                "qos must be 0 or 1 (AWS IoT Core has no qos 2)",
            ),
            (&[("payload", Val::Buf(b"x"))], "topic is missing"),
        ];
        for (entries, why) in cases {
            with_params(entries, |m| {
                assert_eq!(publish(m).unwrap_err().to_string(), why);
            });
        }
        with_params(&[("topic_filter", Val::Buf(b"a/#/b"))], |m| {
            assert_eq!(
                subscribe(m).unwrap_err().to_string(),
                "topic filter: a wildcard must fill a whole level (a/+/b), and # must be the last level (a/#)"
            );
        });
    }

    #[test]
    fn publish_topics_outside_mqtt_or_aws_rules_are_refused() {
        with_params(&[("topic", Val::Buf(b"a/+"))], |m| {
            assert_eq!(publish(m).map_err(|r| r.code), Err(ErrorCode::Invalid));
        });
        let long = [b'x'; 257];
        with_params(&[("topic", Val::Buf(&long))], |m| {
            assert_eq!(publish(m).map_err(|r| r.code), Err(ErrorCode::Range));
        });
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let mut buf = vec![0u8; MAX_PAYLOAD + 64];
        let mut e = Encoder::new(&mut buf);
        e.map(2).unwrap().key(b"topic").unwrap().buf(b"a").unwrap();
        e.key(b"payload").unwrap().buf(&big).unwrap();
        let n = e.written();
        let m = parse_params(&buf[..n]).unwrap();
        assert_eq!(
            publish(&m).unwrap_err().to_string(),
            "payload is 131073 bytes; AWS IoT Core allows 131072"
        );
    }

    #[test]
    fn subscribe_takes_one_filter_or_a_list_and_drops_duplicates() {
        with_params(&[("topic_filter", Val::Buf(b"a/#"))], |m| {
            let s = subscribe(m).unwrap();
            assert_eq!(s.filters.as_slice(), ["a/#"]);
            assert_eq!(
                (s.qos, s.endpoint, s.virtual_only),
                (QoS::AtMostOnce, None, false)
            );
        });
        let list: &[&[u8]] = &[b"a/+", b"b", b"a/+"];
        let entries = [
            ("topic_filter", Val::List(list)),
            ("qos", Val::I64(1)),
            ("response_endpoint", Val::Buf(b"my_component")),
        ];
        with_params(&entries, |m| {
            let s = subscribe(m).unwrap();
            assert_eq!(s.filters.as_slice(), ["a/+", "b"]);
            assert_eq!(s.qos, QoS::AtLeastOnce);
            assert_eq!(s.endpoint, Some("my_component"));
        });
    }

    #[test]
    fn subscribe_refuses_bad_filters_qos_and_endpoints() {
        let empty: &[&[u8]] = &[];
        let cases: [(&[(&str, Val<'_>)], ErrorCode); 6] = [
            (&[("topic_filter", Val::Buf(b"a/#/b"))], ErrorCode::Invalid),
            (&[("topic_filter", Val::List(empty))], ErrorCode::Invalid),
            (&[("qos", Val::I64(0))], ErrorCode::Invalid),
            (
                &[("topic_filter", Val::Buf(b"a")), ("qos", Val::I64(2))],
                ErrorCode::Invalid,
            ),
            (
                &[
                    ("topic_filter", Val::Buf(b"a")),
                    ("response_endpoint", Val::Buf(b"../x")),
                ],
                ErrorCode::Invalid,
            ),
            (
                &[("topic_filter", Val::Buf(b"a/b/c/d/e/f/g/h/i"))],
                ErrorCode::Range,
            ),
        ];
        for (entries, code) in cases {
            with_params(entries, |m| {
                assert_eq!(subscribe(m).err().map(|r| r.code), Some(code))
            });
        }
    }

    #[test]
    fn more_filters_than_a_request_may_carry_is_range() {
        let names: std::vec::Vec<std::vec::Vec<u8>> = (0..=MAX_FILTERS_PER_REQUEST)
            .map(|i| format!("t/{i}").into_bytes())
            .collect();
        let refs: std::vec::Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
        with_params(&[("topic_filter", Val::List(&refs))], |m| {
            assert_eq!(subscribe(m).err().map(|r| r.code), Some(ErrorCode::Range));
        });
    }

    #[test]
    fn refusals_map_to_bus_codes() {
        // [bus-err-3]
        assert_eq!(topic_error_code(TopicError::TooLong), ErrorCode::Range);
        assert_eq!(
            topic_error_code(TopicError::TooManyLevels),
            ErrorCode::Range
        );
        for e in [
            TopicError::NotUtf8,
            TopicError::Nul,
            TopicError::Forbidden('\u{1}'),
            TopicError::Empty,
            TopicError::Wildcard,
            TopicError::BadWildcard,
            TopicError::Reserved,
        ] {
            assert_eq!(topic_error_code(e), ErrorCode::Invalid, "{e:?}");
            assert_eq!(
                subscribe_error_code(SubscribeError::Filter(e)),
                ErrorCode::Invalid
            );
        }
        let subscribe = [
            (
                SubscribeError::Filter(TopicError::TooLong),
                ErrorCode::Range,
            ),
            (SubscribeError::TooManyFilters, ErrorCode::Range),
            (SubscribeError::NoFilters, ErrorCode::Invalid),
            (SubscribeError::TableFull, ErrorCode::NoMem),
            (SubscribeError::NoRoom, ErrorCode::NoMem),
            (SubscribeError::ProcessQuota, ErrorCode::NoMem),
        ];
        for (e, code) in subscribe {
            assert_eq!(subscribe_error_code(e), code, "{e:?}");
        }
    }

    #[test]
    fn request_types_must_fit_the_method() {
        // [bus-req-5]
        use RequestType::*;
        assert!(Method::Publish.accepts(Call, false));
        assert!(Method::Publish.accepts(Notify, false));
        assert!(!Method::Publish.accepts(Subscribe, false));
        assert!(Method::Subscribe.accepts(Subscribe, false));
        assert!(!Method::Subscribe.accepts(Call, false));
        assert!(Method::Subscribe.accepts(Call, true));
        assert!(!Method::ConnectionStatus.accepts(Call, false));
        assert_eq!(Method::from_name(b"publish"), Some(Method::Publish));
        assert_eq!(Method::from_name(b"nope"), None);
    }
}
