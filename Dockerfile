# syntax=docker/dockerfile:1
# One image per shop service, from one Dockerfile:
#   docker build --build-arg SERVICE=orders -t mesh-shop/orders:dev .
# The dependency layer (cargo-chef) and the build stage are shared by all
# four services, so building the second image reuses the first's work.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: rebuilt when Cargo.toml/Cargo.lock change, not on code changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p auth -p inventory -p payments -p orders -p gateway -p identity
COPY . .
RUN cargo build --release --locked -p auth -p inventory -p payments -p orders -p gateway -p identity \
    && mkdir /out \
    && cp target/release/auth target/release/inventory target/release/payments \
        target/release/orders target/release/gateway target/release/identity /out/

# glibc and CA roots, no shell, no package manager, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG SERVICE
COPY --from=builder /out/${SERVICE} /usr/local/bin/service
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/service"]
