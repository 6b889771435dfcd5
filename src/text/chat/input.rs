//! Multi-line input for the chat: a line ending in `\` continues on the next one, and `"""` opens a block that
//! runs until a line ending in `"""` (as in ollama). Commands are single lines starting with `/`.

/// What a line completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A slash command line, as typed.
    Command(String),
    /// A message for the model (trimmed).
    Message(String),
}

/// What a line did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assembled {
    Ready(Input),
    /// Inside a block or after a trailing `\`: the next line belongs to the same input.
    More,
    /// A blank line: nothing to do.
    Nothing,
}

const FENCE: &str = "\"\"\"";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Idle,
    /// After a line ending in `\`.
    Continued,
    /// Inside `"""`.
    Block,
}

/// Collects lines into inputs.
#[derive(Debug)]
pub struct LineAssembler {
    mode: Mode,
    buffer: String,
}

impl Default for LineAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl LineAssembler {
    pub fn new() -> LineAssembler {
        LineAssembler {
            mode: Mode::Idle,
            buffer: String::new(),
        }
    }

    /// Whether the next line continues an input (the REPL shows a continuation prompt).
    pub fn continuing(&self) -> bool {
        self.mode != Mode::Idle
    }

    /// Drops a half-typed input (Ctrl-C); says whether there was one.
    pub fn reset(&mut self) -> bool {
        let had = self.continuing();
        self.mode = Mode::Idle;
        self.buffer.clear();
        had
    }

    /// At the end of input (Ctrl-D, or a piped script's last line): what was typed into an open `"""` block or
    /// after a trailing `\\` is sent, as ollama sends it, rather than silently dropped.
    pub fn finish_pending(&mut self) -> Option<Input> {
        if !self.continuing() {
            return None;
        }
        match self.finish() {
            Assembled::Ready(input) => Some(input),
            _ => None,
        }
    }

    pub fn push(&mut self, line: &str) -> Assembled {
        let line = line.trim_end_matches(['\r', '\n']);
        match self.mode {
            Mode::Block => {
                if let Some(last) = line.trim_end().strip_suffix(FENCE) {
                    self.buffer.push_str(last);
                    return self.finish();
                }
                self.buffer.push_str(line);
                self.buffer.push('\n');
                Assembled::More
            }
            Mode::Continued => self.plain(line),
            Mode::Idle => {
                let trimmed = line.trim_start();
                if let Some(rest) = trimmed.strip_prefix(FENCE) {
                    // `"""text"""` on one line is a message; `"""text` opens a block.
                    if let Some(inner) = rest.trim_end().strip_suffix(FENCE) {
                        self.buffer.push_str(inner);
                        return self.finish();
                    }
                    self.mode = Mode::Block;
                    if !rest.trim().is_empty() {
                        self.buffer.push_str(rest);
                        self.buffer.push('\n');
                    }
                    return Assembled::More;
                }
                if line.starts_with('/') && !line.ends_with('\\') {
                    return Assembled::Ready(Input::Command(line.trim().to_string()));
                }
                self.plain(line)
            }
        }
    }

    fn plain(&mut self, line: &str) -> Assembled {
        match line.strip_suffix('\\') {
            Some(head) => {
                self.buffer.push_str(head);
                self.buffer.push('\n');
                self.mode = Mode::Continued;
                Assembled::More
            }
            None => {
                self.buffer.push_str(line);
                self.finish()
            }
        }
    }

    fn finish(&mut self) -> Assembled {
        self.mode = Mode::Idle;
        let text = self.buffer.trim().to_string();
        self.buffer.clear();
        if text.is_empty() {
            Assembled::Nothing
        } else {
            Assembled::Ready(Input::Message(text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> Vec<Assembled> {
        let mut a = LineAssembler::new();
        lines.iter().map(|l| a.push(l)).collect()
    }

    fn msg(s: &str) -> Assembled {
        Assembled::Ready(Input::Message(s.into()))
    }

    #[test]
    fn single_lines_and_commands() {
        assert_eq!(feed(&["hello "]), [msg("hello")]);
        assert_eq!(feed(&["   "]), [Assembled::Nothing]);
        assert_eq!(
            feed(&["/stats"]),
            [Assembled::Ready(Input::Command("/stats".into()))]
        );
        // A leading space sends a slash as text.
        assert_eq!(feed(&[" /etc/hosts is?"]), [msg("/etc/hosts is?")]);
    }

    #[test]
    fn backslash_continues() {
        assert_eq!(
            feed(&["first\\", "second\\", "third"]),
            [
                Assembled::More,
                Assembled::More,
                msg("first\nsecond\nthird")
            ]
        );
    }

    #[test]
    fn triple_quote_blocks() {
        assert_eq!(
            feed(&["\"\"\"", "line one", "", "/not a command", "end\"\"\""]),
            [
                Assembled::More,
                Assembled::More,
                Assembled::More,
                Assembled::More,
                msg("line one\n\n/not a command\nend")
            ]
        );
        assert_eq!(
            feed(&["\"\"\"start", "\"\"\""]),
            [Assembled::More, msg("start")]
        );
        assert_eq!(feed(&["\"\"\"one line\"\"\""]), [msg("one line")]);
    }

    #[test]
    fn end_of_input_sends_an_open_block() {
        let mut a = LineAssembler::new();
        assert_eq!(a.finish_pending(), None);
        assert_eq!(a.push("\"\"\"first"), Assembled::More);
        assert_eq!(a.push("second"), Assembled::More);
        assert_eq!(
            a.finish_pending(),
            Some(Input::Message("first\nsecond".into()))
        );
        assert!(!a.continuing());
        assert_eq!(a.push("tail \\"), Assembled::More);
        assert_eq!(a.finish_pending(), Some(Input::Message("tail".into())));
        assert_eq!(a.push("\"\"\""), Assembled::More);
        assert_eq!(a.finish_pending(), None);
    }

    #[test]
    fn reset_drops_a_half_input() {
        let mut a = LineAssembler::new();
        assert_eq!(a.push("\"\"\""), Assembled::More);
        assert!(a.continuing());
        assert!(a.reset());
        assert!(!a.continuing());
        assert_eq!(a.push("fresh"), msg("fresh"));
    }
}
