//! `quarry tokenize MODEL --text "Hello world"` or `--chat messages.json`

use std::path::PathBuf;

use anyhow::bail;
use quarry::engine::Engine;
use quarry::text::chat_template::Conversation;
use serde_json::json;

use super::common::OutputFormat;

/// Show the token ids of a text, or of a conversation rendered with the model's chat template.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF model file, or an installed model: its name (`quarry list`) or the Hugging Face repo id it was
    /// pulled from (org/name).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// The text to tokenize (special tokens written in it, like <|end_of_text|>, are matched). A text that
    /// starts with '-' is passed as --text=TEXT.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "chat",
        allow_hyphen_values = true
    )]
    pub text: Option<String>,
    /// A JSON file: a list of {"role", "content"} messages, or {"messages": [...], "tools": [...],
    /// "documents": [...]}; rendered with the model's chat template, ending with the assistant's turn.
    #[arg(long, value_name = "FILE")]
    pub chat: Option<PathBuf>,
    /// With --chat: do not add the generation prompt (the assistant turn's opening).
    #[arg(long, requires = "chat")]
    pub no_generation_prompt: bool,
    /// text: the ids, then each token; json: {"ids": [...], "text": "<the tokenized text>"}.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let engine = Engine::open_for_text(&args.model)?;
    let tokenizer = engine.tokenizer();
    let text = match (&args.text, &args.chat) {
        (Some(t), None) => t.clone(),
        (None, Some(file)) => {
            let Some(template) = &engine.chat_template else {
                bail!(
                    "{} has no chat template (tokenizer.chat_template) to render --chat with",
                    args.model.display()
                );
            };
            let conversation = Conversation::from_file(file)?;
            template.render(&conversation, !args.no_generation_prompt)?
        }
        _ => bail!("give --text TEXT or --chat FILE"),
    };
    let ids = tokenizer.encode(&text)?;
    match args.format {
        OutputFormat::Json => println!("{}", json!({ "ids": ids, "text": text })),
        OutputFormat::Text => {
            println!(
                "{}",
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            for &id in &ids {
                let piece = tokenizer.decode(&[id], false)?;
                println!("{id:>6} -> {piece:?}");
            }
        }
    }
    Ok(())
}
