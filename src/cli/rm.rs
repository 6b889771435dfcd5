//! `quarry rm NAME`: remove an installed model.

use quarry::hub::store::Store;

use super::format::human_bytes;

/// Remove an installed model (by name, or by the repo id it was pulled from) and its files.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The installed model: its name (`quarry list`) or the Hugging Face repo id it was pulled from (org/name).
    #[arg(value_name = "NAME")]
    pub name: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::from_env()?;
    let size = store
        .find(&args.name)
        .ok()
        .flatten()
        .map(|m| m.manifest.size);
    let dir = store.remove(&args.name)?;
    match size {
        Some(s) => println!("removed {} ({} freed)", dir.display(), human_bytes(s, 1)),
        None => println!("removed {}", dir.display()),
    }
    Ok(())
}
