//! Return and reason codes: MQTT 3.1.1's CONNACK and SUBACK codes, and
//! the names of MQTT 5's reason codes for the logs.

use super::*;

/// CONNACK return code [3.2.2.3].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUserNameOrPassword = 4,
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    /// The return code for a wire value; 6 and above are reserved (`None`).
    pub fn from_u8(v: u8) -> Option<ConnectReturnCode> {
        match v {
            0 => Some(ConnectReturnCode::Accepted),
            1 => Some(ConnectReturnCode::UnacceptableProtocolVersion),
            2 => Some(ConnectReturnCode::IdentifierRejected),
            3 => Some(ConnectReturnCode::ServerUnavailable),
            4 => Some(ConnectReturnCode::BadUserNameOrPassword),
            5 => Some(ConnectReturnCode::NotAuthorized),
            _ => None,
        }
    }
}

impl fmt::Display for ConnectReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectReturnCode::Accepted => "connection accepted",
            ConnectReturnCode::UnacceptableProtocolVersion => "unacceptable protocol version",
            ConnectReturnCode::IdentifierRejected => "identifier rejected",
            ConnectReturnCode::ServerUnavailable => "server unavailable",
            ConnectReturnCode::BadUserNameOrPassword => "bad user name or password",
            ConnectReturnCode::NotAuthorized => "not authorized",
        })
    }
}

/// One SUBACK return code [3.9.3].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubackCode {
    Granted(QoS),
    /// 0x02: granted at QoS 2, which AWS IoT Core never grants.
    GrantedExactlyOnce,
    /// 0x80: the subscription was refused.
    Failure,
}

impl SubackCode {
    /// The code for a wire value: 0, 1, 2 and 0x80, and MQTT 5's other
    /// failure codes [MQTT5-3.9.3] (0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E,
    /// 0xA1, 0xA2), which refuse the filter like 0x80; anything else is
    /// `None`.
    pub fn from_u8(v: u8) -> Option<SubackCode> {
        match v {
            0 => Some(SubackCode::Granted(QoS::AtMostOnce)),
            1 => Some(SubackCode::Granted(QoS::AtLeastOnce)),
            2 => Some(SubackCode::GrantedExactlyOnce),
            0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2 => {
                Some(SubackCode::Failure)
            }
            _ => None,
        }
    }

    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            SubackCode::Granted(qos) => qos as u8,
            SubackCode::GrantedExactlyOnce => 2,
            SubackCode::Failure => 0x80,
        }
    }
}

/// The name of an MQTT 5 reason code [MQTT5-2.4], for logs.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x04 => "disconnect with will message",
        0x10 => "no matching subscribers",
        0x11 => "no subscription existed",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "qos not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9E => "shared subscriptions not supported",
        0x9F => "connection rate exceeded",
        0xA0 => "maximum connect time",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "unknown reason",
    }
}
