//! The chat's slash commands, parsed from one input line.

use std::path::PathBuf;

/// What `/help` prints.
pub const HELP: &str = "\
Commands:
  /help                  this list (also /?)
  /system TEXT           set the system message (also /set system TEXT; /system alone shows it)
  /clear                 forget the conversation and empty the context (the system message stays)
  /set KEY VALUE         temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens (a number
                         or none; also num_predict), verbose (on or off: the speed line after each reply);
                         /set parameter KEY VALUE as in ollama; /set alone shows the values
  /show [WHAT]           info (the model, the context and the settings; the default), template, system,
                         parameters, license
  /save FILE             write the conversation as JSON
  /open FILE             continue a conversation saved with /save (its system message included)
  /load MODEL            switch to another model (a GGUF file or an installed model); the conversation goes along
  /stats                 tokens, speed, context used, prompt tokens computed vs reused
  /bye                   leave (also /exit, /quit, Ctrl-D)
Input:
  a line ending in \\ continues on the next line; \"\"\" starts and ends a block of several lines
  a message that starts with / is sent as text when it starts with a space
  Ctrl-C stops a reply (or the prompt being read), or clears the line you are typing; twice at the prompt leaves";

/// One parsed command.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatCommand {
    Help,
    /// `None`: show the current one.
    System(Option<String>),
    Clear,
    Set(Setting),
    /// `/set` without arguments (or `/show parameters`): show the settings.
    ShowSettings,
    Show(ShowWhat),
    Save(PathBuf),
    /// `/open FILE`: a conversation saved with `/save`.
    Open(PathBuf),
    /// `/load MODEL` (ollama's): another model, as a path or an installed model's name.
    Load(String),
    Stats,
    Bye,
}

/// What `/show` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShowWhat {
    Info,
    Template,
    System,
    License,
}

/// A `/set` of one value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Setting {
    Temperature(f32),
    TopK(usize),
    TopP(f32),
    MinP(f32),
    RepeatPenalty(f32),
    RepeatLastN(usize),
    Seed(u64),
    MaxTokens(Option<usize>),
    Verbose(bool),
}

/// The keys `/set` takes, as listed in errors.
pub const SETTING_KEYS: &str = "temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens (num_predict), verbose, system";

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error(
        "unknown command {0}; /help lists the commands (to send a message that starts with '/', begin it with a space)"
    )]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("unknown setting '{0}'; /set takes {SETTING_KEYS}")]
    UnknownSetting(String),
    #[error(
        "num_ctx: the context is fixed for a chat; start it again with --ctx-size N (your conversation: /save FILE, then /open FILE)"
    )]
    FixedContext,
    #[error("/show {0}: unknown; /show takes info, template, system, parameters or license")]
    UnknownShow(String),
    #[error("{key}: '{value}' is not {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// `None` when `line` is not a command (does not start with `/`); otherwise the command or why it is not one.
pub fn parse(line: &str) -> Option<Result<ChatCommand, CommandError>> {
    let line = line.strip_prefix('/')?;
    let (name, rest) = match line.split_once(char::is_whitespace) {
        Some((n, r)) => (n, r.trim()),
        None => (line, ""),
    };
    let path = |usage| {
        if rest.is_empty() {
            Err(CommandError::Usage(usage))
        } else {
            Ok(PathBuf::from(rest))
        }
    };
    let no_args = |cmd| {
        if rest.is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Usage("this command takes no arguments"))
        }
    };
    Some(match name.to_ascii_lowercase().as_str() {
        "help" | "?" | "h" => Ok(ChatCommand::Help),
        "system" => Ok(ChatCommand::System(
            (!rest.is_empty()).then(|| rest.to_string()),
        )),
        "clear" => no_args(ChatCommand::Clear),
        "set" if rest.is_empty() => Ok(ChatCommand::ShowSettings),
        "set" => parse_set(rest),
        "show" => match rest.to_ascii_lowercase().as_str() {
            "" | "info" => Ok(ChatCommand::Show(ShowWhat::Info)),
            "template" => Ok(ChatCommand::Show(ShowWhat::Template)),
            "system" => Ok(ChatCommand::Show(ShowWhat::System)),
            "license" => Ok(ChatCommand::Show(ShowWhat::License)),
            "parameters" | "settings" => Ok(ChatCommand::ShowSettings),
            other => Err(CommandError::UnknownShow(other.to_string())),
        },
        "save" => path("/save FILE").map(ChatCommand::Save),
        "open" => path("/open FILE").map(ChatCommand::Open),
        "load" if rest.is_empty() => Err(CommandError::Usage(
            "/load MODEL (a GGUF file or an installed model; /open FILE continues a saved conversation)",
        )),
        "load" => Ok(ChatCommand::Load(rest.to_string())),
        "stats" => no_args(ChatCommand::Stats),
        "bye" | "exit" | "quit" => Ok(ChatCommand::Bye),
        _ => Err(CommandError::Unknown(format!("/{name}"))),
    })
}

