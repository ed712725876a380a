//! Talking to Oracle Cloud: instance metadata, request signing, authentication and the Core
//! Services API calls the agent needs.
pub mod auth;
pub mod class;
pub mod client;
pub mod error;
pub mod iam;
pub mod imds;
pub mod metrics;
pub mod models;
pub mod retry;
pub mod signer;
pub mod transport;

pub use auth::{AuthProvider, ConfigFileAuth, InstancePrincipalAuth};
pub use class::ErrorClass;
pub use client::{CoreClient, Endpoints, new_retry_token};
pub use error::{AuthError, ImdsError, OciError};
pub use imds::ImdsClient;
pub use retry::{RateLimit, RetryPolicy};
