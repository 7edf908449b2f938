//! echo-chamber: a byte-exact RFC 862 echo server and client.
//!
//! The server's data flows one way:
//!
//! ```text
//! listener ─▶ acceptor ─▶ channel per worker ─▶ worker (mio event loop) ─▶ connection
//!                ▲                                   ▲
//!                └──────── shutdown controller ──────┘  (wake-ups, then drain)
//! ```
//!
//! [`listener`] creates the listening socket, [`acceptor`] accepts and hands
//! each stream to the least-loaded [`worker`], which owns it from then on and
//! drives its [`connection`] echo state machine. [`shutdown`] stops the
//! acceptor and makes the workers drain. The [`client`] module is the other
//! side: it sends messages and checks their echoes.

pub mod acceptor;
mod busy_poll;
pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod limits;
pub mod listener;
pub mod log;
pub mod server;
pub mod shutdown;
mod socket;
pub mod stats;
pub mod worker;
