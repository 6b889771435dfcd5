//! How the commands print sizes and counts for people.

use std::borrow::Cow;

use quarry::gguf::TypeTally;

/// `text` safe to print on a terminal: control characters (escape sequences among them, which a downloaded
/// file's name or metadata could carry to move the cursor, recolour or retitle the terminal) written as `\u{1b}`;
/// newlines kept when `keep_newlines`.
pub fn shown(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(keep_newlines && c == '\n');
    if !text.chars().any(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// 823.4 MiB with `decimals` 1, 823.42 MiB with 2; bytes below a KiB exactly (`512 B`).
/// An error and its causes joined by ": ", as anyhow's `{:#}` joins them, but a cause whose text the messages
/// before it already quote is not repeated: many errors quote their source in their own message and also return
/// it as `source()` (`cannot read it: Is a directory (os error 21)`, or mid-sentence: `not valid JSON (key must be
/// a string at line 1 column 3); re-download the file`), which `{:#}` would print twice.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

pub fn human_bytes(n: u64, decimals: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.decimals$} {}", UNITS[unit])
    }
}

/// 1.33 B, 412.3 M, 49.2 K (and 0.5 K).
pub fn count(n: u64) -> String {
    let n = n as f64;
    match n {
        _ if n >= 1e9 => format!("{:.2} B", n / 1e9),
        _ if n >= 1e6 => format!("{:.1} M", n / 1e6),
        _ => format!("{:.1} K", n / 1e3),
    }
}

/// As [`count`], but a number below a thousand as it is (500, not 0.5 K).
pub fn human_count(n: u64) -> String {
    if n >= 1_000 { count(n) } else { n.to_string() }
}

/// `1 token`, `2 tokens`: a count with its noun agreeing (`many` for the irregular plurals, "replies").
pub fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// `290 q4_0, 65 f32, 1 q8_0`: how many tensors of each type.
pub fn type_counts(tallies: &[TypeTally]) -> String {
    tallies
        .iter()
        .map(|t| format!("{} {}", t.tensors, t.ty))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_error_quoting_its_source_prints_it_once() {
        let io = std::io::Error::from_raw_os_error(21);
        #[derive(Debug, thiserror::Error)]
        #[error("config.json: cannot read it: {source}")]
        struct ReadError {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(ReadError { source: io }).context("quantize snap failed");
        assert_eq!(
            error_chain(&e),
            "quantize snap failed: config.json: cannot read it: Is a directory (os error 21)"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
        // Quoted mid-sentence, as ConvertError::Json quotes its serde error.
        #[derive(Debug, thiserror::Error)]
        #[error("config.json: not valid JSON ({source}); re-download the file")]
        struct JsonError {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(JsonError {
            source: std::io::Error::other("key must be a string at line 1 column 3"),
        });
        assert_eq!(
            error_chain(&e),
            "config.json: not valid JSON (key must be a string at line 1 column 3); re-download the file"
        );
    }

    use super::*;

    #[test]
    fn sizes_and_counts() {
        assert_eq!(human_bytes(512, 1), "512 B");
        assert_eq!(human_bytes(1536, 1), "1.5 KiB");
        assert_eq!(human_bytes(863_365_120, 1), "823.4 MiB");
        assert_eq!(human_bytes(863_365_120, 2), "823.37 MiB");
        assert_eq!(count(1_330_000_000), "1.33 B");
        assert_eq!(count(412_300_000), "412.3 M");
        assert_eq!(count(500), "0.5 K");
        assert_eq!(human_count(500), "500");
        assert_eq!(human_count(49_200), "49.2 K");
        assert_eq!(plural(1, "token", "tokens"), "1 token");
        assert_eq!(plural(0, "token", "tokens"), "0 tokens");
        assert_eq!(plural(2, "reply", "replies"), "2 replies");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(shown("granite", false), "granite");
        assert_eq!(shown("a\u{1b}[31mred", false), "a\\u{1b}[31mred");
        assert_eq!(shown("x\u{9b}y\u{7}", false), "x\\u{9b}y\\u{7}");
        assert_eq!(shown("two\nlines\r", true), "two\nlines\\u{d}");
        assert_eq!(shown("two\nlines", false), "two\\u{a}lines");
    }
}
