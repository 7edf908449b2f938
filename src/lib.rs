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
//! [`listener`] creates the listening socket (or [`activation`] takes the
//! one a service manager passed), [`acceptor`] accepts and hands
//! each stream to the least-loaded [`worker`], which owns it from then on and
//! drives its [`connection`] echo state machine. [`shutdown`] stops the
//! acceptor and makes the workers drain. The [`client`] module is the other
//! side: it sends messages and checks their echoes.
//!
//! UDP has no acceptor: each worker also owns one UDP socket of the port
//! ([`datagram`]), in its own event loop beside its connections, and echoes
//! each datagram that the [`source_guard`] lets it answer.
//!
//! Every thread counts into a block of [`stats`] of its own; the exit
//! summary is summed from those blocks, and the [`metrics`] endpoint, on a
//! thread of its own beside the flow, reads them live without a lock.

pub mod acceptor;
pub mod activation;
mod busy_poll;
pub mod cidr;
pub mod client;
pub mod config;
pub mod connection;
mod datagram;
pub mod error;
pub mod limits;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod proxy_header;
pub mod server;
pub mod shutdown;
mod socket;
pub mod source_guard;
pub mod stats;
mod udp_batch;
pub mod worker;
