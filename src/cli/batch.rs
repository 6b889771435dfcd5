//! `quarry batch MODEL --input IN.jsonl --output OUT.jsonl [--parallel N]`: offline generation over many
//! requests, several decoded together by the scheduler, each result written as soon as it finishes.
//!
//! The whole input is read and checked before anything runs: a malformed line stops the command with its line
//! number and nothing is written. A request that cannot run (a prompt longer than the context) gets an error
//! line and the others still run. Results are appended one whole line at a time and flushed, so after Ctrl-C or
//! a crash a rerun with the same `--output` drops a half-written last line and runs only the ids not there yet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use quarry::engine::Engine;
use quarry::engine::scheduler::{Event, Request, Scheduler, SchedulerConfig, SeqId};
use quarry::sampling::SamplingParams;
use quarry::text::chat_template::{Conversation, Message};
use serde_json::{Value, json};

use super::common::ModelArgs;

/// Generate replies for many requests at once (one JSON object per input line), writing one result line per
/// request to --output as each finishes. Rerun with the same --output to resume: ids already there are skipped.
///
/// Input lines: {"id", "messages": [{"role", "content"}] | "prompt": TEXT | "prompt_ids": [IDS], "max_tokens",
/// "temperature", "top_p", "top_k", "seed"}; "messages" go through the model's chat template, "prompt" is
/// continued as it is. Without "temperature" a request is greedy (0), so results are reproducible. Output lines:
/// {"id", "text", "generated_ids", "finish_reason", "prompt_tokens", "completion_tokens"}, or {"id", "error"}.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The requests, one JSON object per line.
    #[arg(long, short = 'i', value_name = "IN.jsonl")]
    pub input: PathBuf,
    /// Where results go, one JSON object per line (appended to when resuming).
    #[arg(long, short = 'o', value_name = "OUT.jsonl")]
    pub output: PathBuf,
    /// Requests decoded together.
    #[arg(long, short = 'P', value_name = "N", default_value_t = 8)]
    pub parallel: usize,
    /// Positions of KV cache for all sequences together (default: --parallel x the context, in whole 64-position blocks).
    #[arg(long, value_name = "TOKENS")]
    pub kv_pool: Option<usize>,
}

/// Fields an input line may have.
const FIELDS: [&str; 9] = [
    "id",
    "messages",
    "prompt",
    "prompt_ids",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
];

/// Input files larger than this are refused (a million requests of a few hundred bytes fit).
const MAX_INPUT_BYTES: u64 = 1 << 30;

/// What to continue: a conversation, text, or token ids.
#[derive(Debug)]
enum Prompt {
    Messages(Vec<Message>),
    Text(String),
    Ids(Vec<u32>),
}

/// One checked input line.
#[derive(Debug)]
struct Line {
    id: Value,
    prompt: Prompt,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let lines = read_input(&args.input)?;
    let engine = Engine::open_for_text(&args.model.model)?;
    let tokenizer = engine.tokenizer();
    let max = engine.model.config.context_length;
    let context = args
        .model
        .ctx_size
        .unwrap_or_else(|| engine.default_context());
    if context == 0 || context > max {
        bail!("--ctx-size {context} is outside 1..={max}, the context this model was trained for");
    }
    let pool_tokens = args
        .kv_pool
        .unwrap_or_else(|| SchedulerConfig::pool_for(args.parallel, context));
    if pool_tokens == 0 {
        bail!("--kv-pool must be at least 1");
    }

