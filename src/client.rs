//! The echo client (placeholder; see the client issue).
