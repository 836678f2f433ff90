//! Image format and wire protocol of cr-migrate.
//!
//! The `.proto` files under `proto/` are the source of truth; this crate holds
//! the prost types generated from them at build time (with protox, so no
//! system `protoc` is needed). Framing, size limits and checksums live with
//! the code that reads and writes files (`crm_engine::image`).

/// Checkpoint image records (`proto/image.proto`).
pub mod image {
    include!(concat!(env!("OUT_DIR"), "/crm.image.v1.rs"));
}

/// Live-migration wire protocol (`proto/migrate.proto`); framing, limits and
/// the message sequence are documented in crm-migrate's `transport` module.
pub mod migrate {
    include!(concat!(env!("OUT_DIR"), "/crm.migrate.v1.rs"));
}

/// Version of the image format written by this build. Bumped on any change
/// that an older reader would misinterpret.
pub const IMAGE_FORMAT_VERSION: u32 = 1;
