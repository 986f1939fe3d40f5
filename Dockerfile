# syntax=docker/dockerfile:1.7
# The fljob-operator image: a static (musl) release binary on distroless, run as a non-root user, no shell.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/fljob/fljob-operator:0.1.0 --push .
#
# The builder is Alpine, whose Rust toolchain targets musl and links statically by default, so the same file builds
# each platform natively (or under emulation) without cross-compiling.

ARG RUST_VERSION=1.95
ARG ALPINE_VERSION=3.23

FROM rust:${RUST_VERSION}-alpine${ALPINE_VERSION} AS build
WORKDIR /src
# Only what the build reads (.dockerignore keeps the context to these too).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The final image has no libc: fail here if the binary asks for a dynamic loader.
# The cache mounts keep the registry and target dir between builds; the binary is copied out of the mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fljob-operator \
 && cp target/release/fljob-operator /fljob-operator \
 && readelf --program-headers /fljob-operator > /tmp/headers \
 && ! grep -q 'program interpreter' /tmp/headers

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="fljob-operator" \
      org.opencontainers.image.description="Kubernetes operator that runs NVIDIA FLARE client jobs as Pods" \
      org.opencontainers.image.source="https://github.com/fljob/fljob-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /fljob-operator /usr/local/bin/fljob-operator
# distroless "nonroot" is uid/gid 65532; the chart sets the same ids (runAsNonRoot needs a numeric USER).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fljob-operator"]
CMD ["run"]
