# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t ghcr.io/sluice-dev/sluice-operator:0.1.0 .
#   docker build --target pooler   -t ghcr.io/sluice-dev/sluice-pooler:0.1.0 .
# Both are static musl binaries on a distroless base, running as a non-root user.
# Without a Docker engine, e2e/platform/oci-images.sh assembles the same images
# with umoci from binaries built by `cargo build --target x86_64-unknown-linux-musl`.

ARG RUST_VERSION=1.88
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p sluice-operator -p sluice-pooler \
 && mkdir /out \
 && install -s -m 0755 target/x86_64-unknown-linux-musl/release/sluice-operator target/x86_64-unknown-linux-musl/release/sluice-pooler /out/

FROM gcr.io/distroless/static-debian12:nonroot AS operator
LABEL org.opencontainers.image.title="sluice-operator" \
      org.opencontainers.image.description="Kubernetes operator for bounded PostgreSQL connection pools" \
      org.opencontainers.image.source="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/sluice-operator /usr/local/bin/sluice-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice-operator"]
CMD ["run"]

FROM gcr.io/distroless/static-debian12:nonroot AS pooler
LABEL org.opencontainers.image.title="sluice-pooler" \
      org.opencontainers.image.description="A fast, bounded PostgreSQL connection pooler" \
      org.opencontainers.image.source="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/sluice-pooler /usr/local/bin/sluice-pooler
USER 65532:65532
EXPOSE 6432 9930
ENTRYPOINT ["/usr/local/bin/sluice-pooler"]
CMD ["--config", "/etc/sluice/pooler.toml"]
