//! Datapath placeholder
