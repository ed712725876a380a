//! Host placeholder
