//! The MQTT 3.1.1 and 5 client: the packet codec, the MQTT 5 properties, the topic rules and one
//! connection's session.

pub mod packet;
pub mod packet_id;
pub mod props;
pub mod session;
pub mod topic;
