//! The `vcnpath` subcommands. `main.rs` only parses arguments and calls into here.

pub mod checkpoint;
pub mod datapath;
pub mod inspect;
pub mod logging;
pub mod run;
pub mod status;
