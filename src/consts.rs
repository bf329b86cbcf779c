//! Capacities fixed at build time by `build.rs` from `IOTCORED_*` variables.
//! Unit tests use small fixed values instead, so that full tables are cheap
//! to reach.

#[cfg(not(test))]
include!(concat!(env!("OUT_DIR"), "/consts.rs"));

/// MQTT connections at most (test value).
#[cfg(test)]
pub const MAX_CONNECTIONS: usize = 3;
/// Largest MQTT packet accepted from the broker (test value).
#[cfg(test)]
pub const MQTT_MAX_PACKET: usize = 4_096;
