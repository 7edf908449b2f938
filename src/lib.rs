//! echo-chamber: a byte-exact RFC 862 echo server and client.
//!
//! The server's data flows one way:
//!
//! ```text
//! listener ─▶ acceptor ─▶ channel per worker ─▶ worker (mio event loop) ─▶ connection
//!                ▲                                   ▲        └─▶ datagram (UDP)
//!                └──────── shutdown controller ──────┘  (wake-ups, then drain)
//! ```
//!
//! [`server`] holds that flow, one file per part, and wires it together;
//! [`client`] is the other side: it sends messages and checks their echoes.
//! Beside both sit the pieces they share: [`error`] sorting, [`log`] lines,
//! process [`limits`], overflow-free [`deadline`]s and socket options.

pub mod client;
pub mod deadline;
pub mod error;
pub mod limits;
pub mod log;
pub mod server;
mod socket;
