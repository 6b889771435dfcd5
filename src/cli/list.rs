//! `quarry list`: the installed models, compactly as `ollama list` shows them; `--available` for the registry.

use quarry::hub::registry::Registry;
use quarry::hub::store::{InstalledModel, Store};
use serde_json::json;

use super::common::OutputFormat;
use super::format::{human_bytes, shown};

/// List the installed models (NAME, TYPE, SIZE, MODIFIED, as `ollama list`); with --available, the models of the
/// registry that `quarry pull NAME` installs, and which of them are installed.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Show the registry's models instead (the default one marked *), installed or not.
    #[arg(long)]
    pub available: bool,
    /// text: a table; json: one object for scripts (the registry and the installed models, always both).
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

    if args.available {
        println!(
            "  {:<32} {:<22} {:>7}  DESCRIPTION",
            "NAME", "INSTALLED", "CONTEXT"
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
        return Ok(());
    }

    if installed.is_empty() && broken.is_empty() {
        println!(
            "no models installed in {} (set {} to use another folder); `quarry list --available` shows the \
             registry, `quarry pull NAME` installs one, `quarry import DIR|FILE.gguf` without network access",
            store.root().display(),
            quarry::hub::store::HOME_ENV
        );
        return Ok(());
    }
    let width = installed
        .iter()
        .map(|m| shown(&m.manifest.name, false).chars().count())
        .max()
        .unwrap_or(0)
        .max(30);
    println!("{:<width$} {:<8} {:>10}  MODIFIED", "NAME", "TYPE", "SIZE");
    let now = chrono::Local::now();
    for m in &installed {
        println!(
            "{:<width$} {:<8} {:>10}  {}",
            shown(&m.manifest.name, false),
            m.manifest.quant_type,
            human_bytes(m.manifest.size, 1),
            modified(m, now)
        );
    }
    for b in broken {
        println!("broken: {}", shown(&b.to_string(), false));
    }
    Ok(())
}

/// "3 minutes ago", "2 days ago" (as ollama writes it) from the manifest's install time.
fn modified(model: &InstalledModel, now: chrono::DateTime<chrono::Local>) -> String {
    let Ok(when) = chrono::DateTime::parse_from_rfc3339(&model.manifest.installed) else {
        return shown(&model.manifest.installed, false).into_owned();
    };
    let secs = (now.fixed_offset() - when).num_seconds().max(0);
    let ago = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit} ago")
        } else {
            format!("{n} {unit}s ago")
        }
    };
    match secs {
        0..60 => "just now".to_string(),
        60..3600 => ago(secs / 60, "minute"),
        3600..86_400 => ago(secs / 3600, "hour"),
        86_400..604_800 => ago(secs / 86_400, "day"),
        604_800..2_592_000 => ago(secs / 604_800, "week"),
        2_592_000..31_536_000 => ago(secs / 2_592_000, "month"),
        _ => ago(secs / 31_536_000, "year"),
    }
}

/// 4k, 128k.
fn context(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}