    let done = resume(&args.output)?;
    let todo: Vec<&Line> = lines
        .iter()
        .filter(|l| !done.contains(&id_key(&l.id)))
        .collect();
    let skipped = lines.len() - todo.len();
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("opening {} for writing", args.output.display()))?;

    let eos = tokenizer.eos_id();
    let cfg = SchedulerConfig {
        pool_tokens,
        cache_type: args
            .model
            .cache_type
            .unwrap_or_else(|| engine.default_cache_type()),
        step_tokens: args.model.batch.max(args.parallel),
        ..SchedulerConfig::new(args.parallel, context)
    };
    let mut sched = Scheduler::new(&engine.model, cfg);
    let bar = progress_bar(lines.len() as u64, skipped as u64);

    // Requests are tokenized and submitted as slots free up, so a million-line input costs memory only for
    // those in flight.
    let mut queue: VecDeque<&Line> = todo.into();
    let mut running: HashMap<SeqId, (&Line, Vec<u32>)> = HashMap::new();
    let mut events = Vec::new();
    let (mut generated, mut errors) = (0usize, 0usize);
    let start = Instant::now();
    let write_line = |out: &mut File, v: Value| -> anyhow::Result<()> {
        let mut s = v.to_string();
        s.push('\n');
        out.write_all(s.as_bytes())
            .and_then(|_| out.flush())
            .with_context(|| format!("writing {}", args.output.display()))
    };
    rayon::scope(|_| -> anyhow::Result<()> {
        loop {
            while sched.active() < 2 * args.parallel {
                let Some(line) = queue.pop_front() else { break };
                let submitted = prompt_ids(&engine, &line.prompt, context)
                    .and_then(|ids| Ok(sched.submit(request(line, ids, eos))?));
                match submitted {
                    Ok(id) => {
                        running.insert(id, (line, Vec::new()));
                    }
                    Err(e) => {
                        errors += 1;
                        write_line(
                            &mut out,
                            json!({"id": line.id, "error": super::format::error_chain(&e)}),
                        )?;
                        bar.inc(1);
                    }
                }
            }
            if sched.is_idle() {
                return Ok(());
            }
            events.clear();
            sched.step(&mut events)?;
            for e in &events {
                match *e {
                    Event::Token { id, token } => {
                        if let Some((_, ids)) = running.get_mut(&id) {
                            ids.push(token);
                        }
                        generated += 1;
                    }
                    Event::Finished {
                        id,
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        ..
                    } => {
                        let (line, ids) = running.remove(&id).expect("a submitted request");
                        let text = tokenizer.decode(&ids, true)?;
                        write_line(
                            &mut out,
                            json!({
                                "id": line.id,
                                "text": text,
                                "generated_ids": ids,
                                "finish_reason": reason.name(),
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": completion_tokens,
                            }),
                        )?;
                        bar.inc(1);
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            if secs > 0.0 {
                bar.set_message(format!("{:.1} tok/s", generated as f64 / secs));
            }
        }
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} request{} done ({skipped} already in {}, {errors} with errors): {} generated in {secs:.1} s, {:.1} tok/s; {} at a time",
        lines.len() - skipped,
        if lines.len() - skipped == 1 { "" } else { "s" },
        args.output.display(),
        super::format::plural(generated, "token", "tokens"),
        if secs > 0.0 {
            generated as f64 / secs
        } else {
            0.0
        },
        super::format::plural(args.parallel, "sequence", "sequences"),
    );
    Ok(())
}

fn progress_bar(total: u64, skipped: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} requests  {msg}  ETA {eta}")
            .expect("a valid template"),
    );
    bar.set_position(skipped);
    bar
}

/// The request of a line: greedy unless it asks for a temperature, the other sampling settings llama.cpp's.
fn request(line: &Line, prompt: Vec<u32>, eos: u32) -> Request {
    let defaults = SamplingParams::default();
    let seed = line.seed.unwrap_or_else(quarry::sampling::fresh_seed);
    Request {
        prompt,
        params: SamplingParams {
            temperature: line.temperature.unwrap_or(0.0),
            top_p: line.top_p.unwrap_or(defaults.top_p),
            top_k: line.top_k.unwrap_or(defaults.top_k),
            seed,
            ..defaults
        },
        max_tokens: line.max_tokens.unwrap_or(usize::MAX),
        stop: vec![eos],
        constraint: None,
    }
}

