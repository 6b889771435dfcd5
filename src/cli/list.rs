//! `quarry list`: the registry's models and the installed ones.

use quarry::hub::registry::Registry;
use quarry::hub::store::{InstalledModel, Store};
use serde_json::json;

use super::common::OutputFormat;
use super::format::{human_bytes, shown};

/// List the models of the registry (which are installed, and how) and every other installed model.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// text: a table; json: one object for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::from_env()?;
    let registry = Registry::builtin();
    let mut installed = Vec::new();
    let mut broken = Vec::new();
    for entry in store.installed()? {
        match entry {
            Ok(m) => installed.push(m),
            Err(e) => broken.push(e.to_string()),
        }
    }
    let of_registry = |name: &str| installed.iter().find(|m| m.manifest.name == name);
    let others: Vec<&InstalledModel> = installed
        .iter()
        .filter(|m| registry.find(&m.manifest.name).is_none())
        .collect();

    if args.format == OutputFormat::Json {
        let v = json!({
            "store": store.root(),
            "default": registry.default,
            "registry": registry.models.iter().map(|m| json!({
                "name": m.name,
                "repo": m.repo,
                "revision": m.revision,
                "description": m.description,
                "context_length": m.context_length,
                "default_type": m.default_type,
                "installed": of_registry(&m.name).map(|i| &i.manifest),
            })).collect::<Vec<_>>(),
            "installed": installed.iter().map(|m| json!({
                "name": m.manifest.name,
                "path": m.gguf(),
                "manifest": m.manifest,
            })).collect::<Vec<_>>(),
            "broken": broken,
        });
        println!("{v}");
        return Ok(());
    }

    println!(
        "  {:<32} {:<22} {:>7}  DESCRIPTION",
        "REGISTRY MODEL", "INSTALLED", "CONTEXT"
    );
    for m in &registry.models {
        let mark = if m.name == registry.default { "*" } else { " " };
        let status = match of_registry(&m.name) {
            Some(i) => format!(
                "{} {}",
                i.manifest.quant_type,
                human_bytes(i.manifest.size, 1)
            ),
            None => "-".to_string(),
        };
        println!(
            "{mark} {:<32} {:<22} {:>7}  {}",
            m.name,
            status,
            context(m.context_length),
            m.description
        );
    }
    println!(
        "  (* is what `quarry chat` starts; `quarry pull NAME` downloads and installs a model)"
    );
    if !others.is_empty() {
        println!();
        println!("  {:<32} {:<22} FROM", "OTHER INSTALLED", "TYPE SIZE");
        for m in others {
            println!(
                "  {:<32} {:<22} {}",
                shown(&m.manifest.name, false),
                format!(
                    "{} {}",
                    m.manifest.quant_type,
                    human_bytes(m.manifest.size, 1)
                ),
                shown(&m.origin(), false)
            );
        }
    }
    for b in broken {
        println!("  broken: {}", shown(&b.to_string(), false));
    }
    println!();
    println!(
        "store: {} (set {} to move it)",
        store.root().display(),
        quarry::hub::store::HOME_ENV
    );
    Ok(())
}

/// 4k, 128k.
fn context(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}
