# vcnpath node image: the agent (`vcnpath`, with the eBPF object embedded) and the CNI
# plugin (`vcnpath-cni`), on a slim Debian base.
#
#   docker build -t ghcr.io/vcnpath/vcnpath:0.1.0 .
FROM debian:bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        ca-certificates curl gcc libc6-dev pkg-config gnupg \
    && curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg \
    && echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
        > /etc/apt/sources.list.d/llvm.list \
    && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
# The nightly that builds the eBPF crate is pinned by date: its LLVM (22.1) must be the
# LLVM bpf-linker is built against (llvm-22 above). nightly-2026-05-20 is rustc
# 1.97.0-nightly (e50aa6fba 2026-05-19) with LLVM 22.1.4, the toolchain the project is
# verified with (TOOLCHAIN.md). The agent's build script uses VCNPATH_EBPF_TOOLCHAIN.
ARG EBPF_TOOLCHAIN=nightly-2026-05-20
ENV PATH=/root/.cargo/bin:$PATH VCNPATH_EBPF_TOOLCHAIN=$EBPF_TOOLCHAIN
RUN curl -fsSL https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0 \
    && rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal -c rust-src \
    && LLVM_PREFIX=/usr/lib/llvm-22 PATH=/usr/lib/llvm-22/bin:$PATH \
       cargo +"$EBPF_TOOLCHAIN" install bpf-linker --locked --version 0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p vcnpath-agent --bins

FROM debian:bookworm-slim
# The reference CNI plugins the init step installs next to vcnpath-cni: portmap (the
# conflist chains it for hostPort) and loopback (containerd runs it for every pod). Only
# those two are kept.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates containernetworking-plugins \
    && mkdir -p /usr/local/lib/vcnpath/cni \
    && cp /usr/lib/cni/portmap /usr/lib/cni/loopback /usr/local/lib/vcnpath/cni/ \
    && apt-get purge -y -qq containernetworking-plugins && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vcnpath /src/target/release/vcnpath-cni /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/vcnpath"]
CMD ["run", "--config", "/etc/vcnpath/config.toml"]