/// A line's prompt as token ids; a text too long for `context` tokens is refused before it is tokenized.
fn prompt_ids(engine: &Engine, prompt: &Prompt, context: usize) -> anyhow::Result<Vec<u32>> {
    let tokenizer = engine.tokenizer();
    Ok(match prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(text) => tokenizer.encode_at_most(text, context)?,
        Prompt::Messages(messages) => {
            let Some(template) = &engine.chat_template else {
                bail!(
                    "the model has no chat template; give \"prompt\" or \"prompt_ids\" instead of \"messages\""
                );
            };
            let text = template.render(&Conversation::from_messages(messages.clone()), true)?;
            tokenizer.encode_at_most(&text, context)?
        }
    })
}

/// The ids already in `output` (a result or an error line each). A last line without its newline, or one that
/// does not parse, is what an interrupted run left: it is cut off so the file ends after the last whole line.
fn resume(output: &Path) -> anyhow::Result<HashSet<String>> {
    let mut done = HashSet::new();
    let mut file = match OpenOptions::new().read(true).write(true).open(output) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("opening {}", output.display())),
    };
    if !file.metadata()?.is_file() {
        bail!("{} is not a regular file", output.display());
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .with_context(|| format!("reading {}", output.display()))?;
    let mut good = 0;
    for line in text.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            break;
        };
        let Some(id) = v.get("id") else { break };
        done.insert(id_key(id));
        good += line.len();
    }
    if good < text.len() {
        eprintln!(
            "{}: dropping an incomplete last result ({} bytes) left by an interrupted run",
            output.display(),
            text.len() - good
        );
        file.set_len(good as u64)
            .and_then(|_| file.seek(SeekFrom::End(0)).map(|_| ()))
            .with_context(|| format!("truncating {}", output.display()))?;
    }
    Ok(done)
}

/// An id as a key: strings by their text, numbers by theirs (so `7` and `"7"` are different ids).
fn id_key(id: &Value) -> String {
    id.to_string()
}

/// Reads and checks every input line; the first problem is an error naming its line.
fn read_input(path: &Path) -> anyhow::Result<Vec<Line>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX_INPUT_BYTES {
        bail!(
            "{} is {} bytes; inputs larger than {} bytes are refused (split it)",
            path.display(),
            meta.len(),
            MAX_INPUT_BYTES
        );
    }
    let mut lines = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{} line {n}: not UTF-8 text", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = parse_line(&line).with_context(|| format!("{} line {n}", path.display()))?;
        if let Some(first) = seen.insert(id_key(&parsed.id), n) {
            bail!(
                "{} line {n}: id {} is already used on line {first}; ids must be unique (they are how a rerun resumes)",
                path.display(),
                parsed.id
            );
        }
        lines.push(parsed);
    }
    if lines.is_empty() {
        bail!("{} has no requests", path.display());
    }
    Ok(lines)
}

