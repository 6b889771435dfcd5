//! Models as things to get and keep, rather than to run: [`registry`] (the models Quarry knows by name,
//! `models.toml`), [`store`] (the converted models installed under `$QUARRY_HOME`, and what a MODEL argument names),
//! [`pull`] (getting a model into the store: downloading and verifying a Hugging Face snapshot, or importing a
//! folder, then converting it) and [`http`] (the Hugging Face Hub client pull downloads with). Only this layer
//! touches the network, and only through [`http`].

pub mod http;
pub mod pull;
pub mod registry;
pub mod store;
