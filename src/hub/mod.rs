//! Models as things to get and keep, rather than to run: [`registry`] (the models Quarry knows by name,
//! `models.toml`), [`store`] (the converted models installed under `$QUARRY_HOME`, and what a MODEL argument names)
//! and [`pull`] (getting a model into the store: downloading and verifying a Hugging Face snapshot, or importing a
//! folder, then converting it). Only this layer touches the network.

pub mod pull;
pub mod registry;
pub mod store;