/// `/set` with arguments: a setting, ollama's `/set parameter KEY VALUE`, `/set system TEXT`, or ollama's
/// `/set verbose` / `/set quiet` without a value.
fn parse_set(args: &str) -> Result<ChatCommand, CommandError> {
    let (first, rest) = match args.split_once(char::is_whitespace) {
        Some((k, v)) => (k.to_ascii_lowercase(), v.trim()),
        None => (args.to_ascii_lowercase(), ""),
    };
    match first.as_str() {
        "system" if rest.is_empty() => Err(CommandError::Usage("/set system TEXT")),
        "system" => Ok(ChatCommand::System(Some(rest.to_string()))),
        "parameter" | "parameters" if rest.is_empty() => {
            Err(CommandError::Usage("/set parameter KEY VALUE"))
        }
        "parameter" | "parameters" => parse_setting(rest).map(ChatCommand::Set),
        "verbose" if rest.is_empty() => Ok(ChatCommand::Set(Setting::Verbose(true))),
        "quiet" if rest.is_empty() => Ok(ChatCommand::Set(Setting::Verbose(false))),
        _ => parse_setting(args).map(ChatCommand::Set),
    }
}

fn parse_setting(args: &str) -> Result<Setting, CommandError> {
    let (key, value) = args
        .split_once(char::is_whitespace)
        .map(|(k, v)| (k, v.trim()))
        .ok_or(CommandError::Usage("/set KEY VALUE"))?;
    let key = key.to_ascii_lowercase().replace('-', "_");
    if key == "num_ctx" {
        return Err(CommandError::FixedContext);
    }
    fn num<T: std::str::FromStr>(
        key: &'static str,
        value: &str,
        expected: &'static str,
    ) -> Result<T, CommandError> {
        value.parse().map_err(|_| CommandError::BadValue {
            key,
            value: value.to_string(),
            expected,
        })
    }
    let float = |key: &'static str| {
        num::<f32>(key, value, "a number").and_then(|v| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(CommandError::BadValue {
                    key,
                    value: value.to_string(),
                    expected: "a finite number",
                })
            }
        })
    };
    Ok(match key.as_str() {
        "temperature" | "temp" => Setting::Temperature(float("temperature")?),
        "top_k" => Setting::TopK(num("top_k", value, "a whole number (0 = all)")?),
        "top_p" => Setting::TopP(float("top_p")?),
        "min_p" => Setting::MinP(float("min_p")?),
        "repeat_penalty" => Setting::RepeatPenalty(float("repeat_penalty")?),
        "repeat_last_n" => Setting::RepeatLastN(num("repeat_last_n", value, "a whole number")?),
        "seed" => Setting::Seed(num("seed", value, "a whole number")?),
        "max_tokens" | "num_predict" => Setting::MaxTokens(match value {
            "none" | "off" | "unlimited" => None,
            v => match num::<usize>("max_tokens", v, "a positive whole number or none")? {
                0 => {
                    return Err(CommandError::BadValue {
                        key: "max_tokens",
                        value: v.to_string(),
                        expected: "a positive whole number or none",
                    });
                }
                n => Some(n),
            },
        }),
        "verbose" => Setting::Verbose(match value.to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" => true,
            "off" | "false" | "no" | "0" => false,
            _ => {
                return Err(CommandError::BadValue {
                    key: "verbose",
                    value: value.to_string(),
                    expected: "on or off",
                });
            }
        }),
        _ => return Err(CommandError::UnknownSetting(key)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(" /help"), None);
        assert_eq!(parse("/help"), Some(Ok(ChatCommand::Help)));
        assert_eq!(parse("/?"), Some(Ok(ChatCommand::Help)));
        assert_eq!(parse("/BYE"), Some(Ok(ChatCommand::Bye)));
        assert_eq!(parse("/system"), Some(Ok(ChatCommand::System(None))));
        assert_eq!(
            parse("/system  Be brief. "),
            Some(Ok(ChatCommand::System(Some("Be brief.".into()))))
        );
        assert_eq!(
            parse("/save my chat.json"),
            Some(Ok(ChatCommand::Save("my chat.json".into())))
        );
        assert_eq!(parse("/open"), Some(Err(CommandError::Usage("/open FILE"))));
        assert_eq!(
            parse("/open chat.json"),
            Some(Ok(ChatCommand::Open("chat.json".into())))
        );
        assert_eq!(
            parse("/load granite-1b"),
            Some(Ok(ChatCommand::Load("granite-1b".into())))
        );
        assert!(matches!(parse("/load"), Some(Err(CommandError::Usage(_)))));
        assert_eq!(parse("/show"), Some(Ok(ChatCommand::Show(ShowWhat::Info))));
        assert_eq!(
            parse("/show info"),
            Some(Ok(ChatCommand::Show(ShowWhat::Info)))
        );
        assert_eq!(
            parse("/show template"),
            Some(Ok(ChatCommand::Show(ShowWhat::Template)))
        );
        assert_eq!(
            parse("/show parameters"),
            Some(Ok(ChatCommand::ShowSettings))
        );
        assert!(matches!(
            parse("/show colours"),
            Some(Err(CommandError::UnknownShow(_)))
        ));
        assert!(matches!(
            parse("/clear now"),
            Some(Err(CommandError::Usage(_)))
        ));
        assert!(matches!(
            parse("/frobnicate"),
            Some(Err(CommandError::Unknown(_)))
        ));
        assert_eq!(parse("/set"), Some(Ok(ChatCommand::ShowSettings)));
    }

    #[test]
    fn ollama_forms_of_set() {
        assert_eq!(
            parse("/set parameter temperature 0.3"),
            Some(Ok(ChatCommand::Set(Setting::Temperature(0.3))))
        );
        assert_eq!(
            parse("/set parameter num_predict 12"),
            Some(Ok(ChatCommand::Set(Setting::MaxTokens(Some(12)))))
        );
        assert_eq!(
            parse("/set parameter repeat_last_n 32"),
            Some(Ok(ChatCommand::Set(Setting::RepeatLastN(32))))
        );
        assert_eq!(
            parse("/set system Be brief. Very."),
            Some(Ok(ChatCommand::System(Some("Be brief. Very.".into()))))
        );
        assert_eq!(
            parse("/set verbose"),
            Some(Ok(ChatCommand::Set(Setting::Verbose(true))))
        );
        assert_eq!(
            parse("/set quiet"),
            Some(Ok(ChatCommand::Set(Setting::Verbose(false))))
        );
        assert_eq!(
            parse("/set parameter num_ctx 8192"),
            Some(Err(CommandError::FixedContext))
        );
        assert!(matches!(
            parse("/set parameter"),
            Some(Err(CommandError::Usage(_)))
        ));
        assert!(matches!(
            parse("/set system"),
            Some(Err(CommandError::Usage(_)))
        ));
    }

    #[test]
    fn settings() {
        let set = |s: &str| parse(s).unwrap();
        assert_eq!(
            set("/set temperature 0.2"),
            Ok(ChatCommand::Set(Setting::Temperature(0.2)))
        );
        assert_eq!(set("/set top-k 5"), Ok(ChatCommand::Set(Setting::TopK(5))));
        assert_eq!(
            set("/set top_p 0.9"),
            Ok(ChatCommand::Set(Setting::TopP(0.9)))
        );
        assert_eq!(
            set("/set min_p 0"),
            Ok(ChatCommand::Set(Setting::MinP(0.0)))
        );
        assert_eq!(
            set("/set repeat_penalty 1.1"),
            Ok(ChatCommand::Set(Setting::RepeatPenalty(1.1)))
        );
        assert_eq!(set("/set seed 42"), Ok(ChatCommand::Set(Setting::Seed(42))));
        assert_eq!(
            set("/set max_tokens 64"),
            Ok(ChatCommand::Set(Setting::MaxTokens(Some(64))))
        );
        assert_eq!(
            set("/set max_tokens none"),
            Ok(ChatCommand::Set(Setting::MaxTokens(None)))
        );
        assert_eq!(
            set("/set verbose off"),
            Ok(ChatCommand::Set(Setting::Verbose(false)))
        );
        assert!(matches!(
            set("/set temperature hot"),
            Err(CommandError::BadValue { .. })
        ));
        assert!(matches!(
            set("/set temperature NaN"),
            Err(CommandError::BadValue { .. })
        ));
        assert!(matches!(
            set("/set max_tokens 0"),
            Err(CommandError::BadValue { .. })
        ));
        assert!(matches!(
            set("/set top_k -1"),
            Err(CommandError::BadValue { .. })
        ));
        assert!(matches!(
            set("/set colour blue"),
            Err(CommandError::UnknownSetting(_))
        ));
        assert!(matches!(
            set("/set temperature"),
            Err(CommandError::Usage(_))
        ));
    }
}