fn parse_line(line: &str) -> anyhow::Result<Line> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not valid JSON: {e}"))?;
    let Value::Object(obj) = v else {
        bail!("expected a JSON object, got {}", kind(&v));
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        bail!("unknown field \"{k}\" (accepted: {})", FIELDS.join(", "));
    }
    let id = match obj.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        Some(other) => bail!("\"id\" must be a string or a number, got {}", kind(other)),
        None => bail!("missing \"id\""),
    };
    let given: Vec<&str> = ["messages", "prompt", "prompt_ids"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let prompt = match given[..] {
        ["messages"] => Prompt::Messages(parse_messages(&obj["messages"])?),
        ["prompt"] => match &obj["prompt"] {
            Value::String(s) if !s.is_empty() => Prompt::Text(s.clone()),
            Value::String(_) => bail!("\"prompt\" is empty"),
            other => bail!("\"prompt\" must be a string, got {}", kind(other)),
        },
        ["prompt_ids"] => {
            let Value::Array(a) = &obj["prompt_ids"] else {
                bail!("\"prompt_ids\" must be an array of token ids");
            };
            let ids = a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| {
                            anyhow::anyhow!("\"prompt_ids\" holds {x}, which is not a token id")
                        })
                })
                .collect::<anyhow::Result<Vec<u32>>>()?;
            if ids.is_empty() {
                bail!("\"prompt_ids\" is empty");
            }
            Prompt::Ids(ids)
        }
        [] => bail!("give one of \"messages\", \"prompt\" or \"prompt_ids\""),
        _ => bail!(
            "give only one of \"messages\", \"prompt\" and \"prompt_ids\" (this line has {})",
            given.join(", ")
        ),
    };
    let uint = |k: &str| -> anyhow::Result<Option<u64>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                anyhow::anyhow!("\"{k}\" must be a whole number of 0 or more, got {x}")
            }),
        }
    };
    let float = |k: &str| -> anyhow::Result<Option<f32>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| anyhow::anyhow!("\"{k}\" must be a number, got {x}")),
        }
    };
    let max_tokens = uint("max_tokens")?.map(|n| n as usize);
    if max_tokens == Some(0) {
        bail!("\"max_tokens\" must be at least 1");
    }
    let temperature = float("temperature")?;
    if let Some(t) = temperature
        && !(t >= 0.0 && t.is_finite())
    {
        bail!("\"temperature\" {t} must be 0 or more");
    }
    let top_p = float("top_p")?;
    if let Some(p) = top_p
        && !(0.0..=1.0).contains(&p)
    {
        bail!("\"top_p\" {p} must be between 0 and 1");
    }
    Ok(Line {
        id,
        prompt,
        max_tokens,
        temperature,
        top_p,
        top_k: uint("top_k")?.map(|n| n as usize),
        seed: uint("seed")?,
    })
}

fn parse_messages(v: &Value) -> anyhow::Result<Vec<Message>> {
    let Value::Array(items) = v else {
        bail!("\"messages\" must be an array of {{\"role\", \"content\"}} objects");
    };
    if items.is_empty() {
        bail!("\"messages\" is empty");
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) => Ok(Message::new(r, c)),
                _ => bail!(
                    "message {} needs a string \"role\" and a string \"content\"",
                    i + 1
                ),
            }
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked_field_by_field() {
        let ok =
            parse_line(r#"{"id": "a", "prompt_ids": [1, 2], "max_tokens": 3, "seed": 4}"#).unwrap();
        assert!(matches!(ok.prompt, Prompt::Ids(ref v) if v == &[1, 2]));
        assert_eq!((ok.max_tokens, ok.seed), (Some(3), Some(4)));
        for (bad, want) in [
            (r#"{"id": "a", "prompt_ids": [1, "#, "not valid JSON"),
            (r#"[1]"#, "expected a JSON object"),
            (r#"{"prompt": "x"}"#, "missing \"id\""),
            (r#"{"id": "a"}"#, "give one of"),
            (
                r#"{"id": "a", "prompt": "x", "prompt_ids": [1]}"#,
                "only one of",
            ),
            (r#"{"id": "a", "prompt_ids": [-1]}"#, "not a token id"),
            (
                r#"{"id": "a", "prompt": "x", "max_token": 3}"#,
                "unknown field \"max_token\"",
            ),
            (
                r#"{"id": "a", "prompt": "x", "max_tokens": 0}"#,
                "at least 1",
            ),
            (
                r#"{"id": "a", "prompt": "x", "temperature": -1}"#,
                "0 or more",
            ),
            (
                r#"{"id": "a", "prompt": "x", "top_p": 2}"#,
                "between 0 and 1",
            ),
            (
                r#"{"id": "a", "messages": [{"role": "user"}]}"#,
                "message 1 needs",
            ),
            (r#"{"id": [1], "prompt": "x"}"#, "string or a number"),
        ] {
            let e = format!("{:#}", parse_line(bad).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
