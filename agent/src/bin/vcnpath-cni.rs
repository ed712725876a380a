//! `vcnpath-cni`: the CNI plugin binary the container runtime executes, with `CNI_*`
//! environment variables and the network configuration on stdin. All logic is in
//! `vcnpath::cni`.

use std::io::{Read as _, Write as _};

fn main() {
    let mut stdin = Vec::new();
    let stdin = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    // One invocation does a handful of netlink and socket calls: a single thread is
    // plenty and starts fastest when a node creates many pods at once.
    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(vcnpath::cni::run(|name| std::env::var(name).ok(), stdin)),
        Err(e) => vcnpath::cni::Outcome {
            stdout: vcnpath::cni::CniError::new(
                vcnpath::cni::ErrorCode::Internal,
                "cannot start the plugin's runtime",
                e.to_string(),
            )
            .to_json("1.0.0"),
            exit_code: 1,
        },
    };
    let mut out = std::io::stdout().lock();
    // If stdout is gone the runtime cannot read anything anyway; the exit status still
    // tells it the outcome.
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
