//! Capacities fixed at build time by `build.rs` from `IOTCORED_*` variables.
//! Unit tests use small fixed values instead, so that full tables are cheap
//! to reach.

#[cfg(not(test))]
include!(concat!(env!("OUT_DIR"), "/consts.rs"));

#[cfg(test)]
mod fixed {
    pub const MAX_CONNECTIONS: usize = 3;
    pub const MQTT_MAX_PACKET: usize = 4_096;
}
#[cfg(test)]
pub use fixed::*;
