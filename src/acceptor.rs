//! acceptor (in progress)
