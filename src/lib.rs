//! ivschat-rooms: a gRPC service in front of Amazon IVS Chat's room API.
//!
//! # Layout
//!
//! A request flows one way: `grpc` → `rooms` → (`store`, `upstream`) → `domain`.
//!
//! - [`config`]: the one clap struct; every flag is also an `IVSCHAT_ROOMS_*` variable.
//! - [`server`]: wiring. Builds the store, one upstream scope per region served
//!   (its client and its budget: shared by the fleet on Postgres, the
//!   process's own on SQLite; or the embedded emulator, playing every region),
//!   a reconciler per region and the gRPC server, and serves until shutdown.
//! - [`grpc`]: the only home of protobuf types: the tonic service, conversions
//!   between wire and domain types, and the one mapping from errors to `Status`.
//! - [`rooms`]: cache policy on the request paths: read-through with bounded
//!   staleness, write-through, rooms' turns (across replicas too).
//! - [`reconciler`]: finds changes made in IVS Chat behind our back, one per
//!   region, each on one replica at a time: its passes (full and incremental
//!   listings) and their watermark.
//! - [`budget`]: the upstream budget's contract and its two implementations.
//! - [`hot`]: the exact in-memory layer in front of the store.
//! - [`feed`]: the change log delivered to watchers, in revision order.
//! - [`store`]: the only home of SQL (SQLite or Postgres through sqlx): the
//!   cache and its change log, written in one transaction.
//! - [`upstream`]: the only home of `aws-sdk-ivschat` types: `Upstreams`, one
//!   scope per region, found from a room's ARN.
//! - [`emulator`]: an IVS Chat stand-in that the real SDKs talk to, playing
//!   every region (the one each request is signed for).
//! - [`domain`]: rooms, patches, the model's constraints, the error type.
//! - [`telemetry`]: Prometheus metrics and their endpoint, the log, and
//!   OpenTelemetry traces (exported only when the `OTEL_EXPORTER_OTLP_*`
//!   variables ask for them).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod budget;
pub mod config;
pub mod domain;
pub mod emulator;
pub mod feed;
pub mod grpc;
pub mod hot;
pub mod reconciler;
pub mod rooms;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod upstream;
