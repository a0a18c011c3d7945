//! The routing table: one [`Route`] per channel, compiled from the loaded documents.
//!
//! Compilation turns each channel into everything the runtime needs without looking at the
//! documents again: its direction (readable by web clients, writable by them, or both — DESIGN
//! §3), its address template in each upstream protocol's form, its compiled payload validators,
//! and the delivery guarantee its upstreams can give. All errors are collected before anything
//! starts. This module knows `spec` and `schema`; it never imports a protocol client or axum,
//! and never a connector: protocols read their own bindings through [`binding::Bindings`].
//!
//! - [`route`](Route): the model (routes, directions, messages, parameters, upstreams);
//! - [`binding`]: the protocol-neutral face of a protocol's binding, and the reader trait;
//! - [`compile()`]: the channel compiler;
//! - [`address`], [`envelope`], [`filter`]: address templates, messages on the move, filters.

pub mod address;
pub mod binding;
mod compile;
pub mod envelope;
pub mod filter;
mod route;

pub use binding::{BindingReader, Bindings, ChannelContext, ProtocolRoute, UpstreamBinding};
pub use compile::{Compiled, compile};
pub use route::*;
