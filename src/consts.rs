//! Capacities fixed at build time by `build.rs` from `IOTCORED_*` variables
//! (see the README's table). Unit tests use small fixed values instead, so
//! that full tables are cheap to reach.

#[cfg(not(test))]
include!(concat!(env!("OUT_DIR"), "/consts.rs"));

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const MAX_CONNECTIONS: usize = 3;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const SUBSCRIPTIONS_PER_CONNECTION: usize = 4;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const MAX_SUBSCRIPTIONS: usize = 8;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const MQTT_MAX_PACKET: usize = 4_096;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const MAX_BUS_CLIENTS: usize = 4;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const BUS_MAX_FRAME: usize = 10_012;

/// Test value, below `BUS_MAX_FRAME` so that unit tests lend large
/// buffers; see `build.rs` for the meaning.
#[cfg(test)]
pub const BUS_SLOT_BUFFER: usize = 4_096;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const BUS_LARGE_BUFFERS: usize = 2;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const BUS_CLIENT_TX: usize = 1_024;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const SPOOL_BYTES: usize = 16_384;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const SPOOL_MESSAGES: usize = 16;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const MAX_INFLIGHT: usize = 4;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const PUBLISH_LANES: usize = 3;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const PUBLISH_RATE: usize = 100;

/// Test value; see `build.rs` for the meaning.
#[cfg(test)]
pub const PUBLISH_BYTES_PER_SEC: usize = 524_288;
