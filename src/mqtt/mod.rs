//! The MQTT 3.1.1 client: the packet codec, the topic rules and one
//! connection's session.

pub mod packet;
pub mod packet_id;
pub mod session;
pub mod topic;
