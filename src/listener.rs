//! listener (in progress)
