# ivschat-rooms: build with the Rust toolchain, run on a slim Debian.
# protox compiles the protos in Rust, so no protoc is needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
RUN cargo build --release --locked --bin ivschat-rooms

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --create-home ivschat
COPY --from=build /src/target/release/ivschat-rooms /usr/local/bin/ivschat-rooms
USER ivschat
WORKDIR /data
ENV IVSCHAT_ROOMS_DATA_DIR=/data
EXPOSE 50051 9464
ENTRYPOINT ["ivschat-rooms"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
